// Vector kernels of the CPU ops (δ-mem's, attention's) over rows stored as f32 or f16, with an AVX2/FMA/F16C
// path chosen at run time on x86-64 (the library itself is built for the baseline instruction set;
// DELTAMEM_NO_AVX2=1 in the environment keeps to the portable kernels).
#pragma once

#include <ggml.h>

#include <cstddef>
#include <cstdint>

// Σ_i w[i] x[i] for a weight row w of `type` (f32 or f16).
float dm_vec_dot(const void * w, ggml_type type, const float * x, int64_t n);

// y[i] += Σ_d a[d * a_stride] w_d[i] for the m weight rows w_d of `type` (f32 or f16), w_row_bytes apart.
void dm_vec_mad_rows(float * y, const float * a, int64_t a_stride, const void * w, size_t w_row_bytes, ggml_type type,
                     int64_t m, int64_t n);

// out[c] = scale · (row c · x) for the m rows of n elements of `type` (f32 or f16), row_bytes apart.
void dm_vec_dots(const void * rows, size_t row_bytes, ggml_type type, int64_t m, const float * x, int64_t n, float scale,
                 float * out);

// p[c] = exp(s[c] - shift) for c < m; returns Σ p[c]. Arguments far below 0 give 0, as exp's underflow does.
float dm_vec_exp_shifted(float * p, const float * s, int64_t m, float shift);
