#include "dmem/dmem_graph.h"

#include "common/error.h"

#include <ggml-backend.h>

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
    p.interleaved = false;
    std::map<int32_t, std::vector<int32_t>> members;   // ordered by id: writes go in increasing id order
    for (int32_t t = 0; t < n_tokens; ++t) {
        if (ids[t] >= 0) members[ids[t]].push_back(t);
    }
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
    p.packed = ggml_mul_mat(ctx, l.w_in, x);   // [3D + G (+ G), n]
    if (fused) return p;                       // the kernel slices it and adds the gate biases itself
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
    ggml_build_forward_expand(gf, o);
    if (S != state) ggml_build_forward_expand(gf, ggml_cpy(ctx, S, state));
    return o;
}

ggml_tensor * dm_dmem_builder::fused_scan(const dm_dmem_layer & l, const projections & p, ggml_tensor * state) const {
    ggml_tensor * args[] = {p.packed, l.b_in, state, in.plan};
    ggml_tensor * o = ggml_custom_4d(ctx, GGML_TYPE_F32, adapter.cfg.width(), n_tokens, 1, 1, args, 4,
                                     dm_dmem_scan_cpu, 1, const_cast<dm_dmem_config *>(&adapter.cfg));
    // The op also writes the state: it must run even where nothing reads o (the last layer of a prefill).
    ggml_build_forward_expand(gf, o);
    return o;
}

ggml_tensor * dm_dmem_builder::read_and_write(const dm_dmem_layer & layer, ggml_tensor * state, ggml_tensor * x) {
    const projections p = project(layer, x);
    return fused ? fused_scan(layer, p, state) : portable(p, state);
}

// ---- the fused CPU kernel ------------------------------------------------------------------------

namespace {

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

struct scan_kernel {
    const dm_dmem_config & c;
    float * S;   // [H][r][r], rows i (value dims) then columns j (key dims)
    int32_t r, H, D;
    std::vector<float> qn, kn, keep, erase, wr;

    scan_kernel(const dm_dmem_config & cfg, float * state)
        : c(cfg), S(state), r(cfg.rank), H(cfg.n_heads), D(cfg.width()), qn(D), kn(D), keep(D), erase(D), wr(D) {}

    // tanh then L2 per head chunk (x / max(‖x‖, eps)), as ggml_tanh + ggml_l2_norm compute it.
    void normalize(const float * raw, float * out) const {
        for (int32_t h = 0; h < H; ++h) {
            double sum = 0.0;
            for (int32_t j = 0; j < r; ++j) {
                const float x = c.normalize_qk ? std::tanh(raw[h * r + j]) : raw[h * r + j];
                out[h * r + j] = x;
                sum += static_cast<double>(x) * x;
            }
            if (!c.normalize_qk) continue;
            const float scale = 1.0f / std::fmax(std::sqrt(static_cast<float>(sum)), c.qk_norm_eps);
            for (int32_t j = 0; j < r; ++j) out[h * r + j] *= scale;
        }
    }

    void gates(const float * beta_logit, const float * lambda_logit) {
        const bool rankwise = c.gate_width == D;
        for (int32_t h = 0; h < H; ++h) {
            for (int32_t i = 0; i < r; ++i) {
                const int32_t g = rankwise ? h * r + i : h;
                const float b = sigmoid(beta_logit[g]);
                const float l = c.couple_lambda ? 1.0f - b : sigmoid(lambda_logit[g]);
                const int32_t row = h * r + i;
                wr[row] = b;
                switch (c.update_mode) {
                    case dm_update_mode::standard:       keep[row] = l;    erase[row] = b;     break;
                    case dm_update_mode::lambda_outside: keep[row] = l;    erase[row] = l * b; break;
                    case dm_update_mode::no_lambda:      keep[row] = 1.0f; erase[row] = b;     break;
                }
            }
        }
    }

    void read(float * o) const {
        for (int32_t h = 0; h < H; ++h) {
            for (int32_t i = 0; i < r; ++i) {
                const float * row = S + (static_cast<size_t>(h) * r + i) * r;
                float acc = 0.0f;
                for (int32_t j = 0; j < r; ++j) acc += row[j] * qn[h * r + j];
                o[h * r + i] = acc;
            }
        }
    }

    void write(const float * v) {
        for (int32_t h = 0; h < H; ++h) {
            for (int32_t i = 0; i < r; ++i) {
                float * row = S + (static_cast<size_t>(h) * r + i) * r;
                const float * k = kn.data() + h * r;
                float sk = 0.0f;
                for (int32_t j = 0; j < r; ++j) sk += row[j] * k[j];
                const int32_t ri = h * r + i;
                const float u = wr[ri] * v[ri] - erase[ri] * sk;
                for (int32_t j = 0; j < r; ++j) row[j] = keep[ri] * row[j] + k[j] * u;
            }
        }
    }
};

} // namespace

void dm_dmem_scan_cpu(ggml_tensor * dst, int ith, int nth, void * userdata) {
    if (ith != 0) return;   // the scan is sequential and tiny: one thread does it
    const auto & cfg = *static_cast<const dm_dmem_config *>(userdata);
    const ggml_tensor * proj = dst->src[0];   // [3D + G (+ G), n]: q, k, v, β and λ logits
    const float * gate_bias = static_cast<const float *>(dst->src[1]->data);
    const int32_t * plan = static_cast<const int32_t *>(dst->src[3]->data);
    const int64_t n = dst->ne[1];
    const int32_t D = cfg.width(), G = cfg.gate_width;
    const bool has_lambda = dst->src[1]->ne[0] == 2 * G;
    auto column = [&](int64_t t) { return reinterpret_cast<const float *>(static_cast<const char *>(proj->data) + t * proj->nb[1]); };
    float * out = static_cast<float *>(dst->data);
    scan_kernel kr(cfg, static_cast<float *>(dst->src[2]->data));
    std::vector<float> gate_logits(2 * static_cast<size_t>(G), 0.0f);   // β then λ, with their biases
    auto set_gates = [&](const float * col) {
        for (int32_t g = 0; g < G; ++g) gate_logits[g] = col[3 * D + g] + gate_bias[g];
        for (int32_t g = 0; has_lambda && g < G; ++g) gate_logits[G + g] = col[3 * D + G + g] + gate_bias[G + g];
        kr.gates(gate_logits.data(), gate_logits.data() + G);
    };

    if (plan[n] == 0) {   // token writes: read, then write, token by token
        for (int64_t t = 0; t < n; ++t) {
            const float * col = column(t);
            kr.normalize(col, kr.qn.data());
            kr.read(out + t * D);
            kr.normalize(col + D, kr.kn.data());
            set_gates(col);
            kr.write(col + 2 * D);
        }
        return;
    }
    for (int64_t t = 0; t < n; ++t) {   // every token reads the start state ...
        kr.normalize(column(t), kr.qn.data());
        kr.read(out + t * D);
    }
    int32_t n_items = 0;   // ... then each write item, in order, writes the mean of its tokens
    for (int64_t t = 0; t < n; ++t) n_items = std::max(n_items, plan[t] + 1);
    // The mean of the projections is the projection of the mean x (they are linear).
    const int64_t rows = proj->ne[0];
    std::vector<float> mean(static_cast<size_t>(rows));
    for (int32_t item = 0; item < n_items; ++item) {
        std::fill(mean.begin(), mean.end(), 0.0f);
        int32_t count = 0;
        for (int64_t t = 0; t < n; ++t) {
            if (plan[t] != item) continue;
            ++count;
            const float * col = column(t);
            for (int64_t r = 0; r < rows; ++r) mean[r] += col[r];
        }
        const float inv = 1.0f / static_cast<float>(std::max(count, 1));
        for (float & x : mean) x *= inv;
        kr.normalize(mean.data() + D, kr.kn.data());
        set_gates(mean.data());
        kr.write(mean.data() + 2 * D);
    }
    (void) nth;
}
