// Bindings for models and contexts: thin wrappers over the C handles (bindings/handles.h says how
// they stay alive while calls use them and close deterministically).
#include "bindings/handles.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace {

ModelHandle * load_model(const std::string & path, bool use_mmap, const std::optional<std::string> & adapter,
                         bool use_repack, const py::handle & n_gpu_layers, const py::handle & main_gpu,
                         const std::vector<float> & tensor_split, const std::string & rpc_servers) {
    dm_model_params p = dm_model_default_params();
    p.use_mmap = use_mmap;
    p.use_repack = use_repack;
    p.adapter_path = adapter ? adapter->c_str() : nullptr;
    p.n_gpu_layers = int32_arg(n_gpu_layers, "n_gpu_layers");
    p.main_gpu = int32_arg(main_gpu, "main_gpu");
    p.tensor_split = tensor_split.empty() ? nullptr : tensor_split.data();
    p.n_tensor_split = static_cast<int32_t>(tensor_split.size());
    p.rpc_servers = rpc_servers.empty() ? nullptr : rpc_servers.c_str();
    dm_model * m = nullptr;
    {
        py::gil_scoped_release release;
        m = dm_model_load(path.c_str(), p);
    }
    check(m != nullptr);
    return new ModelHandle(m);
}

py::list metadata_items(ModelHandle & self) {
    ModelHandle::use u(self);
    py::list items;
    const int32_t n = dm_model_meta_count(u.object);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t len = dm_model_meta_value(u.object, i, nullptr, 0);
        std::string value(static_cast<size_t>(len) + 1, '\0');
        dm_model_meta_value(u.object, i, value.data(), value.size());
        value.resize(static_cast<size_t>(len));
        items.append(py::make_tuple(native_text(dm_model_meta_key(u.object, i)),
                                    native_text(dm_model_meta_type(u.object, i)), py::bytes(value)));
    }
    return items;
}

ContextHandle * new_context(ModelHandle & model, const py::handle & n_ctx, const py::handle & n_batch,
                            const py::handle & n_threads, const py::handle & kv_type, bool dmem_fused,
                            const py::handle & poll) {
    dm_context_params p = dm_context_default_params();
    p.n_ctx = int32_arg(n_ctx, "n_ctx");
    p.n_batch = int32_arg(n_batch, "n_batch");
    p.n_threads = int32_arg(n_threads, "n_threads");
    p.kv_type = static_cast<dm_kv_type>(int32_arg(kv_type, "kv_type"));
    p.dmem_fused = dmem_fused;
    p.poll = int32_arg(poll, "poll");
    ModelHandle::use u(model);
    dm_context * c = dm_context_new(u.object, p);
    check(c != nullptr);
    return new ContextHandle(c, model.weights());
}

py::array_t<float> decode(ContextHandle & c, const std::vector<dm_token> & tokens, int which,
                          const std::optional<std::vector<int32_t>> & seg_ids, bool write) {
    if (seg_ids && seg_ids->size() != tokens.size()) throw py::value_error("seg_ids must have one id per token");
    ContextHandle::use u(c);
    const py::ssize_t n_rows = which == DM_LOGITS_ALL ? static_cast<py::ssize_t>(tokens.size()) : 1;
    const auto n_vocab = static_cast<py::ssize_t>(c.n_vocab());
    py::array_t<float> out = which == DM_LOGITS_ALL ? py::array_t<float>({n_rows, n_vocab})
                                                    : py::array_t<float>(which == DM_LOGITS_NONE ? 0 : n_vocab);
    float * dst = which == DM_LOGITS_NONE ? nullptr : out.mutable_data();
    int32_t rc = 0;
    {
        py::gil_scoped_release release;
        rc = dm_decode_ext(u.object, tokens.data(), static_cast<int32_t>(tokens.size()), static_cast<dm_logits>(which), dst,
                           seg_ids ? seg_ids->data() : nullptr, write);
    }
    c.check(rc == 0);
    return out;
}

// Exclusive uses of every context of a batch (in address order: take_in_address_order).
std::vector<std::unique_ptr<ContextHandle::use>> use_all(const std::vector<ContextHandle *> & handles) {
    std::vector<std::unique_ptr<ContextHandle::use>> uses(handles.size());
    std::vector<pending_use> pending;
    for (size_t i = 0; i < handles.size(); ++i) {
        pending.push_back({handles[i], [&, i] {
            try {
                uses[i] = std::make_unique<ContextHandle::use>(*handles[i]);
            } catch (const py::builtin_exception & e) {
                throw py::value_error("decode_batch: context " + std::to_string(i) + ": " + e.what());
            }
        }});
    }
    take_in_address_order(std::move(pending), [](size_t i, size_t j) {
        return "decode_batch: context " + std::to_string(i) + " is context " + std::to_string(j) +
               " again: each context may be in a batch once";
    });
    return uses;
}

py::list decode_batch(const std::vector<ContextHandle *> & handles, const std::vector<std::vector<dm_token>> & tokens,
                      int which, const std::vector<std::optional<std::vector<int32_t>>> & seg_ids,
                      const std::vector<bool> & writes) {
    const size_t n = handles.size();
    if (n == 0) throw py::value_error("decode_batch: no contexts");
    if (tokens.size() != n || seg_ids.size() != n || writes.size() != n) {
        throw py::value_error("decode_batch: one token list, id list and write flag per context");
    }
    for (size_t i = 0; i < n; ++i) {
        if (seg_ids[i] && seg_ids[i]->size() != tokens[i].size()) {
            throw py::value_error("decode_batch: context " + std::to_string(i) + ": seg_ids must have one id per token");
        }
    }
    const auto uses = use_all(handles);
    std::vector<py::array_t<float>> outs;
    std::vector<dm_batch_entry> entries(n);
    for (size_t i = 0; i < n; ++i) {
        const auto n_vocab = static_cast<py::ssize_t>(handles[i]->n_vocab());
        const auto n_rows = static_cast<py::ssize_t>(tokens[i].size());
        outs.push_back(which == DM_LOGITS_ALL ? py::array_t<float>({n_rows, n_vocab})
                                              : py::array_t<float>(which == DM_LOGITS_NONE ? 0 : n_vocab));
        entries[i] = {uses[i]->object, tokens[i].data(), static_cast<int32_t>(tokens[i].size()),
                      seg_ids[i] ? seg_ids[i]->data() : nullptr, static_cast<bool>(writes[i]),
                      which == DM_LOGITS_NONE ? nullptr : outs.back().mutable_data()};
    }
    int32_t rc = 0;
    {
        py::gil_scoped_release release;
        rc = dm_decode_batch(entries.data(), static_cast<int32_t>(n), static_cast<dm_logits>(which));
    }
    handles[0]->check(rc == 0);
    py::list result;
    for (auto & o : outs) result.append(o);
    return result;
}

py::array_t<float> memory_get(ContextHandle & c) {
    ContextHandle::use u(c);
    py::array_t<float> out(static_cast<py::ssize_t>(dm_memory_size(u.object)));
    c.check(dm_memory_get(u.object, out.mutable_data(), out.size()) == 0);
    return out;
}

void memory_set(ContextHandle & c, py::array_t<float, py::array::c_style | py::array::forcecast> values) {
    ContextHandle::use u(c);
    c.check(dm_memory_set(u.object, values.data(), values.size()) == 0);
}

py::bytes kv_get(ContextHandle & c) {
    ContextHandle::use u(c);
    std::string data(static_cast<size_t>(dm_context_kv_size(u.object)), '\0');
    c.check(dm_context_kv_get(u.object, data.data(), static_cast<int64_t>(data.size())) == 0);
    return py::bytes(data);
}

void kv_set(ContextHandle & c, const std::vector<dm_token> & tokens, const py::bytes & data) {
    ContextHandle::use u(c);
    const std::string_view view = data;
    c.check(dm_context_kv_set(u.object, tokens.data(), static_cast<int32_t>(tokens.size()), view.data(),
                              static_cast<int64_t>(view.size())) == 0);
}

std::vector<dm_token> context_tokens(ContextHandle & c) {
    ContextHandle::use u(c);
    std::vector<dm_token> out(static_cast<size_t>(dm_context_n_past(u.object)));
    dm_context_tokens(u.object, out.data(), static_cast<int32_t>(out.size()));
    return out;
}

// A call on an open context, under an exclusive use.
template <typename Call>
auto context_call(Call call) {
    return [call](ContextHandle & self) {
        ContextHandle::use u(self);
        return call(u.object);
    };
}

} // namespace

void bind_model(py::module_ & m) {
    m.def("system_info", [] { return native_text(dm_system_info()); });
    m.attr("MAX_THREADS") = DM_MAX_THREADS;
    py::class_<ModelHandle>(m, "Model")
        .def(py::init(&load_model), py::arg("path"), py::arg("use_mmap") = true, py::arg("adapter") = py::none(),
             py::arg("use_repack") = true, py::arg("n_gpu_layers") = 0, py::arg("main_gpu") = 0,
             py::arg("tensor_split") = std::vector<float>{}, py::arg("rpc_servers") = "")
        .def("layer_device",
             [](ModelHandle & self, const py::handle & il) {
                 const int32_t layer = int32_arg(il, "layer");
                 ModelHandle::use u(self);
                 const char * name = dm_model_layer_device(u.object, layer);
                 check(name != nullptr);
                 return native_text(name);
             },
             py::arg("layer"), "The device computing layer il (n_layer: the output layer).")
        .def_property_readonly("n_repacked", with_model(dm_model_n_repacked))
        .def_property_readonly("adapter_info", with_model([](const dm_model * model) -> py::object {
            const char * info = dm_model_adapter_info(model);
            return info ? py::object(native_text(info)) : py::object(py::none());
        }))
        .def("close", &ModelHandle::close, "Waits for the calls in flight, then drops the weights (contexts keep them).")
        .def_property_readonly("closed", &ModelHandle::closed)
        .def_property_readonly("arch", with_model([](const dm_model * model) { return native_text(dm_model_arch(model)); }))
        .def_property_readonly("n_vocab", with_model(dm_model_n_vocab))
        .def_property_readonly("n_ctx_train", with_model(dm_model_n_ctx_train))
        .def_property_readonly("n_layer", with_model(dm_model_n_layer))
        .def_property_readonly("n_embd", with_model(dm_model_n_embd))
        .def("metadata_items", &metadata_items);

    py::class_<ContextHandle>(m, "Context")
        .def(py::init(&new_context), py::arg("model"), py::arg("n_ctx"), py::arg("n_batch"), py::arg("n_threads"),
             py::arg("kv_type"), py::arg("dmem_fused") = true, py::arg("poll") = 50)
        .def("close", &ContextHandle::close, "Aborts the call in flight (another thread's), waits for it, frees the context.")
        .def_property_readonly("closed", &ContextHandle::closed)
        .def_property_readonly("n_ctx", context_call(dm_context_n_ctx))
        .def_property_readonly("n_past", context_call(dm_context_n_past))
        .def_property_readonly("n_splits", context_call(dm_context_n_splits))
        .def("reset", context_call(dm_context_reset))
        .def("decode", &decode, py::arg("tokens"), py::arg("which"), py::arg("seg_ids") = py::none(),
             py::arg("write") = true)
        .def("memory_get", &memory_get, "The δ-mem state, flat float32 [layers * H * r * r].")
        .def("memory_set", &memory_set, py::arg("values"))
        .def("memory_reset", context_call(dm_memory_reset))
        .def("kv_get", &kv_get, "KV rows of the sequence, as bytes.")
        .def("kv_set", &kv_set, py::arg("tokens"), py::arg("data"))
        .def("tokens", &context_tokens, "The token ids of the sequence so far.")
        .def("truncate",
             [](ContextHandle & self, const py::handle & n) {
                 const int32_t keep = int32_arg(n, "n");
                 ContextHandle::use u(self);
                 self.check(dm_context_truncate(u.object, keep) == 0);
             },
             py::arg("n"), "Keeps the first n tokens of the sequence.");

    m.def("decode_batch", &decode_batch, py::arg("contexts"), py::arg("tokens"), py::arg("which"), py::arg("seg_ids"),
          py::arg("writes"), "One forward pass (or a few) over the new tokens of several contexts of one model.");

    m.attr("LOGITS_NONE") = static_cast<int>(DM_LOGITS_NONE);
    m.attr("LOGITS_LAST") = static_cast<int>(DM_LOGITS_LAST);
    m.attr("LOGITS_ALL") = static_cast<int>(DM_LOGITS_ALL);
    m.attr("KV_F16") = static_cast<int>(DM_KV_F16);
    m.attr("KV_F32") = static_cast<int>(DM_KV_F32);
}
