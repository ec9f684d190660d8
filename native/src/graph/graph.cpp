#include "graph/graph.h"

#include "attention/attention_cpu.h"
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
    dm_attention_ops       attention_ops;   // the CPU attention ops' userdata, handed to the graph
    dm_matmuls             matmuls;         // the weight mat-muls (shared quantised inputs)

    ggml_tensor * rms_norm(ggml_tensor * x, ggml_tensor * weight) const {
        return ggml_mul(ctx, ggml_rms_norm(ctx, x, hp.rms_eps), weight);
    }

    ggml_tensor * linear(ggml_tensor * w, ggml_tensor * x, ggml_tensor * bias) {
        return dm_linear{w, bias, false}.apply(matmuls, x);
    }

    // x: [head_dim, n_heads, n_tokens]
    ggml_tensor * rope(ggml_tensor * x, const dm_layer & l) const {
        return ggml_rope_ext(ctx, x, in.pos, l.rope_freqs, hp.n_rot, hp.rope_mode, hp.n_ctx_train,
                             hp.rope_freq_base, /*freq_scale*/ 1.0f, /*ext_factor*/ 0.0f, /*attn_factor*/ 1.0f,
                             /*beta_fast*/ 32.0f, /*beta_slow*/ 1.0f);
    }

    // One sequence's view of a pass: its cache, the cells it attends and writes, its mask.
    struct seq_attention {
        const dm_kv_cache * kv;
        int32_t             n_kv;     // cache cells attended
        ggml_tensor *       mask;     // [n_kv, n_tokens] f16
        ggml_tensor *       kv_idx;   // [n_tokens] i64, the cells this pass writes
    };

    // The first n_kv cached rows of a layer as [head_dim, n_kv, n_head_kv].
    ggml_tensor * cached_heads(ggml_tensor * cache, int64_t head_dim, int32_t n_kv) const {
        const int64_t n_heads = cache->ne[0] / head_dim;
        ggml_tensor * view = ggml_view_3d(ctx, cache, head_dim, n_heads, n_kv,
                                          ggml_row_size(cache->type, head_dim), cache->nb[1], 0);
        return ggml_permute(ctx, view, 0, 2, 1, 3);
    }

    // q, k and v of layer il for n tokens of x, with their δ-mem corrections from the reads
    // [n, D] (none: null) and q already corrected when given; normalised and rotated.
    struct qkv { ggml_tensor * q, * k, * v; };   // [head_dim, n_head(_kv), n], v [n_embd_v_gqa, n]
    qkv project(int il, ggml_tensor * x, ggml_tensor * q, ggml_tensor * reads) {
        const dm_layer & l = model.layers[il];
        const dm_dmem_layer * dl = reads ? dmem_layer(il) : nullptr;
        const dm_dmem_packed * dw = dl ? &dmem->weights(*dl) : nullptr;
        const int64_t n = x->ne[1];
        if (!q) q = correct(dl, linear(l.wq, x, l.bq), dw ? dw->dq_t : nullptr, reads);
        ggml_tensor * k = correct(dl, linear(l.wk, x, l.bk), dw ? dw->dk_t : nullptr, reads);   // [n_embd_kv, n]
        ggml_tensor * v = correct(dl, linear(l.wv, x, l.bv), dw ? dw->dv_t : nullptr, reads);   // [n_embd_v_gqa, n]
        q = ggml_reshape_3d(ctx, q, hp.head_dim_k, hp.n_head, n);
        k = ggml_reshape_3d(ctx, k, hp.head_dim_k, hp.n_head_kv, n);
        if (l.q_norm) q = rms_norm(q, l.q_norm);
        if (l.k_norm) k = rms_norm(k, l.k_norm);
        if (hp.rope_layer[il]) {
            q = rope(q, l);
            k = rope(k, l);
        }
        return {q, k, v};
    }

    // Stores one sequence's keys and values of layer il and attends over its cache: [n_embd_o, n].
    ggml_tensor * attend(int il, const qkv & t, const seq_attention & s) const {
        const int64_t n = t.q->ne[2];
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, s.kv->k[il], ggml_reshape_2d(ctx, t.k, hp.n_embd_kv(), n), s.kv_idx));
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, s.kv->v[il], t.v, s.kv_idx));
        ggml_tensor * qh = ggml_permute(ctx, t.q, 0, 2, 1, 3);   // [head_dim, n, n_head]
        ggml_tensor * kh = cached_heads(s.kv->k[il], hp.head_dim_k, s.n_kv);
        ggml_tensor * vh = cached_heads(s.kv->v[il], hp.head_dim_v, s.n_kv);
        const float scale = 1.0f / std::sqrt(static_cast<float>(hp.head_dim_k));
        ggml_tensor * att = ggml_flash_attn_ext(ctx, qh, kh, vh, s.mask, scale, 0.0f, 0.0f);
        ggml_flash_attn_ext_set_prec(att, GGML_PREC_F32);
        return ggml_reshape_2d(ctx, att, hp.n_embd_o(), n);
    }

    // The CPU attention op over the tokens of t, those of the sequences whose caches are given (in
    // order), their lengths in seqs: [n_embd_o, n_tokens].
    ggml_tensor * attend_cpu(int il, const qkv & t, const std::vector<const dm_kv_cache *> & caches, ggml_tensor * seqs) {
        const int64_t n_tokens = t.q->ne[2];
        auto op = std::make_shared<dm_attention_op>();
        for (const dm_kv_cache * c : caches) {
            op->k_cache.push_back(c->k[il]);
            op->v_cache.push_back(c->v[il]);
        }
        op->scale = 1.0f / std::sqrt(static_cast<float>(hp.head_dim_k));
        ggml_tensor * args[] = {t.q, t.k, t.v, seqs};
        ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, hp.n_embd_o(), n_tokens, 1, 1, args, 4, dm_attention_op_cpu,
                                           GGML_N_TASKS_MAX, op.get());
        attention_ops.push_back(std::move(op));
        ggml_build_forward_expand(gf, out);   // it writes the caches: it runs even where nothing reads it
        return out;
    }

    bool cpu_attention(int il) const { return model.placement.on_cpu(il); }

    // Self-attention of layer il on normalised input x: [n_embd, n_tokens] -> [n_embd, n_tokens],
    // before Δo (add_attention applies it); the δ-mem reads [n_tokens, D] go to *reads.
    ggml_tensor * attention(int il, ggml_tensor * x, ggml_tensor ** reads_out) {
        const dm_layer & l = model.layers[il];
        // δ-mem reads the memory from the same normalised input; its corrections go in
        // before q/k-norm and RoPE (Δq, Δk, Δv) and after the output projection (Δo).
        const dm_dmem_layer * dl = dmem_layer(il);
        ggml_tensor * q = nullptr;        // [n_embd_q, n_tokens]
        ggml_tensor * reads = nullptr;    // [n_tokens, D]
        if (dl) {   // q, when it is a delta head, comes corrected out of the memory op
            const dm_dmem_packed & dw = dmem->weights(*dl);
            const dm_linear wq = dw.dq_t ? dm_linear{l.wq, l.bq, l.wq->buffer != model.repacked.ggml_repack.buf} : dm_linear{};
            const auto pass = dmem->read_and_write(*dl, dmem->memory.state[model.adapter->slot_of_layer[il]], x, wq, dw.dq_t,
                                                    matmuls);
            reads = pass.reads;
            q = pass.corrected;
        }
        const qkv t = project(il, x, q, reads);
        *reads_out = reads;
        ggml_tensor * att = cpu_attention(il) ? attend_cpu(il, t, {&kv}, in.seqs)
                                              : attend(il, t, {&kv, shape.n_kv, in.mask, in.kv_idx});
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

    ggml_tensor * feed_forward(int il, ggml_tensor * x) {
        const dm_layer & l = model.layers[il];
        ggml_tensor * gate = matmuls.mul(l.ffn_gate, x);   // [n_ff, n_tokens]
        ggml_tensor * up   = matmuls.mul(l.ffn_up, x);
        return matmuls.mul(l.ffn_down, ggml_swiglu_split(ctx, gate, up));
    }

    void make_inputs() {
        in.tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, shape.n_tokens);
        in.pos    = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, shape.n_tokens);
        in.mask   = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, shape.n_kv, shape.n_tokens);
        in.kv_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, shape.n_tokens);
        in.seqs   = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 2, 1);
        ggml_set_name(in.tokens, "inp_tokens");
        ggml_set_name(in.pos, "inp_pos");
        ggml_set_name(in.mask, "inp_mask");
        ggml_set_name(in.kv_idx, "inp_kv_idx");
        ggml_set_name(in.seqs, "inp_seqs");
        for (ggml_tensor * t : {in.tokens, in.pos, in.mask, in.kv_idx, in.seqs}) ggml_set_input(t);
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
        g.attention_ops = std::move(attention_ops);
        if (shape.n_outputs > 0) {
            g.logits = matmuls.mul(model.output, rms_norm(h, model.output_norm));   // [n_vocab, n_outputs]
            ggml_set_name(g.logits, "logits");
            ggml_set_output(g.logits);
            ggml_build_forward_expand(gf, g.logits);
        }
        return g;
    }

    // ---- a batched pass: several sequences, weights read once for all their tokens -------------

    // Tokens [first, first + n) of m, whose tokens are its dimension 1 ([width, T]) or 2 ([width, heads, T]).
    ggml_tensor * columns(ggml_tensor * m, int token_dim, int64_t first, int64_t n) const {
        return token_dim == 1 ? ggml_view_2d(ctx, m, m->ne[0], n, m->nb[1], first * m->nb[1])
                              : ggml_view_3d(ctx, m, m->ne[0], m->ne[1], n, m->nb[1], m->nb[2], first * m->nb[2]);
    }

    static ggml_tensor * append(ggml_context * c, ggml_tensor * a, ggml_tensor * b, int dim) {
        return a ? ggml_concat(c, a, b, dim) : b;
    }

    // Layer il's attention for every sequence of the batch: the projections (δ-mem's too) over all
    // tokens at once, each sequence's memory scan over its own state and its attention over its
    // own cache. x [n_embd, T] -> [n_embd, T]; the reads [T, D] go to *reads_out.
    ggml_tensor * batch_attention(int il, ggml_tensor * x, std::vector<dm_batch_seq> & seqs, ggml_tensor ** reads_out) {
        const dm_layer & l = model.layers[il];
        const dm_dmem_layer * dl = dmem_layer(il);
        ggml_tensor * reads = nullptr;   // [T, D]
        if (dl) {
            ggml_tensor * packed = ggml_mul_mat(ctx, dl->f32.w_in, x);   // [3D + G (+ G), T]
            const int32_t slot = model.adapter->slot_of_layer[il];
            std::vector<ggml_tensor *> states;
            for (const dm_batch_seq & s : seqs) states.push_back(s.dmem->memory.state[slot]);
            reads = seqs.front().dmem->scan_batch(*dl, states, packed, in.dmem_plans, in.seqs);
            if (!reads) {   // device layers: a scan per sequence
                int64_t first = 0;
                for (size_t i = 0; i < seqs.size(); ++i) {
                    const int64_t n = seqs[i].shape.n_tokens;
                    reads = append(ctx, reads, seqs[i].dmem->scan_projected(*dl, states[i], columns(packed, 1, first, n)), 0);
                    first += n;
                }
            }
        }
        const qkv t = project(il, x, nullptr, reads);
        ggml_tensor * att = nullptr;   // [n_embd_o, T]
        if (cpu_attention(il)) {
            std::vector<const dm_kv_cache *> caches;
            for (const dm_batch_seq & s : seqs) caches.push_back(s.kv);
            att = attend_cpu(il, t, caches, in.seqs);
        } else {
            int64_t first = 0;
            for (const dm_batch_seq & s : seqs) {
                const int64_t n = s.shape.n_tokens;
                const qkv ts{columns(t.q, 2, first, n), columns(t.k, 2, first, n), columns(t.v, 1, first, n)};
                att = append(ctx, att, attend(il, ts, {s.kv, s.shape.n_kv, s.mask, s.kv_idx}), 1);
                first += n;
            }
        }
        *reads_out = reads;
        return linear(l.wo, att, l.bo);
    }

    dm_batch_graph build_batch(std::vector<dm_batch_seq> & seqs) {
        int64_t n_out = 0;
        for (dm_batch_seq & s : seqs) {
            s.mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, s.shape.n_kv, s.shape.n_tokens);
            s.kv_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, s.shape.n_tokens);
            ggml_set_input(s.mask);
            ggml_set_input(s.kv_idx);
            if (s.dmem) s.dmem->make_inputs();
            n_out += s.shape.n_outputs;
        }
        in.tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, shape.n_tokens);
        in.pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, shape.n_tokens);
        ggml_set_input(in.tokens);
        ggml_set_input(in.pos);
        in.seqs = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 2, static_cast<int64_t>(seqs.size()));
        ggml_set_input(in.seqs);
        if (model.adapter) {
            in.dmem_plans = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, shape.n_tokens + static_cast<int64_t>(seqs.size()));
            ggml_set_input(in.dmem_plans);
        }
        ggml_tensor * h = ggml_get_rows(ctx, model.tok_embd, in.tokens);   // [n_embd, T]
        for (int il = 0; il < hp.n_layer; ++il) {
            ggml_tensor * reads = nullptr;
            ggml_tensor * attn_out = batch_attention(il, rms_norm(h, model.layers[il].attn_norm), seqs, &reads);
            h = add_attention(il, h, attn_out, reads);
            h = ggml_add(ctx, h, feed_forward(il, rms_norm(h, model.layers[il].ffn_norm)));
        }
        dm_batch_graph g;
        g.gf = gf;
        g.tokens = in.tokens;
        g.pos = in.pos;
        g.seqs = in.seqs;
        g.dmem_plans = in.dmem_plans;
        g.attention_ops = std::move(attention_ops);
        if (n_out > 0) {
            g.out_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_out);
            ggml_set_input(g.out_idx);
            ggml_tensor * rows = ggml_get_rows(ctx, h, g.out_idx);   // [n_embd, n_out]
            g.logits = matmuls.mul(model.output, rms_norm(rows, model.output_norm));   // [n_vocab, n_out]
            ggml_set_output(g.logits);
            ggml_build_forward_expand(gf, g.logits);
        } else {
            ggml_build_forward_expand(gf, h);   // the caches and memories are written on the way
        }
        return g;
    }
};

} // namespace

dm_batch_graph dm_build_forward_batch(ggml_context * ctx, ggml_cgraph * gf, const dm_model & model,
                                      std::vector<dm_batch_seq> & seqs) {
    dm_graph_shape total{0, 0, 0};
    for (const dm_batch_seq & s : seqs) total.n_tokens += s.shape.n_tokens;
    forward_builder b{ctx, model, model.hp, *seqs.front().kv, total, gf, seqs.front().dmem, {}, {}, {ctx, {}}};
    return b.build_batch(seqs);
}

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
    forward_builder b{ctx, model, model.hp, kv, shape, gf, dmem, {}, {}, {ctx, {}}};
    return b.build();
}
