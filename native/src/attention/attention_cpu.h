// Causal self-attention of a pass as one CPU graph op over every sequence of the pass.
//
// ggml's flash attention takes one cache, so a batch of sequences needs one node (and its cache
// writes, and its barriers) per sequence, and it spreads a decoded token's few heads badly over
// the threads. This op takes the pass's queries, keys and values of all its sequences at once. It
// writes the new keys and values into each sequence's cache, then attends in work items of one
// sequence, one KV head and up to 16 of its tokens: all the query heads sharing that KV head,
// over the cache in blocks of 64 cells, f16 rows widened as they are read (online softmax, f32 sums).
// Each query's arithmetic is the same whatever the pass: a token gets the same bits alone, in a
// prompt, or in any batch. Graphs use it on every CPU layer (ggml's flash attention elsewhere).
#pragma once

#include <ggml.h>

#include <atomic>
#include <cstdint>
#include <vector>

// Userdata of one layer's op in one graph: its sequences' caches (their lengths are an input).
struct dm_attention_op {
    std::vector<ggml_tensor *> k_cache;   // per sequence [n_embd_k_gqa, n_ctx], f16 or f32
    std::vector<ggml_tensor *> v_cache;   // per sequence [n_embd_v_gqa, n_ctx]
    float                      scale = 1.0f;
    // This call's progress; the last thread out resets them.
    alignas(64) std::atomic<int32_t> next_store{0};   // (sequence, KV head) cache writes handed out
    alignas(64) std::atomic<int32_t> stored{0};       // threads done writing
    alignas(64) std::atomic<int32_t> next_item{0};    // attention items handed out
    alignas(64) std::atomic<int32_t> finished{0};     // threads done
};

// dst [head_dim_v * n_head, T]: the attention output of the T tokens of the sequences, one
// sequence after another. Sources:
//   [0] q [head_dim_k, n_head, T] f32    [1] k [head_dim_k, n_head_kv, T] f32
//   [2] v [head_dim_v * n_head_kv, T] f32
//   [3] seqs [2, n_seqs] i32: each sequence's token count and n_past (the cells already cached)
// Token i of a sequence (at position n_past + i) sees cells 0 ..= n_past + i of its cache.
void dm_attention_op_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);
