#include "dmem/dmem_cpu.h"

#include "common/spin.h"
#include "common/vec.h"
#include "matmul/qmatmul.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cmath>
#include <cstddef>

namespace {

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

const float * column(const ggml_tensor * t, int64_t i) {
    return reinterpret_cast<const float *>(static_cast<const char *>(t->data) + i * t->nb[1]);
}

// The rows [first, last) of `rows` that thread ith of nth works on, whole 64-byte lines each so
// that no two threads write the same cache line.
struct row_range {
    int64_t first, last;
    row_range(int64_t rows, int ith, int nth) {
        constexpr int64_t line = 16;   // floats
        const int64_t per_thread = ((rows + nth - 1) / nth + line - 1) / line * line;
        first = std::min(rows, ith * per_thread);
        last = std::min(rows, first + per_thread);
    }
};

// dst[first:last] += Σ_d W_Δᵀ[first:last, d] o_t[d] for one token's column dst, o_t[d] = reads[d * stride].
void add_reads(float * dst, const ggml_tensor * w, const float * reads, int64_t stride, int64_t first, int64_t last) {
    const char * rows = static_cast<const char *>(w->data) + first * ggml_type_size(w->type);
    dm_vec_mad_rows(dst + first, reads, stride, rows, w->nb[1], w->type, w->ne[1], last - first);
}

// out[:, t] = y[:, t] (+ residual[:, t]) + Σ_d W_Δᵀ[:, d] o_t[d] on the rows [first, last), for
// the n columns of y, o_t[d] = reads[t + d * stride].
void add_correction(const ggml_tensor * y, const ggml_tensor * residual, const ggml_tensor * w, const float * reads,
                    int64_t stride, float * out, size_t out_nb1, int64_t first, int64_t last) {
    const int64_t n = y->ne[1], len = last - first;
    if (len <= 0) return;
    for (int64_t t = 0; t < n; ++t) {
        const float * src = column(y, t) + first;
        float * dst = reinterpret_cast<float *>(reinterpret_cast<char *>(out) + t * out_nb1);
        if (src != dst + first) std::copy(src, src + len, dst + first);   // equal: in place
        if (residual) {
            const float * res = column(residual, t) + first;
            for (int64_t i = 0; i < len; ++i) dst[first + i] += res[i];
        }
        add_reads(dst, w, reads + t, stride, first, last);
    }
}

// The read-before-write recurrence of one pass. What each token contributes apart from the state
// (its normalised q and k, its gates) does not depend on the others: with many tokens the op's
// threads compute those terms in parallel, and only the recurrence runs on one thread.
struct scan_kernel {
    const dm_dmem_config & c;
    float * S;   // [H][r][r], rows i (value dims) then columns j (key dims)
    int32_t r, H, D, G;

    // One token's terms, D each: qn | kn | write gate | keep gate | erase gate.
    static constexpr int32_t n_terms = 5;
    struct terms {
        const float * qn, * kn, * wr, * keep, * erase;
        terms(const float * block, int32_t D)
            : qn(block), kn(block + D), wr(block + 2 * D), keep(block + 3 * D), erase(block + 4 * D) {}
    };

    scan_kernel(const dm_dmem_config & cfg, float * state)
        : c(cfg), S(state), r(cfg.rank), H(cfg.n_heads), D(cfg.width()), G(cfg.gate_width) {}

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

    // β (and λ) logits of a projection column plus their biases -> the write, keep and erase gates.
    void gates(const float * col, const float * bias, bool has_lambda, float * wr, float * keep, float * erase) const {
        const bool rankwise = G == D;
        for (int32_t h = 0; h < H; ++h) {
            for (int32_t i = 0; i < r; ++i) {
                const int32_t g = rankwise ? h * r + i : h;
                const float b = sigmoid(col[3 * D + g] + bias[g]);
                const float l = c.couple_lambda || !has_lambda ? 1.0f - b : sigmoid(col[3 * D + G + g] + bias[G + g]);
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

    // The terms of the token whose projections are col (q | k | v | β (| λ)) into block [n_terms D].
    void token_terms(const float * col, const float * bias, bool has_lambda, float * block) const {
        normalize(col, block);
        normalize(col + D, block + D);
        gates(col, bias, has_lambda, block + 2 * D, block + 3 * D, block + 4 * D);
    }

    // o[d * stride] for the D read dimensions d.
    void read(const float * qn, float * o, int64_t stride) const {
        for (int32_t h = 0; h < H; ++h) {
            for (int32_t i = 0; i < r; ++i) {
                const float * row = S + (static_cast<size_t>(h) * r + i) * r;
                float acc = 0.0f;
                for (int32_t j = 0; j < r; ++j) acc += row[j] * qn[h * r + j];
                o[(h * r + i) * stride] = acc;
            }
        }
    }

    void write(const terms & tt, const float * v) {
        for (int32_t h = 0; h < H; ++h) {
            for (int32_t i = 0; i < r; ++i) {
                float * row = S + (static_cast<size_t>(h) * r + i) * r;
                const float * k = tt.kn + h * r;
                float sk = 0.0f;
                for (int32_t j = 0; j < r; ++j) sk += row[j] * k[j];
                const int32_t ri = h * r + i;
                const float u = tt.wr[ri] * v[ri] - tt.erase[ri] * sk;
                for (int32_t j = 0; j < r; ++j) row[j] = tt.keep[ri] * row[j] + k[j] * u;
            }
        }
    }
};

// The projections of token t: column t of the rows x n matrix at proj (columns `stride` floats apart).
struct projections {
    const float * data;
    int64_t rows, stride;
    const float * col(int64_t t) const { return data + t * stride; }
};

// Reads into reads[t + d stride] and writes the state, as the plan says (plan[n] = 0: token writes;
// 1: every token reads the start state, then each write item writes the mean of its tokens), from
// the tokens' terms [n][n_terms D] (scan_kernel::token_terms of each column of p).
void scan(scan_kernel & kr, const projections & p, int64_t n, const float * terms, const float * gate_bias,
          bool has_lambda, const int32_t * plan, float * reads, int64_t stride, std::vector<float> & scratch) {
    const int32_t D = kr.D;
    const size_t block = static_cast<size_t>(scan_kernel::n_terms) * D;
    if (plan[n] == 0) {
        for (int64_t t = 0; t < n; ++t) {
            const scan_kernel::terms tt(terms + t * block, D);
            kr.read(tt.qn, reads + t, stride);
            kr.write(tt, p.col(t) + 2 * D);
        }
        return;
    }
    for (int64_t t = 0; t < n; ++t) kr.read(scan_kernel::terms(terms + t * block, D).qn, reads + t, stride);
    int32_t n_items = 0;
    for (int64_t t = 0; t < n; ++t) n_items = std::max(n_items, plan[t] + 1);
    // The mean of the projections is the projection of the mean x (they are linear).
    std::vector<float> mean(static_cast<size_t>(p.rows));
    scratch.resize(block);
    for (int32_t item = 0; item < n_items; ++item) {
        std::fill(mean.begin(), mean.end(), 0.0f);
        int32_t count = 0;
        for (int64_t t = 0; t < n; ++t) {
            if (plan[t] != item) continue;
            ++count;
            const float * col = p.col(t);
            for (int64_t i = 0; i < p.rows; ++i) mean[i] += col[i];
        }
        const float inv = 1.0f / static_cast<float>(std::max(count, 1));
        for (float & x : mean) x *= inv;
        kr.token_terms(mean.data(), gate_bias, has_lambda, scratch.data());
        kr.write(scan_kernel::terms(scratch.data(), D), mean.data() + 2 * D);
    }
}

// The rows of the projection the op computes and corrects, [rows, n]: W x (+ bias) as the graph's
// mat-mul computes it (the engine's kernel where it serves W, else ggml's vec_dot), then + W_Δ o.
struct computed_rows {
    const ggml_tensor * x, * w, * bias, * w_delta;
    const float * reads;   // [n, D]
    float * out;           // [rows, n]
    int64_t rows, n;

    bool own_kernel() const { return dm_qmatmul_serves(w, x); }

    // x as the mat-mul reads it, once per call and thread, before the thread's first chunk.
    void convert_x(std::vector<char> & x_dot) const {
        if (own_kernel()) {
            x_dot.resize(dm_qact_bytes(x->ne[0]) * static_cast<size_t>(n));
            dm_qact_quantize(column(x, 0), x->nb[1], x->ne[0], n, x_dot.data());
            return;
        }
        const ggml_type type = ggml_get_type_traits_cpu(w->type)->vec_dot_type;
        const size_t row = ggml_row_size(type, x->ne[0]);
        x_dot.resize(row * static_cast<size_t>(n));
        for (int64_t t = 0; t < n; ++t) ggml_get_type_traits_cpu(type)->from_float(column(x, t), x_dot.data() + t * row, x->ne[0]);
    }

    // Rows [first, last) of W x (+ bias), before their correction.
    void compute(int64_t first, int64_t last, const std::vector<char> & x_dot) const {
        if (own_kernel()) {
            dm_qmatmul_rows(w->data, w->nb[1], w->type, dm_qmatmul_is_packed(w), x->ne[0], first, last, x_dot.data(), n, out,
                            rows);
        } else {
            const ggml_vec_dot_t dot = ggml_get_type_traits_cpu(w->type)->vec_dot;
            const size_t x_row = x_dot.size() / static_cast<size_t>(n);   // bytes of one token's converted x
            for (int64_t t = 0; t < n; ++t) {
                const char * xt = x_dot.data() + static_cast<size_t>(t) * x_row;
                for (int64_t i = first; i < last; ++i) {
                    dot(static_cast<int>(x->ne[0]), out + t * rows + i, 0, static_cast<const char *>(w->data) + i * w->nb[1],
                        0, xt, 0, 1);
                }
            }
        }
        if (!bias) return;
        const float * b = static_cast<const float *>(bias->data);
        for (int64_t t = 0; t < n; ++t) {
            for (int64_t i = first; i < last; ++i) out[t * rows + i] += b[i];
        }
    }

    void correct(int64_t first, int64_t last) const {
        for (int64_t t = 0; t < n; ++t) add_reads(out + t * rows, w_delta, reads + t, n, first, last);
    }
};

// Rows [first, last) of the projections of x: out[t * rows + i] = w_in[i] · x_t.
void project_rows(const ggml_tensor * in, const ggml_tensor * w_in, float * out, int64_t first, int64_t last) {
    const int64_t rows = w_in->ne[1];
    for (int64_t i = first; i < last; ++i) {
        const char * w = static_cast<const char *>(w_in->data) + i * w_in->nb[1];
        for (int64_t t = 0; t < in->ne[1]; ++t) out[t * rows + i] = dm_vec_dot(w, w_in->type, column(in, t), in->ne[0]);
    }
}

} // namespace

dm_memory_op::dm_memory_op(const dm_dmem_config & c) : cfg(&c), threads(GGML_MAX_N_THREADS) {}

int64_t dm_memory_op_size(int64_t n_tokens, int64_t D, int64_t rows, int64_t projection_rows) {
    return n_tokens * (D + rows + projection_rows + scan_kernel::n_terms * D);
}

void dm_memory_op_cpu(ggml_tensor * dst, int ith, int nth, void * userdata) {
    auto & op = *static_cast<dm_memory_op *>(userdata);
    const dm_dmem_config & cfg = *op.cfg;
    const ggml_tensor * in = dst->src[0];
    const ggml_tensor * w_in = dst->src[4];
    const ggml_tensor * y = dst->src[5];
    const ggml_tensor * w = dst->src[7];
    const int64_t n = in->ne[1], D = cfg.width();
    float * reads = static_cast<float *>(dst->data);   // [n, D]
    const int64_t rows = w ? w->ne[1] : y ? y->ne[0] : 0;
    float * corrected = reads + n * D;                 // [rows, n]
    const computed_rows target{in, w, dst->src[8], dst->src[6], reads, corrected, rows, n};

    projections p{column(in, 0), in->ne[0], static_cast<int64_t>(in->nb[1] / sizeof(float))};
    float * out = corrected + rows * n;   // after the corrected rows: the projections [p_rows, n] with [4]
    float * terms = out + (w_in ? w_in->ne[1] * n : 0);   // then the tokens' terms [n][n_terms D]
    const size_t block = static_cast<size_t>(scan_kernel::n_terms) * D;
    const float * gate_bias = static_cast<const float *>(dst->src[1]->data);
    const bool has_lambda = dst->src[1]->ne[0] == 2 * cfg.gate_width;
    scan_kernel kr(cfg, static_cast<float *>(dst->src[2]->data));
    auto compute_terms = [&](int64_t first, int64_t last) {
        for (int64_t t = first; t < last; ++t) kr.token_terms(p.col(t), gate_bias, has_lambda, terms + t * block);
    };
    // Each thread does its share of the first phase (few tokens: the projections of x; many: the
    // tokens' terms) and counts itself in; thread 0 waits for all, then scans.
    if (w_in) {
        const int64_t p_rows = w_in->ne[1];
        const row_range r(p_rows, ith, nth);
        project_rows(in, w_in, out, r.first, r.last);
        p = {out, p_rows, p_rows};
    } else {
        compute_terms(n * ith / nth, n * (ith + 1) / nth);
    }
    op.arrived.fetch_add(1, std::memory_order_acq_rel);
    if (ith == 0) {   // the recurrence is sequential and tiny: one thread does it, the others go on to the rows
        while (op.arrived.load(std::memory_order_acquire) < nth) dm_cpu_relax();
        if (w_in) compute_terms(0, n);
        scan(kr, p, n, terms, gate_bias, has_lambda, static_cast<const int32_t *>(dst->src[3]->data), reads, n,
             op.scratch);
        op.reads_ready.store(true, std::memory_order_release);
    }
    auto wait_for_reads = [&] { while (!op.reads_ready.load(std::memory_order_acquire)) dm_cpu_relax(); };
    if (rows > 0 && !w) {   // copying y is no work worth starting before the reads: an equal share each
        wait_for_reads();
        const row_range r(rows, ith, nth);
        add_correction(y, nullptr, dst->src[6], reads, n, corrected, static_cast<size_t>(rows) * sizeof(float), r.first,
                       r.last);
    } else if (rows > 0) {   // W x: chunks as ggml_mul_mat takes them, shared while thread 0 scans
        constexpr int64_t chunk = 64;
        const int32_t n_chunks = static_cast<int32_t>((rows + chunk - 1) / chunk);
        dm_memory_op::per_thread & me = op.threads[static_cast<size_t>(ith)];
        me.pending.clear();
        bool converted = false;
        for (int32_t c; (c = op.next_chunk.fetch_add(1, std::memory_order_relaxed)) < n_chunks;) {
            if (!converted) {
                target.convert_x(me.x_dot);
                converted = true;
            }
            const int64_t first = c * chunk, last = std::min(rows, first + chunk);
            target.compute(first, last, me.x_dot);
            if (op.reads_ready.load(std::memory_order_acquire)) {
                target.correct(first, last);
            } else {
                me.pending.push_back(c);
            }
        }
        if (!me.pending.empty()) wait_for_reads();
        for (int32_t c : me.pending) target.correct(c * chunk, std::min(rows, (c + 1) * chunk));
    }
    // The last thread out readies the op for its next call (ggml's barrier after the node orders it).
    if (op.finished.fetch_add(1, std::memory_order_acq_rel) == nth - 1) {
        op.arrived.store(0, std::memory_order_relaxed);
        op.next_chunk.store(0, std::memory_order_relaxed);
        op.reads_ready.store(false, std::memory_order_relaxed);
        op.finished.store(0, std::memory_order_relaxed);
    }
}

dm_scan_batch_op::dm_scan_batch_op(const dm_dmem_config & c) : cfg(&c), scratch(GGML_MAX_N_THREADS) {}

int64_t dm_scan_batch_size(int64_t n_tokens, int64_t D) { return n_tokens * (D + scan_kernel::n_terms * D); }

void dm_scan_batch_cpu(ggml_tensor * dst, int ith, int nth, void * userdata) {
    auto & op = *static_cast<dm_scan_batch_op *>(userdata);
    const dm_dmem_config & cfg = *op.cfg;
    const ggml_tensor * in = dst->src[0];
    const int64_t T = in->ne[1], D = cfg.width();
    const size_t block = static_cast<size_t>(scan_kernel::n_terms) * D;
    float * reads = static_cast<float *>(dst->data);   // [T, D]
    float * terms = reads + T * D;                     // [T][n_terms D]
    const projections p{column(in, 0), in->ne[0], static_cast<int64_t>(in->nb[1] / sizeof(float))};
    const float * gate_bias = static_cast<const float *>(dst->src[1]->data);
    const bool has_lambda = dst->src[1]->ne[0] == 2 * cfg.gate_width;
    // 1. Every token's terms (they depend on its projections only), an equal share each.
    const scan_kernel terms_of(cfg, nullptr);
    for (int64_t t = T * ith / nth; t < T * (ith + 1) / nth; ++t) {
        terms_of.token_terms(p.col(t), gate_bias, has_lambda, terms + t * block);
    }
    op.arrived.fetch_add(1, std::memory_order_acq_rel);
    while (op.arrived.load(std::memory_order_acquire) < nth) dm_cpu_relax();
    // 2. The sequences' recurrences, one sequence at a time per thread.
    const auto * plans = static_cast<const int32_t *>(dst->src[2]->data);
    const auto * table = static_cast<const int32_t *>(dst->src[3]->data);   // [2, n_seqs]: n_tokens, n_past
    const int64_t n_seqs = dst->src[3]->ne[1];
    std::vector<int64_t> first(static_cast<size_t>(n_seqs) + 1, 0);
    for (int64_t i = 0; i < n_seqs; ++i) first[static_cast<size_t>(i) + 1] = first[static_cast<size_t>(i)] + table[2 * i];
    for (int32_t i; (i = op.next_seq.fetch_add(1, std::memory_order_relaxed)) < n_seqs;) {
        const int64_t t0 = first[static_cast<size_t>(i)], n = table[2 * i];
        scan_kernel kr(cfg, static_cast<float *>(op.states[static_cast<size_t>(i)]->data));
        const projections ps{p.col(t0), p.rows, p.stride};
        scan(kr, ps, n, terms + t0 * block, gate_bias, has_lambda, plans + t0 + i, reads + t0, T,
             op.scratch[static_cast<size_t>(ith)]);
    }
    if (op.finished.fetch_add(1, std::memory_order_acq_rel) == nth - 1) {   // the last thread out resets
        op.arrived.store(0, std::memory_order_relaxed);
        op.next_seq.store(0, std::memory_order_relaxed);
        op.finished.store(0, std::memory_order_relaxed);
    }
}

void dm_correct_cpu(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * reads = dst->src[2];   // [n, D]; y has the last m <= n of those tokens
    const int64_t n = reads->ne[0], m = dst->ne[1];
    const row_range r(dst->ne[0], ith, nth);
    add_correction(dst->src[0], dst->src[3], dst->src[1], static_cast<const float *>(reads->data) + (n - m), n,
                   static_cast<float *>(dst->data), dst->nb[1], r.first, r.last);
}
