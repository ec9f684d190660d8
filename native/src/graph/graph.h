// Graph building: one forward pass over a batch of tokens, as a ggml compute graph.
#pragma once

#include "model/model.h"

#include <ggml.h>

#include <memory>
#include <vector>

struct dm_kv_cache;
struct dm_dmem_builder;
struct dm_attention_op;

// Inputs of one forward pass; the builder creates the tensors, the context fills them after allocation.
struct dm_graph_inputs {
    ggml_tensor * tokens = nullptr;   // [n_tokens] i32
    ggml_tensor * pos    = nullptr;   // [n_tokens] i32, absolute positions
    ggml_tensor * mask   = nullptr;   // [n_kv, n_tokens] f16, 0 or -inf (causal, and cells not yet written)
    ggml_tensor * kv_idx = nullptr;   // [n_tokens] i64, the cache cells this pass writes
    ggml_tensor * seqs   = nullptr;   // [2, n_seqs] i32: n_tokens, n_past (the CPU ops')
    ggml_tensor * dmem_plans = nullptr;   // batched passes: [T + n_seqs] i32, every sequence's δ-mem plan codes
};

// What decides a graph's topology. Positions are inputs, and the attended cache length is padded,
// so consecutive single-token passes share one shape and so one graph.
struct dm_graph_shape {
    int32_t n_tokens  = 0;   // tokens in this pass
    int32_t n_kv      = 0;   // cache cells attended: n_past + n_tokens rounded up (see dm_padded_n_kv)
    int32_t n_outputs = 0;   // rows of logits to compute: 0, 1 (the last token) or n_tokens

    bool operator==(const dm_graph_shape & o) const {
        return n_tokens == o.n_tokens && n_kv == o.n_kv && n_outputs == o.n_outputs;
    }
};

// Cells to attend for n_used cells in use: padded to a multiple of 256 (capped at n_ctx); masked
// cells cost little and a decode rebuilds its graph once per 256 tokens instead of every token.
int32_t dm_padded_n_kv(int32_t n_used, int32_t n_ctx);

// Userdata of a graph's CPU attention ops: whoever keeps the graph keeps these.
using dm_attention_ops = std::vector<std::shared_ptr<dm_attention_op>>;

struct dm_graph {
    ggml_cgraph *    gf = nullptr;
    dm_graph_inputs  in;
    ggml_tensor *    logits = nullptr;   // [n_vocab, n_outputs] or nullptr
    dm_attention_ops attention_ops;
};

// Builds the forward graph in ctx (a no_alloc context sized for max_nodes). dmem, when not null,
// adds the model's δ-mem adapter to the same graph gf (the builder records its nodes there).
dm_graph dm_build_forward(ggml_context * ctx, ggml_cgraph * gf, const dm_model & model, const dm_kv_cache & kv,
                          const dm_graph_shape & shape, dm_dmem_builder * dmem);

// One sequence of a batched pass (dm_build_forward_batch makes its inputs).
struct dm_batch_seq {
    const dm_kv_cache * kv = nullptr;
    dm_graph_shape      shape;             // its tokens, the cells it attends, its outputs (0, 1 or all)
    dm_dmem_builder *   dmem = nullptr;    // its memory's part of the pass (null without an adapter)
    ggml_tensor *       mask = nullptr;    // [n_kv, n_tokens] f16
    ggml_tensor *       kv_idx = nullptr;  // [n_tokens] i64
};

struct dm_batch_graph {
    ggml_cgraph *    gf = nullptr;
    ggml_tensor *    tokens = nullptr;    // [T] i32: the sequences' tokens one after another
    ggml_tensor *    pos = nullptr;       // [T] i32
    ggml_tensor *    out_idx = nullptr;   // [n_outputs] i32: the token columns whose logits are wanted
    ggml_tensor *    logits = nullptr;    // [n_vocab, n_outputs] or null
    ggml_tensor *    seqs = nullptr;      // [2, n_seqs] i32: each sequence's n_tokens, n_past (the CPU ops')
    ggml_tensor *    dmem_plans = nullptr;   // [T + n_seqs] i32: the sequences' δ-mem plan codes, or null
    dm_attention_ops attention_ops;
};

// The forward pass of several sequences of one model in one graph: every weight mat-mul once over
// all T tokens; the δ-mem scan per sequence over its own state; attention in one op over all the
// sequences' caches on CPU layers, else per sequence over its own cache.
dm_batch_graph dm_build_forward_batch(ggml_context * ctx, ggml_cgraph * gf, const dm_model & model,
                                      std::vector<dm_batch_seq> & seqs);

// Node budget of one pass (its leaves too: the scheduler counts both); the same for every shape.
size_t dm_graph_max_nodes(const dm_model & model);
