#include "matmul/qmatmul.h"

#include <ggml-backend.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define DM_QMATMUL_X86
#endif

namespace {

constexpr int64_t k_block = 32;   // values per block, of the weights and of the quantised activations

// One quantised column: an act_pair for each pair of blocks (2p, 2p + 1; a zero second block when
// the count is odd).
struct act_pair {
    int8_t  q[64];     // x_2p[0:16], x_2p+1[0:16], x_2p[16:32], x_2p+1[16:32]: the order weights unpack to
    float   d[16];     // lanes 0-3 and 8-11: d_2p; lanes 4-7 and 12-15: d_2p+1 (as the products' lanes)
    int32_t off[16];   // lane 0: -8 Σ q_2p, lane 4: -8 Σ q_2p+1 (q4_0's offset, added to the integer sum)
    float   s[16];     // lane 0: d_2p Σ q_2p, lane 4: d_2p+1 Σ q_2p+1 (q4_1's min term m_w d_x Σ q_x)
};
static_assert(sizeof(act_pair) == 256, "the column layout is 64-byte pieces");

int64_t n_blocks(int64_t k) { return k / k_block; }
int64_t n_pairs(int64_t k) { return (n_blocks(k) + 1) / 2; }

const act_pair * pairs_of(const uint8_t * col) { return reinterpret_cast<const act_pair *>(col); }

// ggml's block layouts (the GGUF format): an f16 scale d (q4_1: and an f16 min m), then the values;
// a q4 byte j holds value j in its low nibble and value j + 16 in its high one.
template <ggml_type T> constexpr size_t block_bytes = T == GGML_TYPE_Q8_0 ? 34 : T == GGML_TYPE_Q4_1 ? 20 : 18;
template <ggml_type T> constexpr size_t values_at = T == GGML_TYPE_Q4_1 ? 4 : 2;

enum class isa { none, avx2, avx512 };

isa detect() {
#ifdef DM_QMATMUL_X86
    if (std::getenv("DELTAMEM_NO_QMATMUL") || std::getenv("DELTAMEM_NO_AVX2")) return isa::none;
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
        return isa::none;
    }
    const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return vnni && !std::getenv("DELTAMEM_NO_AVX512") ? isa::avx512 : isa::avx2;
#else
    return isa::none;
#endif
}

isa kernel_isa() {
    static const isa chosen = detect();
    return chosen;
}

#ifdef DM_QMATMUL_X86
#define DM_AVX2 __attribute__((target("avx2,fma,f16c")))
#define DM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")))

DM_AVX2 inline float half_at(const uint8_t * p) {
    uint16_t h;
    std::memcpy(&h, p, sizeof h);
    return _cvtsh_ss(h);
}

DM_AVX2 inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

DM_AVX2 inline int32_t hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

DM_AVX2 inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

DM_AVX2 void quantize_avx2(const float * x, int64_t k, uint8_t * out) {
    std::memset(out, 0, dm_qact_bytes(k));   // an odd count's empty last block, the lanes left zero
    auto * pairs = reinterpret_cast<act_pair *>(out);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i natural = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);   // undoes the packs' lane interleave
    for (int64_t b = 0; b < n_blocks(k); ++b) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; ++j) {
            v[j] = _mm256_loadu_ps(x + b * k_block + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        }
        const float d = hmax8(amax) / 127.0f;
        const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        __m256i q[4];
        for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id));   // ties to even
        const int32_t sum = hsum8_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, natural);
        act_pair & a = pairs[b / 2];
        const int h = static_cast<int>(b % 2);   // which block of its pair
        _mm_storeu_si128(reinterpret_cast<__m128i *>(a.q + 16 * h), _mm256_castsi256_si128(bytes));
        _mm_storeu_si128(reinterpret_cast<__m128i *>(a.q + 32 + 16 * h), _mm256_extracti128_si256(bytes, 1));
        for (int l = 0; l < 4; ++l) a.d[4 * h + l] = a.d[8 + 4 * h + l] = d;
        a.off[4 * h] = -8 * sum;
        a.s[4 * h] = d * static_cast<float>(sum);
    }
}

// ---- AVX-512 VNNI: a pair of blocks (64 values) a register ----------------------------------------

struct w512 {
    __m512i q;      // the values in the columns' order: q4 as u8 0..15, q8_0 as s8
    __m512  d;      // the blocks' scales, lane for lane
    __m512i base;   // q8_0: -128 Σ q_w per lane (the u8 shift of the columns' values undone)
    __m512  m;      // q4_1: lane 0 the first block's min, lane 4 the second's (against act_pair::s)
};

template <ggml_type T>
DM_AVX512 inline w512 load_pair512(const uint8_t * row, int64_t p, bool two) {
    const uint8_t * b0 = row + 2 * p * static_cast<int64_t>(block_bytes<T>);
    const uint8_t * b1 = b0 + block_bytes<T>;
    w512 w;
    w.d = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(half_at(b0)), _mm512_set1_ps(two ? half_at(b1) : 0.0f));
    w.m = T == GGML_TYPE_Q4_1 ? _mm512_maskz_mov_ps(0x0011, _mm512_mask_blend_ps(0x00F0, _mm512_set1_ps(half_at(b0 + 2)),
                                                                                _mm512_set1_ps(two ? half_at(b1 + 2) : 0.0f)))
                              : _mm512_setzero_ps();
    if constexpr (T == GGML_TYPE_Q8_0) {
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(b0 + 2));
        const __m256i hi = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i *>(b1 + 2)) : _mm256_setzero_si256();
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        w.q = _mm512_permutexvar_epi64(_mm512_set_epi64(7, 6, 3, 2, 5, 4, 1, 0), both);
        const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), w.q);
        w.base = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, 7));
    } else {
        const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(b0 + values_at<T>));
        const __m128i q1 = two ? _mm_loadu_si128(reinterpret_cast<const __m128i *>(b1 + values_at<T>)) : _mm_setzero_si128();
        const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1);
        const __m256i nibble = _mm256_set1_epi8(0x0F);
        const __m256i lo = _mm256_and_si256(both, nibble);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(both, 4), nibble);
        w.q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        w.base = _mm512_setzero_si512();
    }
    return w;
}

// y for R rows × C columns over all of k: each row's pair of blocks unpacked once for the C columns.
template <ggml_type T, int R, int C>
DM_AVX512 void tile512(const uint8_t * w, size_t w_row, int64_t k, const uint8_t * xq, size_t x_col, float * y,
                       int64_t y_stride) {
    const int64_t nb = n_blocks(k);
    __m512 acc[R][C];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < n_pairs(k); ++p) {
        const bool two = 2 * p + 1 < nb;
        w512 wr[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) wr[r] = load_pair512<T>(w + r * w_row, p, two);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
            const act_pair & a = pairs_of(xq + c * x_col)[p];
            __m512i x = _mm512_loadu_si512(a.q);
            const __m512 xd = _mm512_loadu_ps(a.d);
            if constexpr (T == GGML_TYPE_Q8_0) x = _mm512_xor_si512(x, _mm512_set1_epi8(static_cast<char>(0x80)));
            const __m512i base = T == GGML_TYPE_Q4_0 ? _mm512_loadu_si512(a.off) : _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                const __m512i s = T == GGML_TYPE_Q8_0 ? _mm512_dpbusd_epi32(wr[r].base, x, wr[r].q)
                                                      : _mm512_dpbusd_epi32(base, wr[r].q, x);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(wr[r].d, xd), acc[r][c]);
                if constexpr (T == GGML_TYPE_Q4_1) acc[r][c] = _mm512_fmadd_ps(wr[r].m, _mm512_loadu_ps(a.s), acc[r][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) y[c * y_stride + r] = _mm512_reduce_add_ps(acc[r][c]);
    }
}

// ---- AVX2: a pair of blocks as two registers -------------------------------------------------------

struct w256 {
    __m256i lo, hi;   // values 0:16 and 16:32 of the two blocks, as the columns hold them
    __m256  d;        // lanes 0-3: the first block's scale, 4-7: the second's
    __m256  m;        // q4_1: lane 0 the first block's min, lane 4 the second's
};

template <ggml_type T>
DM_AVX2 inline w256 load_pair256(const uint8_t * row, int64_t p, bool two) {
    const uint8_t * b0 = row + 2 * p * static_cast<int64_t>(block_bytes<T>);
    const uint8_t * b1 = b0 + block_bytes<T>;
    w256 w;
    w.d = _mm256_blend_ps(_mm256_set1_ps(half_at(b0)), _mm256_set1_ps(two ? half_at(b1) : 0.0f), 0xF0);
    w.m = T == GGML_TYPE_Q4_1 ? _mm256_blend_ps(_mm256_setzero_ps(), _mm256_blend_ps(_mm256_set1_ps(half_at(b0 + 2)),
                                                _mm256_set1_ps(two ? half_at(b1 + 2) : 0.0f), 0xF0), 0x11)
                              : _mm256_setzero_ps();
    if constexpr (T == GGML_TYPE_Q8_0) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(b0 + 2));
        const __m256i v1 = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i *>(b1 + 2)) : _mm256_setzero_si256();
        w.lo = _mm256_permute2x128_si256(v0, v1, 0x20);
        w.hi = _mm256_permute2x128_si256(v0, v1, 0x31);
    } else {
        const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(b0 + values_at<T>));
        const __m128i q1 = two ? _mm_loadu_si128(reinterpret_cast<const __m128i *>(b1 + values_at<T>)) : _mm_setzero_si128();
        const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1);
        const __m256i nibble = _mm256_set1_epi8(0x0F);
        w.lo = _mm256_and_si256(both, nibble);
        w.hi = _mm256_and_si256(_mm256_srli_epi16(both, 4), nibble);
    }
    return w;
}

// Σ over 32 byte pairs into 8 int32 lanes: u8 × s8 pairs (no overflow: |15 · 128 · 2| and
// |128 · 127 · 2| fit int16); q8_0's s8 × s8 goes through |w| and x with w's sign.
template <ggml_type T>
DM_AVX2 inline __m256i dot32(__m256i w, __m256i x) {
    const __m256i ones = _mm256_set1_epi16(1);
    if constexpr (T == GGML_TYPE_Q8_0) {
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones);
    } else {
        return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
    }
}

template <ggml_type T, int R, int C>
DM_AVX2 void tile256(const uint8_t * w, size_t w_row, int64_t k, const uint8_t * xq, size_t x_col, float * y,
                     int64_t y_stride) {
    const int64_t nb = n_blocks(k);
    __m256 acc[R][C];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    }
    for (int64_t p = 0; p < n_pairs(k); ++p) {
        const bool two = 2 * p + 1 < nb;
        w256 wr[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) wr[r] = load_pair256<T>(w + r * w_row, p, two);
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
            const act_pair & a = pairs_of(xq + c * x_col)[p];
            const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(a.q));
            const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(a.q + 32));
            const __m256 xd = _mm256_loadu_ps(a.d);
            const __m256i base = T == GGML_TYPE_Q4_0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i *>(a.off))
                                                     : _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                const __m256i s = _mm256_add_epi32(_mm256_add_epi32(dot32<T>(wr[r].lo, xlo), dot32<T>(wr[r].hi, xhi)), base);
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(wr[r].d, xd), acc[r][c]);
                if constexpr (T == GGML_TYPE_Q4_1) acc[r][c] = _mm256_fmadd_ps(wr[r].m, _mm256_loadu_ps(a.s), acc[r][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) y[c * y_stride + r] = hsum8(acc[r][c]);
    }
}

// ---- tiling ----------------------------------------------------------------------------------------

using tile_fn = void (*)(const uint8_t *, size_t, int64_t, const uint8_t *, size_t, float *, int64_t);

// The tiles of one ISA: full ones of R rows × C columns, and the single rows and narrower column
// groups at the edges. R * C accumulators fit the ISA's registers.
template <ggml_type T, bool wide> struct tiles;
template <ggml_type T> struct tiles<T, true> {
    static constexpr int R = 4, C = 4;
    static tile_fn pick(int rows, int cols) {
        static constexpr tile_fn full[] = {tile512<T, 4, 1>, tile512<T, 4, 2>, tile512<T, 4, 3>, tile512<T, 4, 4>};
        static constexpr tile_fn one[] = {tile512<T, 1, 1>, tile512<T, 1, 2>, tile512<T, 1, 3>, tile512<T, 1, 4>};
        return (rows == R ? full : one)[cols - 1];
    }
};
template <ggml_type T> struct tiles<T, false> {
    static constexpr int R = 2, C = 4;
    static tile_fn pick(int rows, int cols) {
        static constexpr tile_fn full[] = {tile256<T, 2, 1>, tile256<T, 2, 2>, tile256<T, 2, 3>, tile256<T, 2, 4>};
        static constexpr tile_fn one[] = {tile256<T, 1, 1>, tile256<T, 1, 2>, tile256<T, 1, 3>, tile256<T, 1, 4>};
        return (rows == R ? full : one)[cols - 1];
    }
};

// Columns in blocks of 64 (their quantised values stay in cache while the rows pass), then the
// rows in tiles, each tile over the block's columns.
template <ggml_type T, bool wide>
void rows_of(const uint8_t * w, size_t w_row, int64_t k, int64_t first, int64_t last, const uint8_t * xq, int64_t n,
             float * y, int64_t y_stride) {
    using tl = tiles<T, wide>;
    constexpr int64_t col_block = 64;
    const size_t x_col = dm_qact_bytes(k);
    for (int64_t c0 = 0; c0 < n; c0 += col_block) {
        const int64_t c1 = std::min(n, c0 + col_block);
        for (int64_t r = first; r < last;) {
            const int rows = last - r >= tl::R ? tl::R : 1;
            const uint8_t * wr = w + r * w_row;
            for (int64_t c = c0; c < c1; c += tl::C) {
                const int cols = static_cast<int>(std::min<int64_t>(tl::C, c1 - c));
                tl::pick(rows, cols)(wr, w_row, k, xq + c * x_col, x_col, y + c * y_stride + r, y_stride);
            }
            r += rows;
        }
    }
}

template <ggml_type T>
void rows_for(const uint8_t * w, size_t w_row, int64_t k, int64_t first, int64_t last, const uint8_t * xq, int64_t n,
              float * y, int64_t y_stride) {
    if (kernel_isa() == isa::avx512) {
        rows_of<T, true>(w, w_row, k, first, last, xq, n, y, y_stride);
    } else {
        rows_of<T, false>(w, w_row, k, first, last, xq, n, y, y_stride);
    }
}
#endif

} // namespace

const char * dm_qmatmul_kernel() {
    switch (kernel_isa()) {
        case isa::avx512: return "avx512-vnni";
        case isa::avx2: return "avx2";
        case isa::none: break;
    }
    return nullptr;
}

bool dm_qmatmul_takes_type(ggml_type type) {
    const bool ours = type == GGML_TYPE_Q4_0 || type == GGML_TYPE_Q4_1 || type == GGML_TYPE_Q8_0;
    return ours && kernel_isa() != isa::none;
}

bool dm_qmatmul_serves(const ggml_tensor * w, const ggml_tensor * x) {
    if (!dm_qmatmul_takes_type(w->type) || w->ne[0] % k_block != 0 || !ggml_is_contiguous(w)) return false;
    if (!w->buffer || !ggml_backend_buffer_is_host(w->buffer)) return false;
    return x->type == GGML_TYPE_F32 && x->ne[0] == w->ne[0] && x->nb[0] == sizeof(float) && x->ne[2] == 1 &&
           x->ne[3] == 1 && w->ne[2] == 1 && w->ne[3] == 1;
}

size_t dm_qact_bytes(int64_t k) {
    return static_cast<size_t>(n_pairs(k)) * sizeof(act_pair);
}

void dm_qact_quantize(const float * x, size_t x_col_bytes, int64_t k, int64_t n, void * out) {
#ifdef DM_QMATMUL_X86
    for (int64_t t = 0; t < n; ++t) {
        quantize_avx2(reinterpret_cast<const float *>(reinterpret_cast<const char *>(x) + t * x_col_bytes), k,
                      static_cast<uint8_t *>(out) + t * dm_qact_bytes(k));
    }
#else
    (void) x, (void) x_col_bytes, (void) k, (void) n, (void) out;
#endif
}

void dm_qmatmul_rows(const void * w, size_t w_row_bytes, ggml_type type, int64_t k, int64_t first, int64_t last,
                     const void * xq, int64_t n, float * y, int64_t y_stride) {
#ifdef DM_QMATMUL_X86
    const auto * wb = static_cast<const uint8_t *>(w);
    const auto * xb = static_cast<const uint8_t *>(xq);
    switch (type) {
        case GGML_TYPE_Q4_0: rows_for<GGML_TYPE_Q4_0>(wb, w_row_bytes, k, first, last, xb, n, y, y_stride); break;
        case GGML_TYPE_Q4_1: rows_for<GGML_TYPE_Q4_1>(wb, w_row_bytes, k, first, last, xb, n, y, y_stride); break;
        case GGML_TYPE_Q8_0: rows_for<GGML_TYPE_Q8_0>(wb, w_row_bytes, k, first, last, xb, n, y, y_stride); break;
        default: break;
    }
#else
    (void) w, (void) w_row_bytes, (void) type, (void) k, (void) first, (void) last, (void) xq, (void) n, (void) y,
        (void) y_stride;
#endif
}

void dm_qact_op_cpu(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * x = dst->src[0];
    const int64_t first = x->ne[1] * ith / nth, last = x->ne[1] * (ith + 1) / nth;
    dm_qact_quantize(reinterpret_cast<const float *>(static_cast<const char *>(x->data) + first * x->nb[1]), x->nb[1],
                     x->ne[0], last - first, static_cast<char *>(dst->data) + first * dst->nb[1]);
}

void dm_qmatmul_op_cpu(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * w = dst->src[0];
    const ggml_tensor * x = dst->src[1];
    const void * xq = x->data;
    if (x->type == GGML_TYPE_F32) {   // a few columns: each thread quantises them itself (no node, no barrier)
        thread_local std::vector<char> own;
        own.resize(dm_qact_bytes(x->ne[0]) * static_cast<size_t>(x->ne[1]));
        dm_qact_quantize(static_cast<const float *>(x->data), x->nb[1], x->ne[0], x->ne[1], own.data());
        xq = own.data();
    }
    // Rows in shares of whole 4-row tiles (a row's sum is the same in any tile: shares only balance the work).
    const int64_t tiles = (w->ne[1] + 3) / 4;
    const int64_t first = std::min(w->ne[1], tiles * ith / nth * 4);
    const int64_t last = std::min(w->ne[1], tiles * (ith + 1) / nth * 4);
    dm_qmatmul_rows(w->data, w->nb[1], w->type, w->ne[0], first, last, xq, x->ne[1], static_cast<float *>(dst->data),
                    dst->nb[1] / static_cast<int64_t>(sizeof(float)));
}
