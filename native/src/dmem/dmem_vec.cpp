#include "dmem/dmem_vec.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DM_VEC_X86 1
#include <immintrin.h>
#endif

namespace {

// ---- portable kernels --------------------------------------------------------------------------

// f16 rows go through f32 in chunks of this many elements.
constexpr int64_t k_chunk = 64;

float dot_f32(const float * w, const float * x, int64_t n) {
    float acc[8] = {};   // eight partial sums, which compilers vectorise without reassociating
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; ++j) acc[j] += w[i + j] * x[i + j];
    }
    for (; i < n; ++i) acc[0] += w[i] * x[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

void mad_f32(float * y, float a, const float * w, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * w[i];
}

float dot_f16(const ggml_fp16_t * w, const float * x, int64_t n) {
    float buf[k_chunk];
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i += k_chunk) {
        const int64_t len = std::min(k_chunk, n - i);
        ggml_cpu_fp16_to_fp32(w + i, buf, len);
        sum += dot_f32(buf, x + i, len);
    }
    return sum;
}

void mad_f16(float * y, float a, const ggml_fp16_t * w, int64_t n) {
    float buf[k_chunk];
    for (int64_t i = 0; i < n; i += k_chunk) {
        const int64_t len = std::min(k_chunk, n - i);
        ggml_cpu_fp16_to_fp32(w + i, buf, len);
        mad_f32(y + i, a, buf, len);
    }
}

void mad_rows_f32(float * y, const float * a, int64_t a_stride, const float * w, int64_t w_stride, int64_t m, int64_t n) {
    for (int64_t d = 0; d < m; ++d) mad_f32(y, a[d * a_stride], w + d * w_stride, n);
}

void mad_rows_f16(float * y, const float * a, int64_t a_stride, const ggml_fp16_t * w, int64_t w_stride, int64_t m,
                  int64_t n) {
    for (int64_t d = 0; d < m; ++d) mad_f16(y, a[d * a_stride], w + d * w_stride, n);
}

// ---- x86-64 with AVX2, FMA and F16C ------------------------------------------------------------

#ifdef DM_VEC_X86
#define DM_AVX2 __attribute__((target("avx2,fma,f16c")))

DM_AVX2 __m256 load8(const float * p) { return _mm256_loadu_ps(p); }
DM_AVX2 __m256 load8(const ggml_fp16_t * p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
}
DM_AVX2 float load1(const float * p) { return *p; }
DM_AVX2 float load1(const ggml_fp16_t * p) { return _cvtsh_ss(*p); }

template <typename T>
DM_AVX2 float dot_avx2(const T * w, const float * x, int64_t n) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(load8(w + i + 8 * j), load8(x + i + 8 * j), acc[j]);
    }
    for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(load8(w + i), load8(x + i), acc[0]);
    const __m256 s8 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    float sum = _mm_cvtss_f32(s4);
    for (; i < n; ++i) sum += load1(w + i) * x[i];
    return sum;
}

// All m rows in one pass over y, eight elements at a time: y is loaded and stored once, not m times.
template <typename T>
DM_AVX2 void mad_rows_avx2(float * y, const float * a, int64_t a_stride, const T * w, int64_t w_stride, int64_t m, int64_t n) {
    constexpr int64_t max_rows = 16;
    for (int64_t d0 = 0; d0 < m; d0 += max_rows) {
        const int64_t rows = std::min(max_rows, m - d0);
        __m256 va[max_rows];
        for (int64_t d = 0; d < rows; ++d) va[d] = _mm256_set1_ps(a[(d0 + d) * a_stride]);
        const T * w0 = w + d0 * w_stride;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 acc = _mm256_loadu_ps(y + i);
            for (int64_t d = 0; d < rows; ++d) acc = _mm256_fmadd_ps(va[d], load8(w0 + d * w_stride + i), acc);
            _mm256_storeu_ps(y + i, acc);
        }
        for (; i < n; ++i) {
            for (int64_t d = 0; d < rows; ++d) y[i] += a[(d0 + d) * a_stride] * load1(w0 + d * w_stride + i);
        }
    }
}

// DELTAMEM_NO_AVX2=1 takes the portable kernels (as on CPUs without AVX2), for comparisons.
bool has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c") && !std::getenv("DELTAMEM_NO_AVX2");
    return yes;
}
#endif

} // namespace

float dm_vec_dot(const void * w, ggml_type type, const float * x, int64_t n) {
    const bool half = type == GGML_TYPE_F16;
#ifdef DM_VEC_X86
    if (has_avx2()) {
        return half ? dot_avx2(static_cast<const ggml_fp16_t *>(w), x, n) : dot_avx2(static_cast<const float *>(w), x, n);
    }
#endif
    return half ? dot_f16(static_cast<const ggml_fp16_t *>(w), x, n) : dot_f32(static_cast<const float *>(w), x, n);
}

void dm_vec_mad_rows(float * y, const float * a, int64_t a_stride, const void * w, size_t w_row_bytes, ggml_type type,
                     int64_t m, int64_t n) {
    const bool half = type == GGML_TYPE_F16;
    const int64_t w_stride = static_cast<int64_t>(w_row_bytes / ggml_type_size(type));
#ifdef DM_VEC_X86
    if (has_avx2()) {
        if (half) {
            mad_rows_avx2(y, a, a_stride, static_cast<const ggml_fp16_t *>(w), w_stride, m, n);
        } else {
            mad_rows_avx2(y, a, a_stride, static_cast<const float *>(w), w_stride, m, n);
        }
        return;
    }
#endif
    if (half) {
        mad_rows_f16(y, a, a_stride, static_cast<const ggml_fp16_t *>(w), w_stride, m, n);
    } else {
        mad_rows_f32(y, a, a_stride, static_cast<const float *>(w), w_stride, m, n);
    }
}
