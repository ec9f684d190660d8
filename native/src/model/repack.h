// Weights moved into the CPU backend's repack buffer, where ggml stores them interleaved for its
// faster mat-mul kernels (q4_0, q4_K, iq4_nl, ... as this ggml build supports them).
#pragma once

#include <ggml-backend.h>
#include <ggml.h>

#include <vector>

struct dm_model;

struct dm_repacked_weights {
    ggml_context *        ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    int                   n_tensors = 0;

    dm_repacked_weights() = default;
    dm_repacked_weights(const dm_repacked_weights &) = delete;
    dm_repacked_weights & operator=(const dm_repacked_weights &) = delete;
    ~dm_repacked_weights();
};

// Copies every mat-mul weight the repack buffer supports into it and points the model at the
// copies. Types it does not support, and those the engine's own mat-mul kernel takes
// (matmul/qmatmul.h), stay memory-mapped. A ggml without a repack buffer is a no-op.
void dm_repack_weights(dm_model & model);
