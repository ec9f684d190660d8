#include "graph/graph.h"

#include "context/kv_cache.h"
#include "dmem/dmem_graph.h"

#include <algorithm>

#include <cmath>

namespace {

// Shared state of one graph build; each method builds one part of a layer.
struct forward_builder {
    ggml_context *         ctx;
    const dm_model &       model;
    const dm_hparams &     hp;
    const dm_kv_cache &    kv;
    const dm_graph_shape & shape;
    ggml_cgraph *          gf;
    dm_dmem_builder *      dmem;   // nullptr: no δ-mem in this pass
    dm_graph_inputs        in;

    ggml_tensor * rms_norm(ggml_tensor * x, ggml_tensor * weight) const {
        return ggml_mul(ctx, ggml_rms_norm(ctx, x, hp.rms_eps), weight);
    }

    ggml_tensor * linear(ggml_tensor * w, ggml_tensor * x, ggml_tensor * bias) const {
        return dm_linear{w, bias, false}.apply(ctx, x);
    }

    // x: [head_dim, n_heads, n_tokens]
    ggml_tensor * rope(ggml_tensor * x, const dm_layer & l) const {
        return ggml_rope_ext(ctx, x, in.pos, l.rope_freqs, hp.n_rot, hp.rope_mode, hp.n_ctx_train,
                             hp.rope_freq_base, /*freq_scale*/ 1.0f, /*ext_factor*/ 0.0f, /*attn_factor*/ 1.0f,
                             /*beta_fast*/ 32.0f, /*beta_slow*/ 1.0f);
    }

    // Writes this pass's keys or values into the cache cells named by the kv_idx input.
    void store(ggml_tensor * cache, ggml_tensor * cur /* [width, n_tokens] */) const {
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, cache, cur, in.kv_idx));
    }

    // The first n_kv cached rows of a layer as [head_dim, n_kv, n_head_kv].
    ggml_tensor * cached_heads(ggml_tensor * cache, int64_t head_dim) const {
        const int64_t n_heads = cache->ne[0] / head_dim;
        ggml_tensor * view = ggml_view_3d(ctx, cache, head_dim, n_heads, shape.n_kv,
                                          ggml_row_size(cache->type, head_dim), cache->nb[1], 0);
        return ggml_permute(ctx, view, 0, 2, 1, 3);
    }

    // Self-attention of layer il on normalised input x: [n_embd, n_tokens] -> [n_embd, n_tokens],
    // before Δo (add_attention applies it); the δ-mem reads [n_tokens, D] go to *reads.
    ggml_tensor * attention(int il, ggml_tensor * x, ggml_tensor ** reads_out) {
        const dm_layer & l = model.layers[il];
        const int64_t n_tokens = shape.n_tokens;

        // δ-mem reads the memory from the same normalised input; its corrections go in
        // before q/k-norm and RoPE (Δq, Δk, Δv) and after the output projection (Δo).
        const dm_dmem_layer * dl = dmem_layer(il);
        const dm_dmem_packed * dw = dl ? &dmem->weights(*dl) : nullptr;
        ggml_tensor * q = nullptr;        // [n_embd_q, n_tokens]
        ggml_tensor * reads = nullptr;    // [n_tokens, D]
        if (dl) {   // q, when it is a delta head, comes corrected out of the memory op
            const dm_linear wq = dw->dq_t ? dm_linear{l.wq, l.bq, l.wq->buffer != model.repacked.buf}
                                          : dm_linear{};
            const auto pass = dmem->read_and_write(*dl, dmem->memory.state[model.adapter->slot_of_layer[il]], x, wq, dw->dq_t);
            reads = pass.reads;
            q = pass.corrected;
        }
        if (!q) q = linear(l.wq, x, l.bq);
        ggml_tensor * k = correct(dl, linear(l.wk, x, l.bk), dw ? dw->dk_t : nullptr, reads);   // [n_embd_kv, n_tokens]
        ggml_tensor * v = correct(dl, linear(l.wv, x, l.bv), dw ? dw->dv_t : nullptr, reads);   // [n_embd_v_gqa, n_tokens]

        q = ggml_reshape_3d(ctx, q, hp.head_dim_k, hp.n_head, n_tokens);
        k = ggml_reshape_3d(ctx, k, hp.head_dim_k, hp.n_head_kv, n_tokens);
        if (l.q_norm) q = rms_norm(q, l.q_norm);
        if (l.k_norm) k = rms_norm(k, l.k_norm);
        if (hp.rope_layer[il]) {
            q = rope(q, l);
            k = rope(k, l);
        }

        store(kv.k[il], ggml_reshape_2d(ctx, k, hp.n_embd_kv(), n_tokens));
        store(kv.v[il], v);

        ggml_tensor * qh = ggml_permute(ctx, q, 0, 2, 1, 3);   // [head_dim, n_tokens, n_head]
        ggml_tensor * kh = cached_heads(kv.k[il], hp.head_dim_k);
        ggml_tensor * vh = cached_heads(kv.v[il], hp.head_dim_v);
        const float scale = 1.0f / std::sqrt(static_cast<float>(hp.head_dim_k));
        ggml_tensor * att = ggml_flash_attn_ext(ctx, qh, kh, vh, in.mask, scale, 0.0f, 0.0f);
        ggml_flash_attn_ext_set_prec(att, GGML_PREC_F32);
        att = ggml_reshape_2d(ctx, att, hp.n_embd_o(), n_tokens);   // [n_embd_o, n_tokens]

        *reads_out = reads;
        return linear(l.wo, att, l.bo);   // [n_embd, n_tokens]
    }

    const dm_dmem_layer * dmem_layer(int il) const { return dmem ? model.adapter->for_layer(il) : nullptr; }

    // h + the attention output + Δo (when o is a delta head): one op in the fused path. The
    // attention output may hold only the last of the pass's tokens (then h does too).
    ggml_tensor * add_attention(int il, ggml_tensor * h, ggml_tensor * attn_out, ggml_tensor * reads) const {
        const dm_dmem_layer * dl = dmem_layer(il);
        ggml_tensor * w = dl ? dmem->weights(*dl).do_t : nullptr;   // W_Δoᵀ
        if (!w) return ggml_add(ctx, h, attn_out);
        if (!dl->do_norm) return dmem->correct(*dl, attn_out, w, reads, h);
        ggml_tensor * d = dmem->correction(w, reads, attn_out->ne[1]);   // [n_embd, m]
        d = ggml_mul(ctx, ggml_rms_norm(ctx, d, model.adapter->cfg.delta_o_rmsnorm_eps), dl->do_norm);
        return ggml_add(ctx, ggml_add(ctx, h, attn_out), d);
    }

    // y + W_Δ o, the low-rank correction of one projection (scales are folded into W_Δ).
    ggml_tensor * correct(const dm_dmem_layer * dl, ggml_tensor * y, ggml_tensor * w_delta_t, ggml_tensor * reads) const {
        return w_delta_t ? dmem->correct(*dl, y, w_delta_t, reads) : y;
    }

    ggml_tensor * feed_forward(int il, ggml_tensor * x) const {
        const dm_layer & l = model.layers[il];
        ggml_tensor * gate = ggml_mul_mat(ctx, l.ffn_gate, x);   // [n_ff, n_tokens]
        ggml_tensor * up   = ggml_mul_mat(ctx, l.ffn_up, x);
        return ggml_mul_mat(ctx, l.ffn_down, ggml_swiglu_split(ctx, gate, up));
    }

    void make_inputs() {
        in.tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, shape.n_tokens);
        in.pos    = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, shape.n_tokens);
        in.mask   = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, shape.n_kv, shape.n_tokens);
        in.kv_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, shape.n_tokens);
        ggml_set_name(in.tokens, "inp_tokens");
        ggml_set_name(in.pos, "inp_pos");
        ggml_set_name(in.mask, "inp_mask");
        ggml_set_name(in.kv_idx, "inp_kv_idx");
        for (ggml_tensor * t : {in.tokens, in.pos, in.mask, in.kv_idx}) ggml_set_input(t);
    }

    // The last token's column of x: [n_embd, n_tokens] -> [n_embd, 1].
    ggml_tensor * last_column(ggml_tensor * x) const {
        return ggml_view_2d(ctx, x, x->ne[0], 1, x->nb[1], x->nb[1] * (x->ne[1] - 1));
    }

    dm_graph build() {
        make_inputs();
        if (dmem) dmem->make_inputs();
        // When only the last token's logits are wanted, the last layer's residual and FFN run on
        // that token alone (attention still writes every token's K/V into the cache).
        const bool last_only = shape.n_outputs == 1 && shape.n_tokens > 1;
        ggml_tensor * h = ggml_get_rows(ctx, model.tok_embd, in.tokens);   // [n_embd, n_tokens]
        for (int il = 0; il < hp.n_layer; ++il) {
            ggml_tensor * reads = nullptr;
            ggml_tensor * attn_out = attention(il, rms_norm(h, model.layers[il].attn_norm), &reads);
            if (last_only && il == hp.n_layer - 1) {
                attn_out = last_column(attn_out);
                h = last_column(h);
            }
            h = add_attention(il, h, attn_out, reads);
            h = ggml_add(ctx, h, feed_forward(il, rms_norm(h, model.layers[il].ffn_norm)));
        }

        dm_graph g;
        g.gf = gf;
        g.in = in;
        if (shape.n_outputs > 0) {
            g.logits = ggml_mul_mat(ctx, model.output, rms_norm(h, model.output_norm));   // [n_vocab, n_outputs]
            ggml_set_name(g.logits, "logits");
            ggml_set_output(g.logits);
            ggml_build_forward_expand(gf, g.logits);
        }
        return g;
    }
};

} // namespace

int32_t dm_padded_n_kv(int32_t n_used, int32_t n_ctx) {
    constexpr int32_t pad = 256;
    return std::min(n_ctx, (n_used + pad - 1) / pad * pad);
}

size_t dm_graph_max_nodes(const dm_model & model) {
    size_t n = static_cast<size_t>(model.hp.n_layer) * 96 + 256;
    if (model.adapter) n += model.adapter->layers.size() * 160;   // the device scan is the larger formulation
    return std::max<size_t>(2048, n);
}

dm_graph dm_build_forward(ggml_context * ctx, ggml_cgraph * gf, const dm_model & model, const dm_kv_cache & kv,
                          const dm_graph_shape & shape, dm_dmem_builder * dmem) {
    forward_builder b{ctx, model, model.hp, kv, shape, gf, dmem, {}};
    return b.build();
}
