#include "common/vec.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cmath>
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

void dots_f32(const float * rows, int64_t row_stride, int64_t m, const float * x, int64_t n, float scale, float * out) {
    for (int64_t c = 0; c < m; ++c) out[c] = scale * dot_f32(rows + c * row_stride, x, n);
}

void dots_f16(const ggml_fp16_t * rows, int64_t row_stride, int64_t m, const float * x, int64_t n, float scale, float * out) {
    for (int64_t c = 0; c < m; ++c) out[c] = scale * dot_f16(rows + c * row_stride, x, n);
}

float exp_shifted(float * p, const float * s, int64_t m, float shift) {
    float sum = 0.0f;
    for (int64_t c = 0; c < m; ++c) sum += p[c] = std::exp(s[c] - shift);
    return sum;
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

DM_AVX2 float hsum(__m256 v) {
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    return _mm_cvtss_f32(s4);
}

template <typename T>
DM_AVX2 float dot_avx2(const T * w, const float * x, int64_t n) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(load8(w + i + 8 * j), load8(x + i + 8 * j), acc[j]);
    }
    for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(load8(w + i), load8(x + i), acc[0]);
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
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

// Four rows at a time: x is loaded once for the four, and their sums reduce together. f16 rows are
// widened as they are loaded (exactly), so they give the bits their f32 copy would.
template <typename T>
DM_AVX2 void dots_avx2(const T * rows, int64_t row_stride, int64_t m, const float * x, int64_t n, float scale, float * out) {
    int64_t c = 0;
    for (; c + 4 <= m; c += 4) {
        const T * w = rows + c * row_stride;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 xv = _mm256_loadu_ps(x + i);
            for (int r = 0; r < 4; ++r) acc[r] = _mm256_fmadd_ps(load8(w + r * row_stride + i), xv, acc[r]);
        }
        // hadd twice leaves each row's halves in its lane of the two 128-bit halves
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        float sums[4];
        _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        for (int r = 0; r < 4; ++r) {
            for (int64_t t = i; t < n; ++t) sums[r] += load1(w + r * row_stride + t) * x[t];
            out[c + r] = scale * sums[r];
        }
    }
    for (; c < m; ++c) out[c] = scale * dot_avx2(rows + c * row_stride, x, n);
}

// exp(x) = 2^k e^r with k = round(x / ln 2) and |r| <= ln 2 / 2, e^r by its Taylor polynomial to
// r^6 (relative error below 2e-7 there), 2^k put straight into the exponent bits.
DM_AVX2 __m256 exp8(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.0f);   // below it exp underflows f32's normal range: 0
    const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lowest), _mm256_set1_ps(88.0f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), x);   // ln 2 in two parts: exact k ln2_hi
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(two_k)));
}

DM_AVX2 float exp_shifted_avx2(float * p, const float * s, int64_t m, float shift) {
    const __m256 vs = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= m; c += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), vs));
        _mm256_storeu_ps(p + c, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    for (; c < m; ++c) sum += p[c] = std::exp(s[c] - shift);
    return sum;
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

void dm_vec_dots(const void * rows, size_t row_bytes, ggml_type type, int64_t m, const float * x, int64_t n, float scale,
                 float * out) {
    const bool half = type == GGML_TYPE_F16;
    const int64_t stride = static_cast<int64_t>(row_bytes / ggml_type_size(type));
#ifdef DM_VEC_X86
    if (has_avx2()) {
        if (half) return dots_avx2(static_cast<const ggml_fp16_t *>(rows), stride, m, x, n, scale, out);
        return dots_avx2(static_cast<const float *>(rows), stride, m, x, n, scale, out);
    }
#endif
    if (half) return dots_f16(static_cast<const ggml_fp16_t *>(rows), stride, m, x, n, scale, out);
    dots_f32(static_cast<const float *>(rows), stride, m, x, n, scale, out);
}

float dm_vec_exp_shifted(float * p, const float * s, int64_t m, float shift) {
#ifdef DM_VEC_X86
    if (has_avx2()) return exp_shifted_avx2(p, s, m, shift);
#endif
    return exp_shifted(p, s, m, shift);
}
