// Bindings for models and contexts: thin wrappers that own the C handles and close deterministically.
#include "bindings/bindings.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace {

// The weights are shared by the model handle and every context made from it: closing the model
// only drops its share, so the weights go when the last context closes too.
using model_owner = std::shared_ptr<dm_model>;

struct ModelHandle {
    model_owner owner;
    dm_model *  ptr = nullptr;   // owner.get() while open

    explicit ModelHandle(dm_model * m) : owner(m, dm_model_free), ptr(m) {}

    void require_open() const {
        if (!ptr) throw py::value_error("the model is closed");
    }
    void close() {
        owner.reset();
        ptr = nullptr;
    }
};

struct ContextHandle {
    dm_context * ptr = nullptr;
    model_owner  model;
    int32_t      n_vocab = 0;

    ContextHandle(dm_context * c, model_owner m, int32_t n) : ptr(c), model(std::move(m)), n_vocab(n) {}
    ContextHandle(const ContextHandle &) = delete;
    ContextHandle & operator=(const ContextHandle &) = delete;
    ~ContextHandle() { close(); }

    void require_open() const {
        if (!ptr) throw py::value_error("the context is closed");
    }
    void close() {
        dm_context_free(ptr);   // before the weights it points into
        ptr = nullptr;
        model.reset();
    }
};

ModelHandle * load_model(const std::string & path, bool use_mmap, const std::optional<std::string> & adapter,
                         bool use_repack) {
    dm_model_params p = dm_model_default_params();
    p.use_mmap = use_mmap;
    p.use_repack = use_repack;
    p.adapter_path = adapter ? adapter->c_str() : nullptr;
    dm_model * m = nullptr;
    {
        py::gil_scoped_release release;
        m = dm_model_load(path.c_str(), p);
    }
    check(m != nullptr);
    return new ModelHandle(m);
}

py::list metadata_items(const ModelHandle & m) {
    m.require_open();
    py::list items;
    const int32_t n = dm_model_meta_count(m.ptr);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t len = dm_model_meta_value(m.ptr, i, nullptr, 0);
        std::string value(static_cast<size_t>(len) + 1, '\0');
        dm_model_meta_value(m.ptr, i, value.data(), value.size());
        value.resize(static_cast<size_t>(len));
        items.append(py::make_tuple(dm_model_meta_key(m.ptr, i), dm_model_meta_type(m.ptr, i),
                                    py::bytes(value)));
    }
    return items;
}

ContextHandle * new_context(py::object model_obj, int32_t n_ctx, int32_t n_batch, int32_t n_threads, int kv_type,
                            bool dmem_fused, int32_t poll) {
    ModelHandle & m = model_obj.cast<ModelHandle &>();
    m.require_open();
    dm_context_params p = dm_context_default_params();
    p.n_ctx = n_ctx;
    p.n_batch = n_batch;
    p.n_threads = n_threads;
    p.kv_type = static_cast<dm_kv_type>(kv_type);
    p.dmem_fused = dmem_fused;
    p.poll = poll;
    dm_context * c = dm_context_new(m.ptr, p);
    check(c != nullptr);
    return new ContextHandle(c, m.owner, dm_model_n_vocab(m.ptr));
}

py::array_t<float> decode(ContextHandle & c, const std::vector<dm_token> & tokens, int which,
                          const std::optional<std::vector<int32_t>> & seg_ids, bool write) {
    c.require_open();
    const py::ssize_t n_rows = which == DM_LOGITS_ALL ? static_cast<py::ssize_t>(tokens.size()) : 1;
    py::array_t<float> out = which == DM_LOGITS_ALL ? py::array_t<float>({n_rows, static_cast<py::ssize_t>(c.n_vocab)})
                                                    : py::array_t<float>(which == DM_LOGITS_NONE ? 0 : c.n_vocab);
    float * dst = which == DM_LOGITS_NONE ? nullptr : out.mutable_data();
    int32_t rc = 0;
    {
        py::gil_scoped_release release;
        rc = dm_decode_ext(c.ptr, tokens.data(), static_cast<int32_t>(tokens.size()), static_cast<dm_logits>(which), dst,
                           seg_ids ? seg_ids->data() : nullptr, write);
    }
    check(rc == 0);
    return out;
}

py::array_t<float> memory_get(const ContextHandle & c) {
    c.require_open();
    py::array_t<float> out(static_cast<py::ssize_t>(dm_memory_size(c.ptr)));
    check(dm_memory_get(c.ptr, out.mutable_data(), out.size()) == 0);
    return out;
}

void memory_set(ContextHandle & c, py::array_t<float, py::array::c_style | py::array::forcecast> values) {
    c.require_open();
    check(dm_memory_set(c.ptr, values.data(), values.size()) == 0);
}

py::bytes kv_get(const ContextHandle & c) {
    c.require_open();
    std::string data(static_cast<size_t>(dm_context_kv_size(c.ptr)), '\0');
    check(dm_context_kv_get(c.ptr, data.data(), static_cast<int64_t>(data.size())) == 0);
    return py::bytes(data);
}

void kv_set(ContextHandle & c, const std::vector<dm_token> & tokens, const py::bytes & data) {
    c.require_open();
    const std::string_view view = data;
    check(dm_context_kv_set(c.ptr, tokens.data(), static_cast<int32_t>(tokens.size()), view.data(),
                            static_cast<int64_t>(view.size())) == 0);
}

std::vector<dm_token> context_tokens(const ContextHandle & c) {
    c.require_open();
    std::vector<dm_token> out(static_cast<size_t>(dm_context_n_past(c.ptr)));
    dm_context_tokens(c.ptr, out.data(), static_cast<int32_t>(out.size()));
    return out;
}

} // namespace

void bind_model(py::module_ & m) {
    m.def("system_info", [] { return std::string(dm_system_info()); });
    py::class_<ModelHandle>(m, "Model")
        .def(py::init(&load_model), py::arg("path"), py::arg("use_mmap") = true, py::arg("adapter") = py::none(),
             py::arg("use_repack") = true)
        .def_property_readonly("n_repacked", [](const ModelHandle & s) { s.require_open(); return dm_model_n_repacked(s.ptr); })
        .def_property_readonly("adapter_info", [](const ModelHandle & s) -> py::object {
            s.require_open();
            const char * info = dm_model_adapter_info(s.ptr);
            return info ? py::object(py::str(info)) : py::object(py::none());
        })
        .def("close", &ModelHandle::close)
        .def_property_readonly("closed", [](const ModelHandle & s) { return s.ptr == nullptr; })
        .def_property_readonly("ptr", [](const ModelHandle & s) { s.require_open(); return reinterpret_cast<intptr_t>(s.ptr); })
        .def_property_readonly("arch", [](const ModelHandle & s) { s.require_open(); return std::string(dm_model_arch(s.ptr)); })
        .def_property_readonly("n_vocab", [](const ModelHandle & s) { s.require_open(); return dm_model_n_vocab(s.ptr); })
        .def_property_readonly("n_ctx_train", [](const ModelHandle & s) { s.require_open(); return dm_model_n_ctx_train(s.ptr); })
        .def_property_readonly("n_layer", [](const ModelHandle & s) { s.require_open(); return dm_model_n_layer(s.ptr); })
        .def_property_readonly("n_embd", [](const ModelHandle & s) { s.require_open(); return dm_model_n_embd(s.ptr); })
        .def("metadata_items", &metadata_items);

    py::class_<ContextHandle>(m, "Context")
        .def(py::init(&new_context), py::arg("model"), py::arg("n_ctx"), py::arg("n_batch"), py::arg("n_threads"),
             py::arg("kv_type"), py::arg("dmem_fused") = true, py::arg("poll") = 50)
        .def("close", &ContextHandle::close)
        .def_property_readonly("closed", [](const ContextHandle & s) { return s.ptr == nullptr; })
        .def_property_readonly("ptr", [](const ContextHandle & s) { s.require_open(); return reinterpret_cast<intptr_t>(s.ptr); })
        .def_property_readonly("n_ctx", [](const ContextHandle & s) { s.require_open(); return dm_context_n_ctx(s.ptr); })
        .def_property_readonly("n_past", [](const ContextHandle & s) { s.require_open(); return dm_context_n_past(s.ptr); })
        .def("reset", [](ContextHandle & s) { s.require_open(); dm_context_reset(s.ptr); })
        .def("decode", &decode, py::arg("tokens"), py::arg("which"), py::arg("seg_ids") = py::none(),
             py::arg("write") = true)
        .def("memory_get", &memory_get, "The δ-mem state, flat float32 [layers * H * r * r].")
        .def("memory_set", &memory_set, py::arg("values"))
        .def("memory_reset", [](ContextHandle & s) { s.require_open(); dm_memory_reset(s.ptr); })
        .def("kv_get", &kv_get, "KV rows of the sequence, as bytes.")
        .def("kv_set", &kv_set, py::arg("tokens"), py::arg("data"))
        .def("tokens", &context_tokens, "The token ids of the sequence so far.")
        .def("truncate", [](ContextHandle & s, int32_t n) { s.require_open(); check(dm_context_truncate(s.ptr, n) == 0); },
             py::arg("n"), "Keeps the first n tokens of the sequence.");

    m.attr("LOGITS_NONE") = static_cast<int>(DM_LOGITS_NONE);
    m.attr("LOGITS_LAST") = static_cast<int>(DM_LOGITS_LAST);
    m.attr("LOGITS_ALL") = static_cast<int>(DM_LOGITS_ALL);
    m.attr("KV_F16") = static_cast<int>(DM_KV_F16);
    m.attr("KV_F32") = static_cast<int>(DM_KV_F32);
}
