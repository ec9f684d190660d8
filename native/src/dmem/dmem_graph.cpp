#include "dmem/dmem_graph.h"

#include "common/error.h"
#include "dmem/dmem_cpu.h"

#include <ggml-backend.h>
#include <ggml-cpu.h>

#include <algorithm>
#include <cmath>
#include <map>

// ---- the plan of a pass ---------------------------------------------------------------------------

dm_dmem_plan dm_dmem_plan::make(const dm_dmem_config & cfg, const int32_t * ids, int32_t n_tokens, bool write) {
    dm_dmem_plan p;
    if (!write) {
        p.interleaved = false;   // every token reads the start state; no write items
        return p;
    }
    if (cfg.granularity == dm_write_granularity::token || !ids) return p;   // without ids: token writes
    std::map<int32_t, std::vector<int32_t>> members;   // ordered by id: writes go in increasing id order
    for (int32_t t = 0; t < n_tokens; ++t) {
        if (ids[t] >= 0) members[ids[t]].push_back(t);
    }
    if (members.empty()) return p;   // no id >= 0: token writes, as the official runtime falls back
    p.interleaved = false;
    for (auto & kv : members) p.items.push_back(std::move(kv.second));
    return p;
}

// ---- graph construction ----------------------------------------------------------------------------

void dm_dmem_builder::make_inputs() {
    in.plan = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_tokens + 1);
    ggml_set_name(in.plan, "dmem_plan");
    ggml_set_input(in.plan);
    if (!plan.interleaved && !plan.items.empty()) {
        in.avg = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_tokens, static_cast<int64_t>(plan.items.size()));
        ggml_set_name(in.avg, "dmem_avg");
        ggml_set_input(in.avg);
    }
}

void dm_dmem_builder::set_inputs(const dm_dmem_plan & call_plan) const {
    // plan[t] = index of the write item token t belongs to (-1: none); plan[n_tokens] = mode.
    std::vector<int32_t> codes(static_cast<size_t>(n_tokens) + 1, call_plan.interleaved ? 0 : -1);
    codes[n_tokens] = call_plan.interleaved ? 0 : 1;
    std::vector<float> avg(in.avg ? static_cast<size_t>(n_tokens) * call_plan.items.size() : 0, 0.0f);
    for (size_t k = 0; k < call_plan.items.size(); ++k) {
        for (int32_t t : call_plan.items[k]) {
            codes[t] = static_cast<int32_t>(k);
            if (in.avg) avg[k * n_tokens + t] = 1.0f / static_cast<float>(call_plan.items[k].size());
        }
    }
    // An input no node reads (the plan in portable passes, the weights in fused ones) gets no memory.
    if (in.plan->buffer) ggml_backend_tensor_set(in.plan, codes.data(), 0, ggml_nbytes(in.plan));
    if (in.avg && in.avg->buffer) ggml_backend_tensor_set(in.avg, avg.data(), 0, ggml_nbytes(in.avg));
}

dm_dmem_builder::projections dm_dmem_builder::project(const dm_dmem_layer & l, ggml_tensor * x) const {
    const int64_t D = adapter.cfg.width(), G = adapter.cfg.gate_width;
    projections p{};
    p.packed = ggml_mul_mat(ctx, l.f32.w_in, x);   // [3D + G (+ G), n]
    if (fused_ops) return p;                       // the kernel slices it and adds the gate biases itself
    auto rows = [&](int64_t first, int64_t count) {
        return ggml_cont(ctx, ggml_view_2d(ctx, p.packed, count, p.packed->ne[1], p.packed->nb[1],
                                           static_cast<size_t>(first) * sizeof(float)));
    };
    auto bias = [&](int64_t first) {
        return ggml_view_1d(ctx, l.b_in, G, static_cast<size_t>(first) * sizeof(float));
    };
    p.q = rows(0, D);
    p.k = rows(D, D);
    p.v = rows(2 * D, D);
    p.beta = ggml_add(ctx, rows(3 * D, G), bias(0));   // [G, n]
    if (l.lambda_w) p.lambda = ggml_add(ctx, rows(3 * D + G, G), bias(G));
    return p;
}

ggml_tensor * dm_dmem_builder::normalize(ggml_tensor * m) const {
    const dm_dmem_config & c = adapter.cfg;
    if (!c.normalize_qk) return m;
    ggml_tensor * h = ggml_reshape_3d(ctx, ggml_tanh(ctx, m), c.rank, c.n_heads, m->ne[1]);
    return ggml_reshape_2d(ctx, ggml_l2_norm(ctx, h, c.qk_norm_eps), c.width(), m->ne[1]);
}

ggml_tensor * dm_dmem_builder::column(ggml_tensor * m, int64_t i) const {
    return ggml_view_2d(ctx, m, m->ne[0], 1, m->nb[1], static_cast<size_t>(i) * m->nb[1]);
}

ggml_tensor * dm_dmem_builder::heads(ggml_tensor * col) const {
    return ggml_reshape_3d(ctx, ggml_cont(ctx, col), adapter.cfg.rank, 1, adapter.cfg.n_heads);
}

dm_dmem_builder::gates dm_dmem_builder::gate_values(ggml_tensor * beta_col, ggml_tensor * lambda_col) const {
    const dm_dmem_config & c = adapter.cfg;
    const bool rankwise = c.gate_width == c.width();
    const int64_t per_head = rankwise ? c.rank : 1;
    auto as_rows = [&](ggml_tensor * g) { return ggml_reshape_3d(ctx, ggml_cont(ctx, g), per_head, 1, c.n_heads); };
    auto as_state_rows = [&](ggml_tensor * g) { return ggml_reshape_3d(ctx, ggml_cont(ctx, g), 1, per_head, c.n_heads); };

    ggml_tensor * beta = ggml_sigmoid(ctx, beta_col);
    ggml_tensor * lambda = c.couple_lambda ? ggml_scale_bias(ctx, beta, -1.0f, 1.0f) : ggml_sigmoid(ctx, lambda_col);
    gates g{};
    g.write = as_rows(beta);
    switch (c.update_mode) {
        case dm_update_mode::standard:
            g.erase = g.write;
            g.keep_rows = as_state_rows(lambda);
            break;
        case dm_update_mode::lambda_outside:
            g.erase = as_rows(ggml_mul(ctx, lambda, beta));
            g.keep_rows = as_state_rows(lambda);
            break;
        case dm_update_mode::no_lambda:
            g.erase = g.write;
            g.keep_rows = nullptr;
            break;
    }
    return g;
}

// o = S m_q per head: o_i = Σ_j S[i, j] q_j.
ggml_tensor * dm_dmem_builder::read(ggml_tensor * S, ggml_tensor * q_col) const {
    ggml_tensor * o = ggml_mul_mat(ctx, S, heads(q_col));   // [r, 1, H]
    return ggml_reshape_2d(ctx, o, adapter.cfg.width(), 1);
}

// S[i, :] ← keep_i S[i, :] + (write_i v_i − erase_i (S[i, :]·k)) kᵀ
ggml_tensor * dm_dmem_builder::write(ggml_tensor * S, ggml_tensor * k_col, ggml_tensor * v_col, const gates & g) const {
    const dm_dmem_config & c = adapter.cfg;
    ggml_tensor * k = heads(k_col);                                    // [r, 1, H]
    ggml_tensor * Sk = ggml_mul_mat(ctx, S, k);                        // [r, 1, H]
    ggml_tensor * u = ggml_sub(ctx, ggml_mul(ctx, heads(v_col), g.write), ggml_mul(ctx, Sk, g.erase));
    ggml_tensor * outer = ggml_mul_mat(ctx, ggml_reshape_3d(ctx, k, 1, c.rank, c.n_heads),
                                       ggml_reshape_3d(ctx, u, 1, c.rank, c.n_heads));   // [r (j), r (i), H] = k_j u_i
    ggml_tensor * kept = g.keep_rows ? ggml_mul(ctx, S, g.keep_rows) : S;
    return ggml_add(ctx, kept, outer);
}

// Backend-portable scan: only ops every ggml backend has, unrolled over the writes of the pass.
ggml_tensor * dm_dmem_builder::portable(const projections & p, ggml_tensor * state) {
    const dm_dmem_config & c = adapter.cfg;
    ggml_tensor * qn = normalize(p.q);
    ggml_tensor * kn = normalize(p.k);
    ggml_tensor * S = state;
    ggml_tensor * o = nullptr;

    if (plan.interleaved) {
        for (int32_t t = 0; t < n_tokens; ++t) {
            ggml_tensor * o_t = read(S, column(qn, t));
            o = o ? ggml_concat(ctx, o, o_t, 1) : o_t;
            S = write(S, column(kn, t), column(p.v, t), gate_values(column(p.beta, t), p.lambda ? column(p.lambda, t) : nullptr));
        }
    } else {
        ggml_tensor * q3 = ggml_reshape_3d(ctx, qn, c.rank, c.n_heads, n_tokens);
        ggml_tensor * reads = ggml_mul_mat(ctx, state, ggml_cont(ctx, ggml_permute(ctx, q3, 0, 2, 1, 3)));   // [r, n, H]
        o = ggml_reshape_2d(ctx, ggml_cont(ctx, ggml_permute(ctx, reads, 0, 2, 1, 3)), c.width(), n_tokens);
        if (!plan.items.empty()) {
            auto mean = [&](ggml_tensor * m) { return ggml_mul_mat(ctx, ggml_cont(ctx, ggml_transpose(ctx, m)), in.avg); };
            ggml_tensor * k_mean = normalize(mean(p.k));
            ggml_tensor * v_mean = mean(p.v);
            ggml_tensor * beta_mean = mean(p.beta);
            ggml_tensor * lambda_mean = p.lambda ? mean(p.lambda) : nullptr;
            for (size_t i = 0; i < plan.items.size(); ++i) {
                const int64_t k = static_cast<int64_t>(i);
                S = write(S, column(k_mean, k), column(v_mean, k),
                          gate_values(column(beta_mean, k), lambda_mean ? column(lambda_mean, k) : nullptr));
            }
        }
    }
    // Reads of the old state must come before it is overwritten: expand them first.
    ggml_tensor * reads_t = ggml_cont(ctx, ggml_transpose(ctx, o));   // [n_tokens, D]
    ggml_build_forward_expand(gf, reads_t);
    if (S != state) ggml_build_forward_expand(gf, ggml_cpy(ctx, S, state));
    return reads_t;
}

// Up to this many tokens, the memory op projects x itself: a mat-mul node of its own would cost
// more in thread synchronisation than the few dot products.
constexpr int64_t k_few_tokens = 4;

const dm_dmem_packed & dm_dmem_builder::weights(const dm_dmem_layer & l) const {
    return fused_ops && n_tokens <= k_few_tokens && l.f16.w_in ? l.f16 : l.f32;
}

// Few tokens: the memory op computes the target's rows itself, with ggml's vec_dot, so that
// the target's mat-mul node (and its barriers) goes.
bool dm_dmem_builder::op_computes(const dm_linear & target, ggml_tensor * x) const {
    if (!target.w || !target.plain || n_tokens > k_few_tokens) return false;
    if (x->type != GGML_TYPE_F32 || !ggml_is_contiguous(x) || !ggml_is_contiguous(target.w)) return false;
    if (target.bias && (target.bias->type != GGML_TYPE_F32 || !ggml_is_contiguous(target.bias))) return false;
    const ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(target.w->type);
    return traits->vec_dot && ggml_get_type_traits_cpu(traits->vec_dot_type)->from_float;
}

dm_dmem_builder::layer_pass dm_dmem_builder::fused(const dm_dmem_layer & l, ggml_tensor * state, ggml_tensor * x,
                                                   const dm_linear & target, ggml_tensor * w_delta_t) {
    if (!op) op = std::make_shared<dm_memory_op>(adapter.cfg);
    const int64_t D = adapter.cfg.width();
    const bool project_inside = n_tokens <= k_few_tokens && ggml_is_contiguous(x);
    ggml_tensor * w_in = weights(l).w_in;
    const bool own = op_computes(target, x);
    ggml_tensor * y = target.w && !own ? target.apply(ctx, x) : nullptr;
    // Few tokens: the op copies y's rows and adds Δq, sparing a node. Many: correct() adds Δq into y
    // in place after the op, sparing a copy of [rows, n_tokens] floats through the caches.
    const bool ride = y && ggml_is_contiguous(y) && n_tokens <= k_few_tokens;
    const int64_t rows = own ? target.w->ne[1] : ride ? y->ne[0] : 0;
    const int64_t size = dm_memory_op_size(n_tokens, D, rows, project_inside ? w_in->ne[1] : 0);
    ggml_tensor * args[] = {project_inside ? x : project(l, x).packed, l.b_in, state, in.plan,
                            project_inside ? w_in : nullptr, ride ? y : nullptr, rows ? w_delta_t : nullptr,
                            own ? target.w : nullptr, own ? target.bias : nullptr};
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, size, 1, 1, 1, args, 9, dm_memory_op_cpu,
                                       GGML_N_TASKS_MAX, op.get());
    // The op also writes the state: it must run even where nothing reads o (the last layer of a prefill).
    ggml_build_forward_expand(gf, out);
    layer_pass r{};
    r.reads = ggml_view_2d(ctx, out, n_tokens, D, n_tokens * sizeof(float), 0);   // [n_tokens, D]
    if (rows) {
        r.corrected = ggml_view_2d(ctx, out, rows, n_tokens, rows * sizeof(float), n_tokens * D * sizeof(float));
    } else if (y) {
        r.corrected = correct(y, w_delta_t, r.reads);
    }
    return r;
}

dm_dmem_builder::layer_pass dm_dmem_builder::read_and_write(const dm_dmem_layer & l, ggml_tensor * state, ggml_tensor * x,
                                                            const dm_linear & target, ggml_tensor * w_delta_t) {
    if (fused_ops) return fused(l, state, x, target, w_delta_t);
    layer_pass r{};
    r.reads = portable(project(l, x), state);
    if (target.w) r.corrected = correct(target.apply(ctx, x), w_delta_t, r.reads);
    return r;
}

ggml_tensor * dm_dmem_builder::correction(ggml_tensor * w_delta_t, ggml_tensor * reads_t, int64_t m) const {
    if (m < reads_t->ne[0]) {   // the last m rows of [n, D]
        reads_t = ggml_view_2d(ctx, reads_t, m, reads_t->ne[1], reads_t->nb[1], (reads_t->ne[0] - m) * sizeof(float));
    }
    // Σ_d W_Δᵀ[:, d] ⊗ o[d, :]: an outer-product sum over the D memory dimensions.
    return ggml_out_prod(ctx, w_delta_t, reads_t);
}

ggml_tensor * dm_dmem_builder::correct(ggml_tensor * y, ggml_tensor * w_delta_t, ggml_tensor * reads_t,
                                       ggml_tensor * residual) const {
    const bool one_op = fused_ops && ggml_is_contiguous(y) && (!residual || ggml_is_contiguous(residual));
    if (!one_op) {
        ggml_tensor * sum = ggml_add(ctx, y, correction(w_delta_t, reads_t, y->ne[1]));
        return residual ? ggml_add(ctx, residual, sum) : sum;
    }
    // y is a projection that only this correction reads: the sum goes into it, sparing a copy.
    ggml_tensor * args[] = {w_delta_t, reads_t, residual};
    return ggml_custom_inplace(ctx, y, args, residual ? 3 : 2, dm_correct_cpu, GGML_N_TASKS_MAX, nullptr);
}
