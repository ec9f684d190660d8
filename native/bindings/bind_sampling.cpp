// Python binding of the sampler chain (deltamem.h, sampling section).
#include "bindings/handles.h"

#include <pybind11/numpy.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace {

using float_array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// Python's seed convention: None or -1 ask for a random seed, like llama-cpp-python.
uint32_t seed_from_python(const py::object & seed) {
    if (seed.is_none()) {
        return DM_SEED_RANDOM;
    }
    if (!py::isinstance<py::int_>(seed)) {
        throw py::type_error("seed must be an int or None");
    }
    const long long value = seed.cast<long long>();
    if (value == -1) {
        return DM_SEED_RANDOM;
    }
    if (value < 0 || value > static_cast<long long>(std::numeric_limits<uint32_t>::max())) {
        throw py::value_error("seed must be in [0, 2**32 - 1], -1 or None");
    }
    return static_cast<uint32_t>(value);
}

// Accepts {token: bias} with int keys or, as in OpenAI requests, keys that are numeric strings.
void set_logit_bias(SamplerHandle & self, const py::object & logit_bias) {
    std::vector<dm_token> tokens;
    std::vector<float>    biases;
    if (!logit_bias.is_none()) {
        if (!py::isinstance<py::dict>(logit_bias)) {
            throw py::type_error("logit_bias must be a dict {token: bias} or None");
        }
        const py::dict bias_dict = logit_bias.cast<py::dict>();
        for (const auto & item : bias_dict) {
            const long long token = py::int_(py::reinterpret_borrow<py::object>(item.first)).cast<long long>();
            if (token < 0 || token > std::numeric_limits<dm_token>::max()) {
                throw py::value_error("logit_bias token id out of range: " + std::to_string(token));
            }
            tokens.push_back(static_cast<dm_token>(token));
            biases.push_back(item.second.cast<float>());
        }
    }
    SamplerHandle::use u(self);
    check(dm_sampler_set_logit_bias(u.object, tokens.data(), biases.data(), static_cast<int32_t>(tokens.size())) == 0);
}

int32_t vocab_size_of(const float_array & logits) {
    if (logits.ndim() != 1) {
        throw py::value_error("logits must be a 1-D array of n_vocab floats");
    }
    if (logits.shape(0) > std::numeric_limits<int32_t>::max()) {
        throw py::value_error("logits: too many entries");
    }
    return static_cast<int32_t>(logits.shape(0));
}

} // namespace

void bind_sampling(py::module_ & m) {
    py::class_<SamplerHandle>(m, "Sampler",
        "Sampler chain: logit bias -> penalties -> top-k -> typical-p -> top-p -> min-p -> "
        "temperature -> draw. temperature <= 0 is greedy.")
        .def(py::init([](float temperature, const py::handle & top_k, float top_p, float min_p, float typical_p,
                         float repeat_penalty, float frequency_penalty, float presence_penalty,
                         const py::handle & penalty_last_n, const py::object & seed, const py::object & logit_bias) {
                 dm_sampler_params p = dm_sampler_default_params();
                 p.temperature       = temperature;
                 p.top_k             = int32_arg(top_k, "top_k");
                 p.top_p             = top_p;
                 p.min_p             = min_p;
                 p.typical_p         = typical_p;
                 p.repeat_penalty    = repeat_penalty;
                 p.frequency_penalty = frequency_penalty;
                 p.presence_penalty  = presence_penalty;
                 p.penalty_last_n    = int32_arg(penalty_last_n, "penalty_last_n");
                 p.seed              = seed_from_python(seed);
                 dm_sampler * sampler = dm_sampler_new(p);
                 check(sampler != nullptr);
                 auto self = std::make_unique<SamplerHandle>(sampler);
                 set_logit_bias(*self, logit_bias);
                 return self;
             }),
             py::arg("temperature") = 0.8f, py::arg("top_k") = 40, py::arg("top_p") = 0.95f,
             py::arg("min_p") = 0.05f, py::arg("typical_p") = 1.0f, py::arg("repeat_penalty") = 1.0f,
             py::arg("frequency_penalty") = 0.0f, py::arg("presence_penalty") = 0.0f,
             py::arg("penalty_last_n") = 64, py::arg("seed") = py::none(),
             py::arg("logit_bias") = py::none())
        .def("sample",
             [](SamplerHandle & self, const float_array & logits) {
                 const int32_t n_vocab = vocab_size_of(logits);
                 SamplerHandle::use u(self);
                 const dm_token token = dm_sampler_sample(u.object, logits.data(), n_vocab);
                 check(token >= 0);
                 return token;
             },
             py::arg("logits"), "Runs the chain on a 1-D float32 logits row, draws a token and accepts it.")
        .def("probs",
             [](SamplerHandle & self, const float_array & logits) {
                 const int32_t n_vocab = vocab_size_of(logits);
                 float_array probs(static_cast<py::ssize_t>(n_vocab));
                 SamplerHandle::use u(self);
                 check(dm_sampler_probs(u.object, logits.data(), n_vocab, probs.mutable_data()) == 0);
                 return probs;
             },
             py::arg("logits"),
             "Probabilities each token would be drawn with (0 for filtered tokens); accepts nothing.")
        .def("accept",
             [](SamplerHandle & self, const py::handle & token) {
                 const dm_token id = int32_arg(token, "token");
                 SamplerHandle::use u(self);
                 dm_sampler_accept(u.object, id);
             },
             py::arg("token"), "Adds a token (e.g. from the prompt) to the penalty history.")
        .def("reset",
             [](SamplerHandle & self) {
                 SamplerHandle::use u(self);
                 dm_sampler_reset(u.object);
             },
             "Clears the penalty history; keeps params, biases and the RNG state.")
        .def("set_logit_bias", &set_logit_bias, py::arg("logit_bias"),
             "Replaces the logit biases with {token: bias} (None clears); -inf bans a token.")
        .def("close", &SamplerHandle::close, "Waits for a generation using it, then frees the sampler.")
        .def_property_readonly("closed", &SamplerHandle::closed);
}
