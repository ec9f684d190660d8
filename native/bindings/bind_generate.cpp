// Bindings for the C++ generation loop: one call per completion; Python runs only in the
// optional per-piece callback (streaming). The call holds exclusive uses of its context and sampler
// (bindings/handles.h): they stay alive, and no other call touches them, until it returns.
#include "bindings/handles.h"

#include <pybind11/functional.h>
#include <pybind11/stl.h>

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

py::tuple generate(ContextHandle & ctx, SamplerHandle & sampler, const std::vector<dm_token> & prompt,
                   const py::handle & max_tokens, const std::vector<std::string> & stop,
                   const std::vector<dm_token> & stop_tokens, py::object on_piece,
                   const std::optional<std::vector<int32_t>> & seg_ids, bool write, const py::handle & seg_id) {
    if (seg_ids && seg_ids->size() != prompt.size()) throw py::value_error("seg_ids must have one id per prompt token");
    std::vector<const char *> stop_c;
    for (const std::string & s : stop) stop_c.push_back(s.c_str());
    dm_generate_params params = dm_generate_default_params();
    params.max_tokens = int32_arg(max_tokens, "max_tokens");
    params.stop = stop_c.data();
    params.n_stop = static_cast<int32_t>(stop_c.size());
    params.stop_tokens = stop_tokens.data();
    params.n_stop_tokens = static_cast<int32_t>(stop_tokens.size());
    params.write = write;
    params.seg_id = int32_arg(seg_id, "seg_id");
    ContextHandle::use ctx_use(ctx);
    SamplerHandle::use sampler_use(sampler);
    std::unique_ptr<dm_generator, generator_deleter> gen(dm_generator_new(ctx_use.object, sampler_use.object, params));
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

    int32_t n = 0;
    const dm_token * toks = dm_generator_tokens(gen.get(), &n);
    size_t len = 0;
    const char * text = dm_generator_text(gen.get(), &len);
    const char * finish = dm_generator_finish(gen.get()) == DM_FINISH_STOP ? "stop" : "length";
    return py::make_tuple(std::vector<dm_token>(toks, toks + n), py::bytes(text, len), finish);
}

} // namespace

void bind_generate(py::module_ & m) {
    m.def("generate", &generate, py::arg("ctx"), py::arg("sampler"), py::arg("prompt"), py::arg("max_tokens"),
          py::arg("stop"), py::arg("stop_tokens"), py::arg("on_piece") = py::none(),
          py::arg("seg_ids") = py::none(), py::arg("write") = true, py::arg("seg_id") = -1,
          "Decodes prompt, then samples up to max_tokens tokens in C++. on_piece(bytes) -> bool|None is "
          "called with each final piece of text (return False to stop). write=False only reads the δ-mem "
          "memory; seg_id is each generated token's segment id (-1: token writes). Returns (tokens, text_bytes, finish).");
}
