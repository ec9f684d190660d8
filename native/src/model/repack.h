// Weights moved, at load, into layouts faster kernels read: the CPU backend's repack buffer, where
// ggml stores them interleaved (q4_K, iq4_nl, ... as this ggml build supports them), and the
// engine's AMX kernel's own layout for q4_0, q4_1 and q8_0.
#pragma once

#include <ggml-backend.h>
#include <ggml.h>

#include <vector>

struct dm_model;

// Weights copied out of the file into a buffer of their own (freed with the model).
struct dm_weight_copies {
    ggml_context *        ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;

    dm_weight_copies() = default;
    dm_weight_copies(const dm_weight_copies &) = delete;
    dm_weight_copies & operator=(const dm_weight_copies &) = delete;
    ~dm_weight_copies();
};

struct dm_repacked_weights {
    dm_weight_copies ggml_repack;   // in ggml's CPU repack buffer
    dm_weight_copies amx;           // in the AMX kernel's layout (matmul/qmatmul.h), a plain CPU buffer
    int              n_tensors = 0;   // in either
};

// Copies every mat-mul weight the repack buffer supports into it, and every one the engine's AMX
// kernel packs into its layout, and points the model at the copies. Other weights stay memory-mapped
// (those of the engine's kernel types run its VNNI or AVX2 kernel from there). No repack buffer in
// this ggml and no AMX: a no-op.
void dm_repack_weights(dm_model & model);
