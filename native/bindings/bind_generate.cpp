// Bindings for the C++ generation loop: one call per completion; Python runs only in the
// optional per-piece callback (streaming). The call holds exclusive uses of its context and sampler
// (bindings/handles.h): they stay alive, and no other call touches them, until it returns.
#include "bindings/handles.h"

#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

struct generator_deleter {
    void operator()(dm_generator * g) const { dm_generator_free(g); }
};

struct callback_state {
    py::object fn;
    std::optional<py::error_already_set> error;   // a Python exception raised by fn, re-raised after the run
};

bool forward_piece(const char * text, size_t len, void * user_data) {
    auto * st = static_cast<callback_state *>(user_data);
    if (st->error) return false;   // never call Python again after it raised
    py::gil_scoped_acquire gil;
    try {
        py::object go_on = st->fn(py::bytes(text, len));
        return go_on.is_none() || go_on.cast<bool>();
    } catch (py::error_already_set & e) {
        st->error.emplace(std::move(e));
        return false;
    }
}

// dm_generate_params from the Python arguments; c points into stop_c and into the caller's
// strings and stop tokens, which must outlive dm_generator_new (it copies them).
struct generate_params {
    std::vector<const char *> stop_c;
    dm_generate_params c = dm_generate_default_params();

    generate_params(const py::handle & max_tokens, const std::vector<std::string> & stop,
                    const std::vector<dm_token> & stop_tokens, bool write, const py::handle & seg_id) {
        for (const std::string & s : stop) stop_c.push_back(s.c_str());
        c.max_tokens = int32_arg(max_tokens, "max_tokens");
        c.stop = stop_c.data();
        c.n_stop = static_cast<int32_t>(stop_c.size());
        c.stop_tokens = stop_tokens.data();
        c.n_stop_tokens = static_cast<int32_t>(stop_tokens.size());
        c.write = write;
        c.seg_id = int32_arg(seg_id, "seg_id");
    }
    generate_params(const generate_params &) = delete;   // c points into this object
    generate_params & operator=(const generate_params &) = delete;
};

// (tokens, text_bytes, finish) of a generator so far.
py::tuple result_tuple(const dm_generator * gen) {
    int32_t n = 0;
    const dm_token * toks = dm_generator_tokens(gen, &n);
    size_t len = 0;
    const char * text = dm_generator_text(gen, &len);
    const char * finish = dm_generator_finish(gen) == DM_FINISH_STOP ? "stop" : "length";
    return py::make_tuple(std::vector<dm_token>(toks, toks + n), py::bytes(text, len), finish);
}

py::tuple generate(ContextHandle & ctx, SamplerHandle & sampler, const std::vector<dm_token> & prompt,
                   const py::handle & max_tokens, const std::vector<std::string> & stop,
                   const std::vector<dm_token> & stop_tokens, py::object on_piece,
                   const std::optional<std::vector<int32_t>> & seg_ids, bool write, const py::handle & seg_id) {
    if (seg_ids && seg_ids->size() != prompt.size()) throw py::value_error("seg_ids must have one id per prompt token");
    generate_params params(max_tokens, stop, stop_tokens, write, seg_id);
    ContextHandle::use ctx_use(ctx);
    SamplerHandle::use sampler_use(sampler);
    std::unique_ptr<dm_generator, generator_deleter> gen(dm_generator_new(ctx_use.object, sampler_use.object, params.c));
    check(gen != nullptr);

    callback_state st{on_piece, std::nullopt};
    int32_t rc = 0;
    {
        py::gil_scoped_release release;
        rc = dm_generator_run(gen.get(), prompt.data(), static_cast<int32_t>(prompt.size()),
                              seg_ids ? seg_ids->data() : nullptr, on_piece.is_none() ? nullptr : &forward_piece, &st);
    }
    if (st.error) throw std::move(*st.error);
    ctx.check(rc == 0);
    return result_tuple(gen.get());
}

// _core.Generator: a dm_generator for the step loop (continuous batching), over a context and a
// sampler whose Python handles it keeps alive. Used by one thread at a time (the scheduler's).
struct StepGenerator {
    py::object ctx_obj, sampler_obj;   // the handles
    ContextHandle & ctx;
    SamplerHandle & sampler;
    std::unique_ptr<dm_generator, generator_deleter> gen;

    StepGenerator(py::object c, py::object s, const py::handle & max_tokens, const std::vector<std::string> & stop,
                  const std::vector<dm_token> & stop_tokens, bool write, const py::handle & seg_id)
        : ctx_obj(std::move(c)), sampler_obj(std::move(s)), ctx(ctx_obj.cast<ContextHandle &>()),
          sampler(sampler_obj.cast<SamplerHandle &>()) {
        generate_params params(max_tokens, stop, stop_tokens, write, seg_id);
        ContextHandle::use cu(ctx);
        SamplerHandle::use su(sampler);
        gen.reset(dm_generator_new(cu.object, su.object, params.c));
        check(gen != nullptr);
    }

    void start(const std::vector<dm_token> & prompt, const std::optional<std::vector<int32_t>> & seg_ids) {
        if (seg_ids && seg_ids->size() != prompt.size()) throw py::value_error("seg_ids must have one id per prompt token");
        check(dm_generator_start(gen.get(), prompt.data(), static_cast<int32_t>(prompt.size()),
                                 seg_ids ? seg_ids->data() : nullptr) == 0);
    }

    py::bytes take_text() {
        size_t len = 0;
        const char * t = dm_generator_take_text(gen.get(), &len);
        check(t != nullptr);
        return py::bytes(t, len);
    }

    py::tuple result() const { return result_tuple(gen.get()); }
};

// One step of several generators in one batched decode, under exclusive uses of all their
// contexts and samplers (taken in one global order, as decode_batch's).
std::vector<bool> generators_step(const std::vector<StepGenerator *> & gens) {
    if (gens.empty()) throw py::value_error("generators_step: no generators");
    std::vector<std::unique_ptr<ContextHandle::use>> ctx_uses(gens.size());
    std::vector<std::unique_ptr<SamplerHandle::use>> sampler_uses(gens.size());
    std::vector<pending_use> pending;
    for (size_t i = 0; i < gens.size(); ++i) {
        pending.push_back({&gens[i]->ctx, [&, i] { ctx_uses[i] = std::make_unique<ContextHandle::use>(gens[i]->ctx); }});
        pending.push_back({&gens[i]->sampler, [&, i] { sampler_uses[i] = std::make_unique<SamplerHandle::use>(gens[i]->sampler); }});
    }
    take_in_address_order(std::move(pending), [](size_t, size_t) {
        return std::string("generators_step: two generators share a context or a sampler");
    });
    std::vector<dm_generator *> raw;
    for (StepGenerator * g : gens) raw.push_back(g->gen.get());
    std::unique_ptr<bool[]> running(new bool[gens.size()]());
    int32_t rc = 0;
    {
        py::gil_scoped_release release;
        rc = dm_generators_step(raw.data(), static_cast<int32_t>(raw.size()), running.get());
    }
    gens[0]->ctx.check(rc == 0);
    return std::vector<bool>(running.get(), running.get() + gens.size());
}

} // namespace

void bind_generate(py::module_ & m) {
    py::class_<StepGenerator>(m, "Generator", "A generation loop advanced a step at a time with others (generators_step).")
        .def(py::init<py::object, py::object, const py::handle &, const std::vector<std::string> &, const std::vector<dm_token> &, bool,
                      const py::handle &>(),
             py::arg("ctx"), py::arg("sampler"), py::arg("max_tokens"), py::arg("stop"), py::arg("stop_tokens"),
             py::arg("write") = true, py::arg("seg_id") = -1)
        .def("start", &StepGenerator::start, py::arg("prompt"), py::arg("seg_ids") = py::none())
        .def("take_text", &StepGenerator::take_text, "The text that became final since the last call, as bytes.")
        .def("result", &StepGenerator::result, "(tokens, text_bytes, finish) so far.");
    m.def("generators_step", &generators_step, py::arg("generators"),
          "Decodes every generator's next tokens in one batch and samples each; [still running] per generator.");
    m.def("generate", &generate, py::arg("ctx"), py::arg("sampler"), py::arg("prompt"), py::arg("max_tokens"),
          py::arg("stop"), py::arg("stop_tokens"), py::arg("on_piece") = py::none(),
          py::arg("seg_ids") = py::none(), py::arg("write") = true, py::arg("seg_id") = -1,
          "Decodes prompt, then samples up to max_tokens tokens in C++. on_piece(bytes) -> bool|None is "
          "called with each final piece of text (return False to stop). write=False only reads the δ-mem "
          "memory; seg_id is each generated token's segment id (-1: token writes). Returns (tokens, text_bytes, finish).");
}
