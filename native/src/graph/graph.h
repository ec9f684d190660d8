// Graph building: one forward pass over a batch of tokens, as a ggml compute graph.
#pragma once

#include "model/model.h"

#include <ggml.h>

#include <vector>

struct dm_kv_cache;
struct dm_dmem_builder;

// Inputs of one forward pass; the builder creates the tensors, the context fills them after allocation.
struct dm_graph_inputs {
    ggml_tensor * tokens = nullptr;   // [n_tokens] i32
    ggml_tensor * pos    = nullptr;   // [n_tokens] i32, absolute positions
    ggml_tensor * mask   = nullptr;   // [n_kv, n_tokens] f16, 0 or -inf (causal)
};

struct dm_graph_shape {
    int32_t n_tokens = 0;   // tokens in this pass
    int32_t n_past   = 0;   // tokens already in the KV cache
    int32_t n_outputs = 0;  // rows of logits to compute: 0, 1 (the last token) or n_tokens
    int32_t n_kv() const { return n_past + n_tokens; }
};

struct dm_graph {
    ggml_cgraph *   gf = nullptr;
    dm_graph_inputs in;
    ggml_tensor *   logits = nullptr;   // [n_vocab, n_outputs] or nullptr
};

// Builds the forward graph in ctx (a no_alloc context sized for max_nodes). dmem, when not null,
// adds the model's δ-mem adapter (its graph must be gf, see dm_new_forward_graph).
dm_graph dm_build_forward(ggml_context * ctx, ggml_cgraph * gf, const dm_model & model, const dm_kv_cache & kv,
                          const dm_graph_shape & shape, dm_dmem_builder * dmem);

// Node budget of one pass; portable δ-mem scans unroll over the tokens of the pass.
size_t dm_graph_max_nodes(const dm_model & model, int32_t n_tokens, bool dmem_unrolled);
