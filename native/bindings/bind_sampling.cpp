// Python binding of the sampler chain (deltamem.h, sampling section).
#include "bindings/handles.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace {

using float_array = py::array_t<float, py::array::c_style | py::array::forcecast>;

// The seed as pydeltamem.sampling normalises it: None is a random seed, else a 32-bit value.
uint32_t seed_from_python(const py::handle & seed) {
    if (seed.is_none()) {
        return DM_SEED_RANDOM;
    }
    if (!py::isinstance<py::int_>(seed)) {
        throw py::type_error("seed must be an int or None");
    }
    const long long value = seed.cast<long long>();
    if (value < 0 || value > static_cast<long long>(std::numeric_limits<uint32_t>::max())) {
        throw py::value_error("seed must be in [0, 2**32 - 1] or None");
    }
    return static_cast<uint32_t>(value);
}

// dm_sampler_default_params() as a dict: the one place Python learns the defaults from.
py::dict default_params_dict() {
    const dm_sampler_params p = dm_sampler_default_params();
    py::dict d;
    d["temperature"]       = p.temperature;
    d["top_k"]             = p.top_k;
    d["top_p"]             = p.top_p;
    d["min_p"]             = p.min_p;
    d["typical_p"]         = p.typical_p;
    d["repeat_penalty"]    = p.repeat_penalty;
    d["frequency_penalty"] = p.frequency_penalty;
    d["presence_penalty"]  = p.presence_penalty;
    d["penalty_last_n"]    = p.penalty_last_n;
    d["seed"]              = p.seed == DM_SEED_RANDOM ? py::object(py::none()) : py::object(py::int_(p.seed));
    return d;
}

// dm_sampler_default_params() with the fields kwargs names replaced; an unknown name is a TypeError.
dm_sampler_params params_from_kwargs(const py::kwargs & kwargs) {
    dm_sampler_params p = dm_sampler_default_params();
    for (const auto & item : kwargs) {
        const std::string name = py::str(item.first);
        const py::handle value = item.second;
        if (name == "temperature")            p.temperature = value.cast<float>();
        else if (name == "top_k")             p.top_k = int32_arg(value, "top_k");
        else if (name == "top_p")             p.top_p = value.cast<float>();
        else if (name == "min_p")             p.min_p = value.cast<float>();
        else if (name == "typical_p")         p.typical_p = value.cast<float>();
        else if (name == "repeat_penalty")    p.repeat_penalty = value.cast<float>();
        else if (name == "frequency_penalty") p.frequency_penalty = value.cast<float>();
        else if (name == "presence_penalty")  p.presence_penalty = value.cast<float>();
        else if (name == "penalty_last_n")    p.penalty_last_n = int32_arg(value, "penalty_last_n");
        else if (name == "seed")              p.seed = seed_from_python(value);
        else if (name != "logit_bias") {
            throw py::type_error("Sampler() got an unexpected keyword argument '" + name + "'");
        }
    }
    return p;
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
        .def(py::init([](const py::kwargs & kwargs) {
                 dm_sampler * sampler = dm_sampler_new(params_from_kwargs(kwargs));
                 check(sampler != nullptr);
                 auto self = std::make_unique<SamplerHandle>(sampler);
                 set_logit_bias(*self, kwargs.contains("logit_bias") ? py::object(kwargs["logit_bias"]) : py::none());
                 return self;
             }),
             "Sampler(**params): dm_sampler_default_params() with the named fields replaced (temperature, "
             "top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty, presence_penalty, "
             "penalty_last_n, seed: int or None, logit_bias: {token: bias}). pydeltamem.sampling.SamplingParams "
             "is the Python policy that checks and normalises them.")
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
        .def("accept_tokens",
             [](SamplerHandle & self, const std::vector<dm_token> & tokens) {
                 SamplerHandle::use u(self);
                 check(dm_sampler_accept_tokens(u.object, tokens.data(), static_cast<int32_t>(tokens.size())) == 0);
             },
             py::arg("tokens"), "Adds tokens in order (a prompt's) to the penalty history, in one call.")
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
    m.def("sampler_default_params", &default_params_dict,
          "dm_sampler_default_params() as a dict (seed None: random).");
}
