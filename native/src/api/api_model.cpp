// C API for models and contexts: argument checks and exception-to-error translation only.
#include <deltamem.h>

#include "common/error.h"
#include "common/log.h"
#include "context/context.h"
#include "model/model.h"

#include <ggml-backend.h>
#include <ggml-cpu.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

const char * dm_last_error(void) { return dm::last_error(); }

static std::string cpu_backend_features() {
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    auto get_features = reinterpret_cast<ggml_backend_get_features_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features"));
    std::string info;
    for (const ggml_backend_feature * f = get_features ? get_features(reg) : nullptr; f && f->name; ++f) {
        info += (info.empty() ? "" : " | ") + std::string(f->name) + " = " + f->value;
    }
    return info;
}

const char * dm_system_info(void) {
    static const std::string info = cpu_backend_features();
    return info.c_str();
}

dm_model_params dm_model_default_params(void) {
    dm_model_params p{};
    p.adapter_path = nullptr;
    p.use_mmap = true;
    p.use_repack = true;
    return p;
}

dm_model * dm_model_load(const char * path, dm_model_params params) {
    return dm::guard<dm_model *>(nullptr, [&] {
        if (!path) dm::fail("model path is NULL");
        dm::install_ggml_log();
        auto model = std::make_unique<dm_model>();
        dm_model_load_file(*model, path, params.use_mmap, params.use_repack);
        dm_model_attach_adapter(*model, params.adapter_path ? params.adapter_path : "", params.use_mmap);
        return model.release();
    });
}

void dm_model_free(dm_model * model) { delete model; }

const char * dm_model_arch(const dm_model * model) { return model->arch_name.c_str(); }
int32_t dm_model_n_vocab(const dm_model * model) { return model->hp.n_vocab; }
int32_t dm_model_n_ctx_train(const dm_model * model) { return model->hp.n_ctx_train; }
int32_t dm_model_n_layer(const dm_model * model) { return model->hp.n_layer; }
int32_t dm_model_n_embd(const dm_model * model) { return model->hp.n_embd; }
int32_t dm_model_n_repacked(const dm_model * model) { return model->repacked.n_tensors; }

int32_t dm_model_meta_count(const dm_model * model) { return static_cast<int32_t>(model->meta_keys.size()); }

static bool meta_index_ok(const dm_model * model, int32_t i) {
    return i >= 0 && i < dm_model_meta_count(model);
}

const char * dm_model_meta_key(const dm_model * model, int32_t i) {
    return meta_index_ok(model, i) ? model->meta_keys[i].c_str() : nullptr;
}

const char * dm_model_meta_type(const dm_model * model, int32_t i) {
    return meta_index_ok(model, i) ? model->meta_types[i].c_str() : nullptr;
}

int32_t dm_model_meta_value(const dm_model * model, int32_t i, char * buf, size_t size) {
    if (!meta_index_ok(model, i)) return -1;
    const std::string & v = model->meta_values[i];
    if (buf && size > 0) {
        const size_t n = std::min(size - 1, v.size());
        std::memcpy(buf, v.data(), n);
        buf[n] = '\0';
    }
    return static_cast<int32_t>(v.size());
}

dm_context_params dm_context_default_params(void) {
    dm_context_params p{};
    p.n_ctx = 4096;
    p.n_batch = 512;
    p.n_threads = 0;
    p.kv_type = DM_KV_F16;
    p.dmem_fused = true;
    p.poll = 50;
    return p;
}

dm_context * dm_context_new(dm_model * model, dm_context_params params) {
    return dm::guard<dm_context *>(nullptr, [&] {
        if (!model) dm::fail("model is NULL");
        return new dm_context(*model, params);
    });
}

void dm_context_free(dm_context * ctx) { delete ctx; }

int32_t dm_context_n_ctx(const dm_context * ctx) { return ctx->params.n_ctx; }
int32_t dm_context_n_past(const dm_context * ctx) { return ctx->n_past(); }
void dm_context_reset(dm_context * ctx) { ctx->truncate(0); }

int32_t dm_decode(dm_context * ctx, const dm_token * tokens, int32_t n_tokens, dm_logits which, float * logits_out) {
    return dm::guard<int32_t>(-1, [&] {
        ctx->decode(tokens, n_tokens, which, logits_out);
        return 0;
    });
}

dm_model * dm_context_model(const dm_context * ctx) { return ctx->model; }

int32_t dm_context_tokens(const dm_context * ctx, dm_token * out, int32_t n_max) {
    const int32_t n = ctx->n_past();
    if (out) std::copy_n(ctx->tokens.begin(), std::min(n, std::max(n_max, 0)), out);
    return n;
}

int32_t dm_context_truncate(dm_context * ctx, int32_t n) {
    return dm::guard<int32_t>(-1, [&] {
        ctx->truncate(n);
        return 0;
    });
}
