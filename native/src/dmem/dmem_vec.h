// Vector kernels of δ-mem's CPU ops over weight rows stored as f32 or f16, with an AVX2/FMA/F16C
// path chosen at run time on x86-64 (the library itself is built for the baseline instruction set;
// DELTAMEM_NO_AVX2=1 in the environment keeps to the portable kernels).
#pragma once

#include <ggml.h>

#include <cstdint>

// Σ_i w[i] x[i] for a weight row w of `type` (f32 or f16).
float dm_vec_dot(const void * w, ggml_type type, const float * x, int64_t n);

// y[i] += a * w[i] for a weight row w of `type` (f32 or f16).
void dm_vec_mad(float * y, float a, const void * w, ggml_type type, int64_t n);
