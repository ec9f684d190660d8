// C API for models: argument checks and exception-to-error translation only.
#include <deltamem.h>

#include "common/error.h"
#include "common/log.h"
#include "model/model.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

dm_model_params dm_model_default_params(void) {
    dm_model_params p{};
    p.adapter_path = nullptr;
    p.use_mmap = true;
    p.use_repack = true;
    p.n_gpu_layers = 0;
    p.main_gpu = 0;
    p.tensor_split = nullptr;
    p.n_tensor_split = 0;
    p.rpc_servers = nullptr;
    return p;
}

dm_model * dm_model_load(const char * path, dm_model_params params) {
    return dm::guard<dm_model *>(nullptr, [&] {
        if (!path) dm::fail("model path is NULL");
        dm::install_ggml_log();
        auto model = std::make_unique<dm_model>();
        dm_placement_params placement;
        placement.n_gpu_layers = params.n_gpu_layers;
        placement.main_gpu = params.main_gpu;
        if (params.n_tensor_split < 0 || (params.n_tensor_split > 0 && !params.tensor_split)) {
            dm::fail("tensor_split is NULL or n_tensor_split (%d) is negative", params.n_tensor_split);
        }
        placement.tensor_split.assign(params.tensor_split, params.tensor_split + params.n_tensor_split);
        placement.rpc_servers = params.rpc_servers ? params.rpc_servers : "";
        dm_model_load_file(*model, path, params.use_mmap, params.use_repack, placement);
        dm_model_attach_adapter(*model, params.adapter_path ? params.adapter_path : "", params.use_mmap);
        return model.release();
    });
}

void dm_model_free(dm_model * model) { delete model; }

static const dm_model & model_of(const dm_model * model) { return dm::deref(model, "model"); }

const char * dm_model_arch(const dm_model * model) {
    return dm::guard<const char *>(nullptr, [&] { return model_of(model).arch_name.c_str(); });
}

// The hyper-parameter getters: the value, or -1 for a NULL model.
template <typename Get>
static int32_t model_number(const dm_model * model, Get get) {
    return dm::guard<int32_t>(-1, [&] { return static_cast<int32_t>(get(model_of(model))); });
}

int32_t dm_model_n_vocab(const dm_model * model) { return model_number(model, [](const dm_model & m) { return m.hp.n_vocab; }); }
int32_t dm_model_n_ctx_train(const dm_model * model) { return model_number(model, [](const dm_model & m) { return m.hp.n_ctx_train; }); }
int32_t dm_model_n_layer(const dm_model * model) { return model_number(model, [](const dm_model & m) { return m.hp.n_layer; }); }
int32_t dm_model_n_embd(const dm_model * model) { return model_number(model, [](const dm_model & m) { return m.hp.n_embd; }); }
int32_t dm_model_n_repacked(const dm_model * model) { return model_number(model, [](const dm_model & m) { return m.repacked.n_tensors; }); }
int32_t dm_model_meta_count(const dm_model * model) { return model_number(model, [](const dm_model & m) { return m.meta_keys.size(); }); }

// Metadata entry i of model (its key, type name and rendered value share the index).
static size_t meta_index(const dm_model * model, int32_t i) {
    const int32_t n = static_cast<int32_t>(model_of(model).meta_keys.size());
    if (i < 0 || i >= n) dm::fail("metadata index %d is outside [0, %d)", i, n);
    return static_cast<size_t>(i);
}

const char * dm_model_meta_key(const dm_model * model, int32_t i) {
    return dm::guard<const char *>(nullptr, [&] { return model->meta_keys[meta_index(model, i)].c_str(); });
}

const char * dm_model_meta_type(const dm_model * model, int32_t i) {
    return dm::guard<const char *>(nullptr, [&] { return model->meta_types[meta_index(model, i)].c_str(); });
}

int32_t dm_model_meta_value(const dm_model * model, int32_t i, char * buf, size_t size) {
    return dm::guard<int32_t>(-1, [&] {
        const std::string & v = model->meta_values[meta_index(model, i)];
        if (buf && size > 0) {
            const size_t n = std::min(size - 1, v.size());
            std::memcpy(buf, v.data(), n);
            buf[n] = '\0';
        }
        return static_cast<int32_t>(v.size());
    });
}

const char * dm_model_layer_device(const dm_model * model, int32_t il) {
    return dm::guard<const char *>(nullptr, [&] {
        const dm_model & m = model_of(model);
        if (il < 0 || il > m.hp.n_layer) dm::fail("layer %d is outside [0, %d]", il, m.hp.n_layer);
        ggml_backend_dev_t dev = il == m.hp.n_layer ? m.placement.output : m.placement.layer[il];
        return dev ? ggml_backend_dev_name(dev) : "CPU";
    });
}
