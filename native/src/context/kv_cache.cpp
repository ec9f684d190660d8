#include "context/kv_cache.h"

#include "common/error.h"
#include "model/model.h"

#include <ggml-alloc.h>

dm_kv_cache::~dm_kv_cache() {
    if (buf) ggml_backend_buffer_free(buf);
    if (ctx) ggml_free(ctx);
}

void dm_kv_cache::init(const dm_model & model, int32_t n_ctx_, ggml_type type_, ggml_backend_buffer_type_t buft) {
    type = type_;
    n_ctx = n_ctx_;
    const dm_hparams & hp = model.hp;
    const size_t n_tensors = 2 * static_cast<size_t>(hp.n_layer);
    ggml_init_params params = {ggml_tensor_overhead() * n_tensors, nullptr, /*no_alloc =*/ true};
    ctx = ggml_init(params);
    if (!ctx) dm::fail("cannot create the KV cache context");
    for (int il = 0; il < hp.n_layer; ++il) {
        k.push_back(ggml_new_tensor_2d(ctx, type, hp.n_embd_kv(), n_ctx));
        v.push_back(ggml_new_tensor_2d(ctx, type, hp.n_embd_v_gqa(), n_ctx));
        ggml_format_name(k.back(), "cache_k_l%d", il);
        ggml_format_name(v.back(), "cache_v_l%d", il);
    }
    buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
    if (!buf) dm::fail("cannot allocate the KV cache (%d tokens)", n_ctx);
    // Unwritten cells are masked out, but zeroing them keeps NaN patterns out of masked dot products.
    ggml_backend_buffer_clear(buf, 0);
}

size_t dm_kv_cache::bytes_per_token() const {
    size_t n = 0;
    for (size_t il = 0; il < k.size(); ++il) n += k[il]->nb[1] + v[il]->nb[1];
    return n;
}
