#include "attention/attention_cpu.h"

#include "common/spin.h"
#include "common/vec.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace {

constexpr int64_t k_block = 64;         // cache cells an item's queries take together (online softmax between blocks)
constexpr int64_t k_token_chunk = 16;   // a prompt's tokens per work item (the split changes no result)

// One sequence's share of the pass.
struct seq_pass {
    int64_t first;    // its first token among the pass's T
    int64_t n;        // its tokens
    int64_t n_past;   // cells already in its cache
};

// The rows of one KV head in a cache: cell c's values at base + c * stride bytes. The
// kernels read f16 caches as they are (widened on load), so a decoded token's few queries do not pay
// for an f32 copy of every cell they pass.
struct head_rows {
    const char * base;
    size_t       stride;
    ggml_type    type;

    const void * cell(int64_t c) const { return base + c * stride; }
};

head_rows rows_of(const ggml_tensor * cache, int64_t g, int64_t head_dim) {
    const char * base = static_cast<const char *>(cache->data) + g * head_dim * static_cast<int64_t>(ggml_type_size(cache->type));
    return {base, cache->nb[1], cache->type};
}

// Writes head g of the sequence's new keys (or values) into its cells n_past .. n_past + n - 1,
// rounded to the cache type as ggml_set_rows rounds them. Token t's head g is at src + t *
// token_bytes + g * head_bytes.
void store_new_rows(ggml_tensor * cache, const ggml_tensor * src, size_t token_bytes, size_t head_bytes, const seq_pass & s,
                    int64_t g, int64_t head_dim) {
    const size_t elt = ggml_type_size(cache->type);
    for (int64_t i = 0; i < s.n; ++i) {
        const auto * from = reinterpret_cast<const float *>(static_cast<const char *>(src->data) + (s.first + i) * token_bytes +
                                                            g * head_bytes);
        char * to = static_cast<char *>(cache->data) + (s.n_past + i) * cache->nb[1] + g * head_dim * elt;
        if (cache->type == GGML_TYPE_F32) {
            std::memcpy(to, from, static_cast<size_t>(head_dim) * sizeof(float));
        } else {
            ggml_cpu_fp32_to_fp16(from, reinterpret_cast<ggml_fp16_t *>(to), head_dim);
        }
    }
}

// The queries of one item: the group's heads for each of the sequence's tokens, and their
// running softmax (max M, sum S) and weighted sums of values.
struct item_state {
    std::vector<float> m, s, acc, scores, p;
};

// Tokens [t0, t0 + nt) of sequence si, the query heads of KV head g, attending over its cache.
void attend_item(const dm_attention_op & op, ggml_tensor * dst, const ggml_tensor * q, const ggml_tensor * v,
                 const seq_pass & s, int64_t si, int64_t g, int64_t t0, int64_t nt, int64_t n_head_kv, item_state & st) {
    const int64_t hd_k = q->ne[0], n_head = q->ne[1];
    const int64_t hd_v = v->ne[0] / n_head_kv;
    const int64_t group = n_head / n_head_kv;
    const ggml_tensor * kc = op.k_cache[static_cast<size_t>(si)];
    const ggml_tensor * vc = op.v_cache[static_cast<size_t>(si)];

    const int64_t nq = nt * group;   // query j: token t0 + j / group, head g * group + j % group
    st.m.assign(static_cast<size_t>(nq), -std::numeric_limits<float>::infinity());
    st.s.assign(static_cast<size_t>(nq), 0.0f);
    st.acc.assign(static_cast<size_t>(nq * hd_v), 0.0f);
    st.scores.resize(k_block);
    st.p.resize(k_block);
    const head_rows keys = rows_of(kc, g, hd_k), values = rows_of(vc, g, hd_v);
    const int64_t n_cells = s.n_past + t0 + nt;   // what its last token sees
    for (int64_t c0 = 0; c0 < n_cells; c0 += k_block) {
        const int64_t cnt = std::min(k_block, n_cells - c0);
        for (int64_t j = 0; j < nq; ++j) {
            const int64_t token = t0 + j / group;
            const int64_t visible = std::min(cnt, s.n_past + token + 1 - c0);   // causal: cells up to its own
            if (visible <= 0) continue;
            const int64_t head = g * group + j % group;
            const auto * qj = reinterpret_cast<const float *>(static_cast<const char *>(q->data) + (s.first + token) * q->nb[2] +
                                                             head * q->nb[1]);
            float * sc = st.scores.data();
            dm_vec_dots(keys.cell(c0), keys.stride, keys.type, visible, qj, hd_k, op.scale, sc);
            const float block_max = *std::max_element(sc, sc + visible);
            float & m = st.m[static_cast<size_t>(j)];
            float * acc = st.acc.data() + j * hd_v;
            const float m_new = std::max(m, block_max);
            if (m_new > m && st.s[static_cast<size_t>(j)] > 0.0f) {   // earlier terms were weighed against a smaller max
                const float r = std::exp(m - m_new);
                st.s[static_cast<size_t>(j)] *= r;
                for (int64_t d = 0; d < hd_v; ++d) acc[d] *= r;
            }
            m = m_new;
            st.s[static_cast<size_t>(j)] += dm_vec_exp_shifted(st.p.data(), sc, visible, m_new);
            dm_vec_mad_rows(acc, st.p.data(), 1, values.cell(c0), values.stride, values.type, visible, hd_v);
        }
    }
    for (int64_t j = 0; j < nq; ++j) {
        const int64_t token = t0 + j / group, head = g * group + j % group;
        float * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + (s.first + token) * dst->nb[1]) + head * hd_v;
        const float inv = 1.0f / st.s[static_cast<size_t>(j)];   // > 0: every query sees its own cell
        const float * acc = st.acc.data() + j * hd_v;
        for (int64_t d = 0; d < hd_v; ++d) out[d] = acc[d] * inv;
    }
}

} // namespace

void dm_attention_op_cpu(ggml_tensor * dst, int /*ith*/, int nth, void * userdata) {
    auto & op = *static_cast<dm_attention_op *>(userdata);
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    const ggml_tensor * info = dst->src[3];
    const auto * table = static_cast<const int32_t *>(info->data);
    const int64_t n_seqs = info->ne[1], n_head_kv = k->ne[1];
    const int64_t hd_k = k->ne[0], hd_v = v->ne[0] / n_head_kv;
    std::vector<seq_pass> seqs(static_cast<size_t>(n_seqs));
    std::vector<int32_t> first_item(static_cast<size_t>(n_seqs) + 1, 0);   // attention items: per sequence, KV head, token chunk
    for (int64_t i = 0, first = 0; i < n_seqs; ++i) {
        seqs[static_cast<size_t>(i)] = {first, table[2 * i], table[2 * i + 1]};
        first += table[2 * i];
        const int64_t chunks = (table[2 * i] + k_token_chunk - 1) / k_token_chunk;
        first_item[static_cast<size_t>(i) + 1] = first_item[static_cast<size_t>(i)] + static_cast<int32_t>(chunks * n_head_kv);
    }

    // 1. The new keys and values into the caches, a (sequence, KV head) at a time.
    const int32_t n_stores = static_cast<int32_t>(n_seqs * n_head_kv);
    for (int32_t it = op.next_store.fetch_add(1); it < n_stores; it = op.next_store.fetch_add(1)) {
        const seq_pass & s = seqs[static_cast<size_t>(it / n_head_kv)];
        const int64_t g = it % n_head_kv;
        store_new_rows(op.k_cache[static_cast<size_t>(it / n_head_kv)], k, k->nb[2], k->nb[1], s, g, hd_k);   // k [hd_k, n_head_kv, T]
        store_new_rows(op.v_cache[static_cast<size_t>(it / n_head_kv)], v, v->nb[1], static_cast<size_t>(hd_v) * sizeof(float), s, g,
                       hd_v);                                                                                   // v [hd_v * n_head_kv, T]
    }
    // A prompt's tokens read each other's rows: every store is done before any of them attends.
    op.stored.fetch_add(1);
    while (op.stored.load() < nth) dm_cpu_relax();

    // 2. Attention, a (sequence, KV head, chunk of tokens) at a time.
    thread_local item_state st;
    const int32_t n_items = first_item.back();
    for (int32_t it = op.next_item.fetch_add(1); it < n_items; it = op.next_item.fetch_add(1)) {
        const int64_t si = std::upper_bound(first_item.begin(), first_item.end(), it) - first_item.begin() - 1;
        const int64_t local = it - first_item[static_cast<size_t>(si)];
        const seq_pass & s = seqs[static_cast<size_t>(si)];
        const int64_t g = local % n_head_kv, t0 = local / n_head_kv * k_token_chunk;
        attend_item(op, dst, q, v, s, si, g, t0, std::min(k_token_chunk, s.n - t0), n_head_kv, st);
    }
    // The last thread out resets the counters for the next call (ggml's barrier after the node
    // keeps every thread out of the op until then).
    if (op.finished.fetch_add(1) + 1 == nth) {
        op.next_store.store(0);
        op.stored.store(0);
        op.next_item.store(0);
        op.finished.store(0);
    }
}
