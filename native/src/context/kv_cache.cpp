#include "context/kv_cache.h"

#include "common/error.h"
#include "model/model.h"

void dm_kv_cache::init(const dm_model & model, int32_t n_ctx_, ggml_type type_) {
    type = type_;
    n_ctx = n_ctx_;
    const dm_hparams & hp = model.hp;
    const size_t n_tensors = 2 * static_cast<size_t>(hp.n_layer);
    for (int il = 0; il < hp.n_layer; ++il) {
        ggml_context * ctx = storage.context_for(dm_layer_buffer_type(model.placement.layer[il]), n_tensors);
        k.push_back(ggml_new_tensor_2d(ctx, type, hp.n_embd_kv(), n_ctx));
        v.push_back(ggml_new_tensor_2d(ctx, type, hp.n_embd_v_gqa(), n_ctx));
        ggml_format_name(k.back(), "cache_k_l%d", il);
        ggml_format_name(v.back(), "cache_v_l%d", il);
    }
    // Unwritten cells are masked out, but zeroing them keeps NaN patterns out of masked dot products.
    storage.allocate(dm::format("the KV cache (%d tokens)", n_ctx).c_str());
}

size_t dm_kv_cache::bytes_per_token() const {
    size_t n = 0;
    for (size_t il = 0; il < k.size(); ++il) n += k[il]->nb[1] + v[il]->nb[1];
    return n;
}
