#include "matmul/qmatmul.h"

#include <ggml-backend.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics start from a self-initialised "undefined" register and warn when
// inlined (GCC bug 105593, fixed in 13): a false positive in the compiler's own header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#define DM_QMATMUL_X86
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace {

constexpr int64_t k_block = 32;   // values per block, of the weights and of the quantised activations
constexpr int64_t k_amx_rows = 16;   // weight rows an AMX B tile holds (the lanes of an accumulator)

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

enum class isa { none, avx2, avx512, amx };

#ifdef DM_QMATMUL_X86
// AMX-TILE and AMX-INT8 (CPUID leaf 7: EDX bits 24, 25), and Linux's leave to use their 8 KiB of tile
// state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, feature 18), which it grants per process.
bool amx_usable() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 25))) return false;
#ifdef __linux__
    constexpr long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
#else
    return false;
#endif
}
#endif

isa detect() {
#ifdef DM_QMATMUL_X86
    if (std::getenv("DELTAMEM_NO_QMATMUL") || std::getenv("DELTAMEM_NO_AVX2")) return isa::none;
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
        return isa::none;
    }
    const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (!vnni || std::getenv("DELTAMEM_NO_AVX512")) return isa::avx2;
    return amx_usable() && !std::getenv("DELTAMEM_NO_AMX") ? isa::amx : isa::avx512;
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
#define DM_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")))

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

// ---- AMX (Intel's tile matrix unit): 16 weight rows × 8 columns × a pair of blocks an instruction ----
//
// One tile product C += A B sums 64 byte products per output: A holds the columns' activations, two
// rows a column (block 2p of the pair in one, block 2p + 1 in the other, the other block's bytes
// zeroed), B the pair of blocks of 16 weight rows, so C [2 × columns, 16] holds every (column, block,
// weight row) integer sum at once and AVX-512 scales them into per-column accumulators whose lanes
// are the 16 weight rows: a few vector instructions per 16 rows × 8 columns × 64 values, where VNNI
// needs four per row and column. The K order is act_pair's: positions 0-15 block 2p's values 0-15,
// 16-31 block 2p + 1's 0-15, 32-47 and 48-63 their values 16-31.
//
// B wants each weight row's values 4 at a time side by side with the other rows' (row kk of the tile:
// positions 4kk .. 4kk + 3 of weight rows 0-15), so the model's weights are stored for it once, at
// load (dm_qmatmul_pack): per 16 rows and pair of blocks, in the same bytes as before,
//   q4_0 / q4_1: 8 × 64 bytes: piece 4h + c holds bytes 4c .. 4c + 3 of block 2p + h of each row
//                (low nibbles: B row 4h + c; high nibbles: B row 8 + 4h + c)
//   q8_0:        the B tile itself, 16 × 64 bytes
// then the 2 × 16 block scales d (f16; q4_1: then the 2 × 16 mins m).

constexpr int k_amx_cols = 8;        // columns an A tile holds (two of its 16 rows each)

template <ggml_type T> constexpr size_t amx_values_bytes = T == GGML_TYPE_Q8_0 ? 1024 : 512;
template <ggml_type T> constexpr size_t amx_unit_bytes = k_amx_rows * 2 * block_bytes<T>;   // 16 rows × 2 blocks

// The K position (0-63) of value v of block 2p + h of a pair, in act_pair's order.
constexpr int position_in_pair(int h, int v) { return 16 * h + (v < 16 ? v : 16 + v); }

// 16 rows × one pair of blocks, from the GGUF layout (rows w_row bytes apart) into the packed unit.
// B row kk holds K positions 4kk .. 4kk + 3 of each weight row, and 4 consecutive values of a block
// stay consecutive positions, so values move 4 bytes at a time.
template <ggml_type T>
void pack_unit(const uint8_t * w, size_t w_row, int64_t p, uint8_t * out) {
    uint8_t * values = out;
    auto * scales = reinterpret_cast<uint16_t *>(out + amx_values_bytes<T>);
    for (int r = 0; r < k_amx_rows; ++r) {
        for (int h = 0; h < 2; ++h) {
            const uint8_t * block = w + r * w_row + (2 * p + h) * block_bytes<T>;
            std::memcpy(&scales[16 * h + r], block, 2);
            if constexpr (T == GGML_TYPE_Q4_1) std::memcpy(&scales[32 + 16 * h + r], block + 2, 2);
            if constexpr (T == GGML_TYPE_Q8_0) {
                for (int v = 0; v < 32; v += 4) {
                    std::memcpy(values + position_in_pair(h, v) / 4 * 64 + 4 * r, block + values_at<T> + v, 4);
                }
            } else {
                for (int c = 0; c < 4; ++c) std::memcpy(values + (4 * h + c) * 64 + 4 * r, block + values_at<T> + 4 * c, 4);
            }
        }
    }
}

// A pair of 16 rows ready for the tile unit: the B tile (q8_0: the packed bytes themselves) and the
// rows' block scales (q4_1: and mins) as f32.
struct amx_pair {
    alignas(64) uint8_t b[16][64];
    const uint8_t * tile = nullptr;
    float d[2][16];
    float m[2][16];
};

DM_AMX void store_f16x16_as_f32(const uint8_t * f16, float * out) {
    _mm512_storeu_ps(out, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(f16))));
}

template <ggml_type T>
DM_AMX void unpack_unit(const uint8_t * unit, amx_pair & out) {
    const auto * scales = unit + amx_values_bytes<T>;
    for (int h = 0; h < 2; ++h) {
        store_f16x16_as_f32(scales + 32 * h, out.d[h]);
        if constexpr (T == GGML_TYPE_Q4_1) {
            store_f16x16_as_f32(scales + 64 + 32 * h, out.m[h]);
        }
    }
    if constexpr (T == GGML_TYPE_Q8_0) {
        out.tile = unit;
    } else {
        const __m512i nibble = _mm512_set1_epi8(0x0F);
        for (int piece = 0; piece < 8; ++piece) {
            const __m512i v = _mm512_loadu_si512(unit + 64 * piece);
            _mm512_store_si512(out.b[piece], _mm512_and_si512(v, nibble));
            _mm512_store_si512(out.b[8 + piece], _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
        }
        out.tile = &out.b[0][0];
    }
}

// The A tile of one pair for nc columns: row 2c block 2p of column c, row 2c + 1 block 2p + 1.
DM_AMX void columns_pair_amx(const uint8_t * xq, size_t x_col, int64_t p, int nc, uint8_t (*a)[64]) {
    for (int c = 0; c < nc; ++c) {
        const act_pair & x = pairs_of(xq + c * x_col)[p];
        _mm512_storeu_si512(a[2 * c], _mm512_maskz_loadu_epi8(0x0000FFFF0000FFFFull, x.q));
        _mm512_storeu_si512(a[2 * c + 1], _mm512_maskz_loadu_epi8(0xFFFF0000FFFF0000ull, x.q));
    }
}

// Tiles 0-1: C (2 nc rows of 16 int32), 2-3: A (2 nc rows of 64 bytes), 4-5: B (16 rows of 64
// bytes); two of each so that one pair's product runs while the other's sums are scaled.
struct alignas(64) amx_config {
    uint8_t  palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t  rows[16] = {};
};

thread_local int amx_configured_cols = 0;   // this thread's tile shapes (0: none, as after release)

DM_AMX void configure_amx(int nc) {
    if (amx_configured_cols == nc) return;
    amx_config cfg;
    for (int t = 0; t < 6; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = static_cast<uint8_t>(t < 4 ? 2 * nc : 16);
    }
    _tile_loadconfig(&cfg);
    amx_configured_cols = nc;
}

// Frees the thread's tile state (the kernel then need not save it on context switches).
DM_AMX void release_amx() {
    _tile_release();
    amx_configured_cols = 0;
}

// acc[c] (lanes: the 16 weight rows) += the pair's sums for column c, sums [2 nc][16] int32 as C holds them.
template <ggml_type T>
DM_AMX inline void scale_pair_amx(const int32_t (*sums)[16], const amx_pair & wp, const uint8_t * xq, size_t x_col,
                                  int64_t p, int nc, __m512 * acc) {
    for (int c = 0; c < nc; ++c) {
        const act_pair & x = pairs_of(xq + c * x_col)[p];
        for (int h = 0; h < 2; ++h) {   // block 2p + h: act_pair's lane 4h
            __m512i s = _mm512_load_si512(sums[2 * c + h]);
            if constexpr (T == GGML_TYPE_Q4_0) s = _mm512_add_epi32(s, _mm512_set1_epi32(x.off[4 * h]));
            const __m512 d = _mm512_mul_ps(_mm512_loadu_ps(wp.d[h]), _mm512_set1_ps(x.d[4 * h]));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, acc[c]);
            if constexpr (T == GGML_TYPE_Q4_1) acc[c] = _mm512_fmadd_ps(_mm512_loadu_ps(wp.m[h]), _mm512_set1_ps(x.s[4 * h]), acc[c]);
        }
    }
}

// The product of one pair: tile c = tile ta · tile tb (q4 weights unsigned, q8_0 signed), after
// loading them. The tile numbers must be literals (GCC writes them into the instruction's text).
#define DM_AMX_PRODUCT(T, c, ta, tb, a, b)                                                              \
    do {                                                                                                \
        _tile_loadd(ta, (a), 64);                                                                       \
        _tile_loadd(tb, (b), 64);                                                                       \
        _tile_zero(c);                                                                                  \
        if constexpr ((T) == GGML_TYPE_Q8_0) _tile_dpbssd(c, ta, tb);                                   \
        else _tile_dpbsud(c, ta, tb);                                                                   \
    } while (0)

// y for 16 weight rows × nc columns over all pairs (wp: the rows' pairs, a: the columns' A tiles).
// Two pairs a step in tiles 0 and 1; a step's sums are stored at its end and scaled in the next step,
// after its products are issued, so that neither the tile unit nor the vector loads wait on the other.
template <ggml_type T>
DM_AMX void tile_amx(const amx_pair * wp, const uint8_t (*a)[16][64], const uint8_t * xq, size_t x_col, int64_t pairs,
                     int nc, float * y, int64_t y_stride) {
    configure_amx(nc);
    __m512 acc[k_amx_cols];
    for (int c = 0; c < k_amx_cols; ++c) acc[c] = _mm512_setzero_ps();
    alignas(64) int32_t sums[2][2][16][16];   // [step parity][pair of the step][C row][weight row]
    for (int64_t p = 0; p < pairs + 2; p += 2) {
        const int now = static_cast<int>(p / 2 % 2);
        if (p < pairs) DM_AMX_PRODUCT(T, 0, 2, 4, a[p], wp[p].tile);
        if (p + 1 < pairs) DM_AMX_PRODUCT(T, 1, 3, 5, a[p + 1], wp[p + 1].tile);
        for (int64_t q = p - 2; q < p && q < pairs; ++q) {   // the previous step's pairs
            if (q >= 0) scale_pair_amx<T>(sums[1 - now][q % 2], wp[q], xq, x_col, q, nc, acc);
        }
        if (p < pairs) _tile_stored(0, sums[now][0], 64);
        if (p + 1 < pairs) _tile_stored(1, sums[now][1], 64);
    }
    for (int c = 0; c < nc; ++c) _mm512_storeu_ps(y + c * y_stride, acc[c]);
}
#undef DM_AMX_PRODUCT

// Rows [first, last) (whole groups of 16) × n columns of packed weights: columns in blocks of 64
// (their A tiles made once), then the rows 16 at a time (their pairs unpacked once for the block),
// then the columns 8 at a time.
template <ggml_type T>
void rows_amx(const uint8_t * w, int64_t k, int64_t first, int64_t last, const uint8_t * xq, int64_t n, float * y,
              int64_t y_stride) {
    constexpr int64_t col_block = 64;
    const int64_t pairs = n_pairs(k);
    const size_t x_col = dm_qact_bytes(k);
    thread_local std::vector<amx_pair> wp;
    thread_local std::vector<uint8_t> a_bytes;
    wp.resize(static_cast<size_t>(pairs));
    for (int64_t c0 = 0; c0 < n; c0 += col_block) {
        const int64_t c1 = std::min(n, c0 + col_block);
        const int64_t col_tiles = (c1 - c0 + k_amx_cols - 1) / k_amx_cols;
        a_bytes.resize(static_cast<size_t>(col_tiles * pairs) * 16 * 64 + 64);
        auto * a = reinterpret_cast<uint8_t (*)[16][64]>((reinterpret_cast<uintptr_t>(a_bytes.data()) + 63) & ~uintptr_t{63});
        for (int64_t t = 0; t < col_tiles; ++t) {
            const int nc = static_cast<int>(std::min<int64_t>(k_amx_cols, c1 - c0 - t * k_amx_cols));
            for (int64_t p = 0; p < pairs; ++p) columns_pair_amx(xq + (c0 + t * k_amx_cols) * x_col, x_col, p, nc, a[t * pairs + p]);
        }
        for (int64_t r = first; r < last; r += k_amx_rows) {
            const uint8_t * group = w + r / k_amx_rows * pairs * static_cast<int64_t>(amx_unit_bytes<T>);
            for (int64_t p = 0; p < pairs; ++p) unpack_unit<T>(group + p * amx_unit_bytes<T>, wp[static_cast<size_t>(p)]);
            for (int64_t t = 0; t < col_tiles; ++t) {
                const int64_t c = c0 + t * k_amx_cols;
                const int nc = static_cast<int>(std::min<int64_t>(k_amx_cols, c1 - c));
                tile_amx<T>(wp.data(), a + t * pairs, xq + c * x_col, x_col, pairs, nc, y + c * y_stride + r, y_stride);
            }
        }
    }
    release_amx();
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
void rows_for(const uint8_t * w, size_t w_row, bool packed, int64_t k, int64_t first, int64_t last, const uint8_t * xq,
              int64_t n, float * y, int64_t y_stride) {
    if (packed) {
        rows_amx<T>(w, k, first, last, xq, n, y, y_stride);
    } else if (kernel_isa() != isa::avx2) {   // AVX-512 VNNI (also where AMX takes the packed weights)
        rows_of<T, true>(w, w_row, k, first, last, xq, n, y, y_stride);
    } else {
        rows_of<T, false>(w, w_row, k, first, last, xq, n, y, y_stride);
    }
}

template <ggml_type T>
void pack_rows(const uint8_t * w, int64_t k, int64_t rows, uint8_t * out) {
    const size_t w_row = static_cast<size_t>(n_blocks(k)) * block_bytes<T>;
    for (int64_t r = 0; r < rows; r += k_amx_rows) {
        for (int64_t p = 0; p < n_pairs(k); ++p, out += amx_unit_bytes<T>) pack_unit<T>(w + r * w_row, w_row, p, out);
    }
}
#endif

} // namespace

const char * dm_qmatmul_kernel() {
    switch (kernel_isa()) {
        case isa::amx: return "amx-int8";
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

bool dm_qmatmul_packs(ggml_type type, int64_t k, int64_t rows) {
    return kernel_isa() == isa::amx && dm_qmatmul_takes_type(type) && k % (2 * k_block) == 0 && rows % k_amx_rows == 0;
}

void dm_qmatmul_pack(const void * w, ggml_type type, int64_t k, int64_t rows, void * out) {
#ifdef DM_QMATMUL_X86
    const auto * from = static_cast<const uint8_t *>(w);
    auto * to = static_cast<uint8_t *>(out);
    switch (type) {
        case GGML_TYPE_Q4_0: pack_rows<GGML_TYPE_Q4_0>(from, k, rows, to); break;
        case GGML_TYPE_Q4_1: pack_rows<GGML_TYPE_Q4_1>(from, k, rows, to); break;
        case GGML_TYPE_Q8_0: pack_rows<GGML_TYPE_Q8_0>(from, k, rows, to); break;
        default: break;
    }
#else
    (void) w, (void) type, (void) k, (void) rows, (void) out;
#endif
}

namespace {
// What a packed weight's `extra` points at (ggml reads `extra` only in its own extra buffer types).
const char k_packed_tag = 0;
} // namespace

void dm_qmatmul_mark_packed(ggml_tensor * w) {
    w->extra = const_cast<char *>(&k_packed_tag);
}

bool dm_qmatmul_is_packed(const ggml_tensor * w) {
    return w->extra == &k_packed_tag;
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

void dm_qmatmul_rows(const void * w, size_t w_row_bytes, ggml_type type, bool packed, int64_t k, int64_t first,
                     int64_t last, const void * xq, int64_t n, float * y, int64_t y_stride) {
#ifdef DM_QMATMUL_X86
    const auto * wb = static_cast<const uint8_t *>(w);
    const auto * xb = static_cast<const uint8_t *>(xq);
    switch (type) {
        case GGML_TYPE_Q4_0: rows_for<GGML_TYPE_Q4_0>(wb, w_row_bytes, packed, k, first, last, xb, n, y, y_stride); break;
        case GGML_TYPE_Q4_1: rows_for<GGML_TYPE_Q4_1>(wb, w_row_bytes, packed, k, first, last, xb, n, y, y_stride); break;
        case GGML_TYPE_Q8_0: rows_for<GGML_TYPE_Q8_0>(wb, w_row_bytes, packed, k, first, last, xb, n, y, y_stride); break;
        default: break;
    }
#else
    (void) w, (void) w_row_bytes, (void) type, (void) packed, (void) k, (void) first, (void) last, (void) xq, (void) n,
        (void) y, (void) y_stride;
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
    // Rows in shares of whole 16-row groups (the packed layout's; a row's sum is the same in any tile:
    // shares only balance the work).
    const int64_t groups = (w->ne[1] + k_amx_rows - 1) / k_amx_rows;
    const int64_t first = std::min(w->ne[1], groups * ith / nth * k_amx_rows);
    const int64_t last = std::min(w->ne[1], groups * (ith + 1) / nth * k_amx_rows);
    dm_qmatmul_rows(w->data, w->nb[1], w->type, dm_qmatmul_is_packed(w), w->ne[0], first, last, xq, x->ne[1],
                    static_cast<float *>(dst->data), dst->nb[1] / static_cast<int64_t>(sizeof(float)));
}
