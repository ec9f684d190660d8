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

static dm_context & context_of(dm_context * ctx) { return dm::deref(ctx, "context"); }
static const dm_context & context_of(const dm_context * ctx) { return dm::deref(ctx, "context"); }

int32_t dm_context_set_abort_callback(dm_context * ctx, dm_abort_callback callback, void * user_data) {
    return dm::guard<int32_t>(-1, [&] {
        context_of(ctx).set_abort_callback(callback, user_data);
        return 0;
    });
}

int32_t dm_context_n_ctx(const dm_context * ctx) {
    return dm::guard<int32_t>(-1, [&] { return context_of(ctx).params.n_ctx; });
}

int32_t dm_context_n_past(const dm_context * ctx) {
    return dm::guard<int32_t>(-1, [&] { return context_of(ctx).n_past(); });
}

void dm_context_reset(dm_context * ctx) {
    dm::guard<int32_t>(-1, [&] {
        context_of(ctx).truncate(0);
        return 0;
    });
}

int32_t dm_decode(dm_context * ctx, const dm_token * tokens, int32_t n_tokens, dm_logits which, float * logits_out) {
    return dm_decode_ext(ctx, tokens, n_tokens, which, logits_out, nullptr, true);
}

int32_t dm_decode_ext(dm_context * ctx, const dm_token * tokens, int32_t n_tokens, dm_logits which, float * logits_out,
                      const int32_t * seg_ids, bool write) {
    return dm::guard<int32_t>(-1, [&] {
        context_of(ctx).decode(tokens, n_tokens, which, logits_out, seg_ids, write);
        return 0;
    });
}

dm_model * dm_context_model(const dm_context * ctx) {
    return dm::guard<dm_model *>(nullptr, [&] { return context_of(ctx).model; });
}

int32_t dm_context_tokens(const dm_context * ctx, dm_token * out, int32_t n_max) {
    return dm::guard<int32_t>(-1, [&] {
        const dm_context & c = context_of(ctx);
        const int32_t n = c.n_past();
        if (out) std::copy_n(c.tokens.begin(), std::min(n, std::max(n_max, 0)), out);
        return n;
    });
}

int32_t dm_context_truncate(dm_context * ctx, int32_t n) {
    return dm::guard<int32_t>(-1, [&] {
        context_of(ctx).truncate(n);
        return 0;
    });
}

int64_t dm_context_kv_size(const dm_context * ctx) {
    return dm::guard<int64_t>(-1, [&] { return static_cast<int64_t>(context_of(ctx).kv_bytes()); });
}

int32_t dm_context_kv_get(const dm_context * ctx, void * out, int64_t size) {
    return dm::guard<int32_t>(-1, [&] {
        const dm_context & c = context_of(ctx);
        const auto need = static_cast<int64_t>(c.kv_bytes());
        if (size != need) dm::fail("KV state needs %lld bytes, buffer holds %lld", static_cast<long long>(need), static_cast<long long>(size));
        if (size > 0 && !out) dm::fail("KV state: buffer is NULL");
        c.kv_get(out);
        return 0;
    });
}

int32_t dm_context_kv_set(dm_context * ctx, const dm_token * tokens, int32_t n_tokens, const void * data, int64_t size) {
    return dm::guard<int32_t>(-1, [&] {
        dm_context & c = context_of(ctx);
        if (size < 0) dm::fail("negative state size");
        if (n_tokens > 0 && !tokens) dm::fail("state tokens are NULL");
        if (size > 0 && !data) dm::fail("state KV data is NULL");
        c.kv_set(tokens, n_tokens, data, static_cast<size_t>(size));
        return 0;
    });
}
