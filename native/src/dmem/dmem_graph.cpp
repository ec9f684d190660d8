#include "dmem/dmem_graph.h"

#include "common/error.h"
#include "dmem/dmem_cpu.h"
#include "matmul/qmatmul.h"

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

std::vector<int32_t> dm_dmem_plan::codes(int32_t n_tokens) const {
    std::vector<int32_t> c(static_cast<size_t>(n_tokens) + 1, interleaved ? 0 : -1);
    c[static_cast<size_t>(n_tokens)] = interleaved ? 0 : 1;
    for (size_t k = 0; k < items.size(); ++k) {
        for (int32_t t : items[k]) c[static_cast<size_t>(t)] = static_cast<int32_t>(k);
    }
    return c;
}

void dm_dmem_builder::set_inputs(const dm_dmem_plan & call_plan) const {
    const std::vector<int32_t> codes = call_plan.codes(n_tokens);
    std::vector<float> avg(in.avg ? static_cast<size_t>(n_tokens) * call_plan.items.size() : 0, 0.0f);
    for (size_t k = 0; in.avg && k < call_plan.items.size(); ++k) {
        for (int32_t t : call_plan.items[k]) avg[k * n_tokens + t] = 1.0f / static_cast<float>(call_plan.items[k].size());
    }
    // An input no node reads (the plan in device scans, the weights in fused ones) gets no memory.
    if (in.plan->buffer) ggml_backend_tensor_set(in.plan, codes.data(), 0, ggml_nbytes(in.plan));
    if (in.avg && in.avg->buffer) ggml_backend_tensor_set(in.avg, avg.data(), 0, ggml_nbytes(in.avg));
}

dm_dmem_builder::projections dm_dmem_builder::project(const dm_dmem_layer & l, ggml_tensor * x) const {
    return slices(l, ggml_mul_mat(ctx, l.f32.w_in, x));   // [3D + G (+ G), n]
}

dm_dmem_builder::projections dm_dmem_builder::slices(const dm_dmem_layer & l, ggml_tensor * packed) const {
    const int64_t D = adapter.cfg.width(), G = adapter.cfg.gate_width;
    projections p{};
    p.packed = packed;
    if (fused(l)) return p;   // the kernel slices it and adds the gate biases itself
    auto rows = [&](int64_t first, int64_t count) {
        return ggml_cont(ctx, ggml_view_2d(ctx, packed, count, packed->ne[1], packed->nb[1],
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

// o = S m_q per head: o_i = Σ_j S[i, j] q_j.
ggml_tensor * dm_dmem_builder::read(ggml_tensor * S, ggml_tensor * q_col) const {
    ggml_tensor * o = ggml_mul_mat(ctx, S, heads(q_col));   // [r, 1, H]
    return ggml_reshape_2d(ctx, o, adapter.cfg.width(), 1);
}

// ---- the scan on devices: ggml_gated_delta_net -------------------------------------------------------
//
// GDN per head: S ← e^g S; δ = β (v − Sᵀk); S ← S + k δᵀ; out = Sᵀq / √S_v (read after the write).
// With one GDN head per δ-mem row i (of state head h), that row as GDN's value column 0 and the
// other columns zero, the step is S[i,:] ← e^g S[i,:] − β e^g (S[i,:]·k) k + β v'₀ k, which is
// δ-mem's keep·S[i,:] − erase·(S[i,:]·k) k + write·v_i k for e^g = keep, β = erase/keep,
// v'₀ = write·v_i/β. The coefficients below are those ratios written without divisions (the
// naive erase/keep is NaN once keep rounds to 0). Read before write: step t is given the next
// token's query, so its output is the next token's read; the first token reads the incoming state.

// S_v: the rank padded to a head size every GDN kernel has (CUDA: 16, 32, 64, 128). The padding
// columns and rows stay zero.
int64_t dm_dmem_builder::gdn_width() const {
    for (int64_t w : {16, 32, 64, 128}) {
        if (adapter.cfg.rank <= w) return w;
    }
    dm::fail("δ-mem rank %d is above 128, the largest state the device kernels have", adapter.cfg.rank);
}

dm_dmem_builder::gdn_coefficients dm_dmem_builder::coefficients(ggml_tensor * x, ggml_tensor * y) const {
    const dm_dmem_config & c = adapter.cfg;
    auto neg = [&](ggml_tensor * t) { return ggml_scale(ctx, t, -1.0f); };
    auto log_sigmoid = [&](ggml_tensor * t) { return neg(ggml_softplus(ctx, neg(t))); };   // log σ(t)
    constexpr float big = 30.0f;   // σ(30) is 1 in f32: clamping the logit there changes no result
    switch (c.update_mode) {
        case dm_update_mode::standard:
            if (c.couple_lambda) {   // keep = σ(−x), erase = write = σ(x): β = e^x, v'₀ = v σ(−x)
                ggml_tensor * xc = ggml_clamp(ctx, x, -INFINITY, big);
                return {log_sigmoid(neg(xc)), ggml_exp(ctx, xc), ggml_sigmoid(ctx, neg(xc))};
            } else {                 // keep = σ(y), erase = write = σ(x): β = σ(x)(1 + e^−y), v'₀ = v σ(y)
                ggml_tensor * yc = ggml_clamp(ctx, y, -big, INFINITY);
                ggml_tensor * beta = ggml_mul(ctx, ggml_sigmoid(ctx, x), ggml_scale_bias(ctx, ggml_exp(ctx, neg(yc)), 1.0f, 1.0f));
                return {log_sigmoid(yc), beta, ggml_sigmoid(ctx, yc)};
            }
        case dm_update_mode::lambda_outside:   // keep = λ, erase = λβ, write = β: β stays, v'₀ = v
            return {c.couple_lambda ? log_sigmoid(neg(x)) : log_sigmoid(y), ggml_sigmoid(ctx, x), nullptr};
        case dm_update_mode::no_lambda: {      // keep = 1: g = 0
            ggml_tensor * beta = ggml_sigmoid(ctx, x);
            return {ggml_scale(ctx, beta, 0.0f), beta, nullptr};
        }
    }
    dm::fail("internal: unknown δ-mem update mode");
}

// GDN head of row i of state head h: h + H·i, so that GDN's tiled broadcast of the H query/key
// heads (head j reads q/k head j mod H) gives every row its own head's q and k.
ggml_tensor * dm_dmem_builder::rows_as_heads(ggml_tensor * m) const {
    const int64_t r = adapter.cfg.rank, H = adapter.cfg.n_heads, n = m->ne[1];
    ggml_tensor * t = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, m, r, H, n), 1, 0, 2, 3));   // [H, r, n]
    return ggml_reshape_3d(ctx, t, 1, r * H, n);
}

ggml_tensor * dm_dmem_builder::gates_as_heads(ggml_tensor * m) const {
    const int64_t r = adapter.cfg.rank, H = adapter.cfg.n_heads, n = m->ne[1];
    if (m->ne[0] == adapter.cfg.width()) return rows_as_heads(m);   // rankwise: one gate per row
    ggml_tensor * t = ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, m, H, 1, n), H, r, n, 1);   // one per head, every row
    return ggml_reshape_3d(ctx, t, 1, r * H, n);
}

ggml_tensor * dm_dmem_builder::heads_as_rows(ggml_tensor * m) const {
    const int64_t r = adapter.cfg.rank, H = adapter.cfg.n_heads, n = m->ne[2];
    ggml_tensor * t = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, m, H, r, n), 1, 0, 2, 3));   // [r, H, n]
    return ggml_reshape_2d(ctx, t, r * H, n);
}

// n writes of k [D, n] (normalised), v [D, n] and the gate logits [G, n] into state [r, r, H].
dm_dmem_builder::gdn_pass dm_dmem_builder::gdn_writes(ggml_tensor * state, ggml_tensor * q, ggml_tensor * k,
                                                      ggml_tensor * v, ggml_tensor * beta_logit,
                                                      ggml_tensor * lambda_logit) const {
    const int64_t r = adapter.cfg.rank, H = adapter.cfg.n_heads, Hv = r * H, n = k->ne[1];
    const int64_t Sv = gdn_width();
    const gdn_coefficients co = coefficients(beta_logit, lambda_logit);
    ggml_tensor * g = gates_as_heads(co.g);          // [1, Hv, n]
    ggml_tensor * beta = gates_as_heads(co.beta);    // [1, Hv, n]
    ggml_tensor * v0 = rows_as_heads(v);             // [1, Hv, n]
    if (co.v_scale) v0 = ggml_mul(ctx, v0, gates_as_heads(co.v_scale));
    ggml_tensor * vg = ggml_pad(ctx, v0, static_cast<int>(Sv - 1), 0, 0, 0);   // [Sv, Hv, n]: column 0 only
    auto padded_heads = [&](ggml_tensor * m) {       // [D, n] -> [Sv, H, n]
        return ggml_pad(ctx, ggml_reshape_3d(ctx, m, r, H, n), static_cast<int>(Sv - r), 0, 0, 0);
    };
    ggml_tensor * kg = padded_heads(k);
    // GDN divides its output by √S_v; without q the outputs are not read (k stands in).
    ggml_tensor * qg = q ? ggml_scale(ctx, padded_heads(q), std::sqrt(static_cast<float>(Sv))) : kg;
    // state [r (col c), r (row i), H] -> GDN's [Sv, Sv, Hv]: head h + H·i holds row i in column 0.
    ggml_tensor * s0 = ggml_cont(ctx, ggml_permute(ctx, state, 0, 2, 1, 3));   // [r, H, r]
    s0 = ggml_pad(ctx, ggml_reshape_3d(ctx, s0, r, 1, Hv), static_cast<int>(Sv - r), static_cast<int>(Sv - 1), 0, 0);
    ggml_tensor * out = ggml_gated_delta_net(ctx, qg, kg, vg, g, beta, s0, 1);   // [Sv·Hv, n + Sv]: outputs, then the state

    gdn_pass p{};
    const size_t f = sizeof(float);
    if (q) {
        ggml_tensor * col0 = ggml_view_3d(ctx, out, 1, Hv, n, Sv * f, Sv * Hv * f, 0);   // [1, Hv, n]
        p.reads = heads_as_rows(ggml_cont(ctx, col0));
    }
    ggml_tensor * rows = ggml_view_2d(ctx, out, r, Hv, Sv * Sv * f, Sv * Hv * n * f);   // column 0 of each head: [r, Hv]
    rows = ggml_reshape_3d(ctx, ggml_cont(ctx, rows), r, H, r);                          // [c, h, i]
    p.state = ggml_cont(ctx, ggml_permute(ctx, rows, 0, 2, 1, 3));                       // [r, r, H]
    return p;
}

// The scan on any backend: one ggml_gated_delta_net for the writes of the pass, mat-muls for the
// reads of the incoming state.
ggml_tensor * dm_dmem_builder::device_scan(const projections & p, ggml_tensor * state) {
    const dm_dmem_config & c = adapter.cfg;
    ggml_tensor * qn = normalize(p.q);
    ggml_tensor * kn = normalize(p.k);
    ggml_tensor * S = state;
    ggml_tensor * o = nullptr;   // [D, n_tokens]

    if (plan.interleaved) {
        // token t's read is S_{t-1} q_t: the first from the incoming state, the others from step
        // t-1 of the scan, which is given q_t (the last step gets a zero query, read by nothing).
        ggml_tensor * o0 = read(state, column(qn, 0));
        ggml_tensor * q_next = ggml_view_2d(ctx, ggml_pad(ctx, qn, 0, 1, 0, 0), c.width(), n_tokens, qn->nb[1], qn->nb[1]);
        const gdn_pass g = gdn_writes(state, q_next, kn, p.v, p.beta, p.lambda);
        o = n_tokens == 1 ? o0 : ggml_concat(ctx, o0, ggml_view_2d(ctx, g.reads, c.width(), n_tokens - 1, g.reads->nb[1], 0), 1);
        S = g.state;
    } else {
        ggml_tensor * q3 = ggml_reshape_3d(ctx, qn, c.rank, c.n_heads, n_tokens);
        ggml_tensor * reads = ggml_mul_mat(ctx, state, ggml_cont(ctx, ggml_permute(ctx, q3, 0, 2, 1, 3)));   // [r, n, H]
        o = ggml_reshape_2d(ctx, ggml_cont(ctx, ggml_permute(ctx, reads, 0, 2, 1, 3)), c.width(), n_tokens);
        if (!plan.items.empty()) {   // one write per item, of its tokens' means, in item order
            auto mean = [&](ggml_tensor * m) { return ggml_mul_mat(ctx, ggml_cont(ctx, ggml_transpose(ctx, m)), in.avg); };
            S = gdn_writes(state, nullptr, normalize(mean(p.k)), mean(p.v), mean(p.beta),
                           p.lambda ? mean(p.lambda) : nullptr).state;
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
    return fused(l) && n_tokens <= k_few_tokens && l.f16.w_in ? l.f16 : l.f32;
}

// Few tokens: the memory op computes the target's rows itself, with ggml's vec_dot, so that
// the target's mat-mul node (and its barriers) goes.
bool dm_dmem_builder::op_computes(const dm_linear & target, ggml_tensor * x) const {
    if (!target.w || !target.plain || n_tokens > k_few_tokens) return false;
    if (x->type != GGML_TYPE_F32 || !ggml_is_contiguous(x) || !ggml_is_contiguous(target.w)) return false;
    if (dm_qmatmul_is_packed(target.w)) return dm_qmatmul_serves(target.w, x);   // vec_dot cannot read it
    if (target.bias && (target.bias->type != GGML_TYPE_F32 || !ggml_is_contiguous(target.bias))) return false;
    const ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(target.w->type);
    return traits->vec_dot && ggml_get_type_traits_cpu(traits->vec_dot_type)->from_float;
}

ggml_tensor * dm_dmem_builder::memory_op(ggml_tensor ** args, int64_t size) {
    if (!op) op = std::make_shared<dm_memory_op>(adapter.cfg);
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, size, 1, 1, 1, args, 9, dm_memory_op_cpu, GGML_N_TASKS_MAX,
                                       op.get());
    // The op also writes the state: it must run even where nothing reads o (the last layer of a prefill).
    ggml_build_forward_expand(gf, out);
    return out;
}

ggml_tensor * dm_dmem_builder::scan_projected(const dm_dmem_layer & l, ggml_tensor * state, ggml_tensor * packed) {
    if (!fused(l)) return device_scan(slices(l, packed), state);
    ggml_tensor * args[] = {packed, l.b_in, state, in.plan, nullptr, nullptr, nullptr, nullptr, nullptr};
    ggml_tensor * out = memory_op(args, dm_memory_op_size(n_tokens, adapter.cfg.width(), 0, 0));
    return ggml_view_2d(ctx, out, n_tokens, adapter.cfg.width(), n_tokens * sizeof(float), 0);   // [n_tokens, D]
}

ggml_tensor * dm_dmem_builder::scan_batch(const dm_dmem_layer & l, const std::vector<ggml_tensor *> & states,
                                          ggml_tensor * packed, ggml_tensor * plans, ggml_tensor * seqs) {
    if (!fused(l)) return nullptr;
    auto scan_op = std::make_shared<dm_scan_batch_op>(adapter.cfg);
    scan_op->states = states;
    ggml_tensor * args[] = {packed, l.b_in, plans, seqs};
    const int64_t T = packed->ne[1], D = adapter.cfg.width();
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, dm_scan_batch_size(T, D), 1, 1, 1, args, 4, dm_scan_batch_cpu,
                                       GGML_N_TASKS_MAX, scan_op.get());
    scan_ops.push_back(std::move(scan_op));
    ggml_build_forward_expand(gf, out);   // it writes the states
    return ggml_view_2d(ctx, out, T, D, T * sizeof(float), 0);   // [T, D]
}

dm_dmem_builder::layer_pass dm_dmem_builder::fused_pass(const dm_dmem_layer & l, ggml_tensor * state, ggml_tensor * x,
                                                   const dm_linear & target, ggml_tensor * w_delta_t, dm_matmuls & mm) {
    const int64_t D = adapter.cfg.width();
    const bool project_inside = n_tokens <= k_few_tokens && ggml_is_contiguous(x);
    ggml_tensor * w_in = weights(l).w_in;
    const bool own = op_computes(target, x);
    ggml_tensor * y = target.w && !own ? target.apply(mm, x) : nullptr;
    // Few tokens: the op copies y's rows and adds Δq, sparing a node. Many: correct() adds Δq into y
    // in place after the op, sparing a copy of [rows, n_tokens] floats through the caches.
    const bool ride = y && ggml_is_contiguous(y) && n_tokens <= k_few_tokens;
    const int64_t rows = own ? target.w->ne[1] : ride ? y->ne[0] : 0;
    const int64_t size = dm_memory_op_size(n_tokens, D, rows, project_inside ? w_in->ne[1] : 0);
    ggml_tensor * args[] = {project_inside ? x : project(l, x).packed, l.b_in, state, in.plan,
                            project_inside ? w_in : nullptr, ride ? y : nullptr, rows ? w_delta_t : nullptr,
                            own ? target.w : nullptr, own ? target.bias : nullptr};
    ggml_tensor * out = memory_op(args, size);
    layer_pass r{};
    r.reads = ggml_view_2d(ctx, out, n_tokens, D, n_tokens * sizeof(float), 0);   // [n_tokens, D]
    if (rows) {
        r.corrected = ggml_view_2d(ctx, out, rows, n_tokens, rows * sizeof(float), n_tokens * D * sizeof(float));
    } else if (y) {
        r.corrected = correct(l, y, w_delta_t, r.reads);
    }
    return r;
}

dm_dmem_builder::layer_pass dm_dmem_builder::read_and_write(const dm_dmem_layer & l, ggml_tensor * state, ggml_tensor * x,
                                                            const dm_linear & target, ggml_tensor * w_delta_t,
                                                            dm_matmuls & mm) {
    if (fused(l)) return fused_pass(l, state, x, target, w_delta_t, mm);
    layer_pass r{};
    r.reads = device_scan(project(l, x), state);
    if (target.w) r.corrected = correct(l, target.apply(mm, x), w_delta_t, r.reads);
    return r;
}

ggml_tensor * dm_dmem_builder::correction(ggml_tensor * w_delta_t, ggml_tensor * reads_t, int64_t m) const {
    if (m < reads_t->ne[0]) {   // the last m rows of [n, D]
        reads_t = ggml_view_2d(ctx, reads_t, m, reads_t->ne[1], reads_t->nb[1], (reads_t->ne[0] - m) * sizeof(float));
    }
    // Σ_d W_Δᵀ[:, d] ⊗ o[d, :]: an outer-product sum over the D memory dimensions.
    return ggml_out_prod(ctx, w_delta_t, reads_t);
}

ggml_tensor * dm_dmem_builder::correct(const dm_dmem_layer & l, ggml_tensor * y, ggml_tensor * w_delta_t,
                                       ggml_tensor * reads_t, ggml_tensor * residual) const {
    const bool one_op = fused(l) && ggml_is_contiguous(y) && (!residual || ggml_is_contiguous(residual));
    if (!one_op) {
        ggml_tensor * sum = ggml_add(ctx, y, correction(w_delta_t, reads_t, y->ne[1]));
        return residual ? ggml_add(ctx, residual, sum) : sum;
    }
    // y is a projection that only this correction reads: the sum goes into it, sparing a copy.
    ggml_tensor * args[] = {w_delta_t, reads_t, residual};
    return ggml_custom_inplace(ctx, y, args, residual ? 3 : 2, dm_correct_cpu, GGML_N_TASKS_MAX, nullptr);
}
