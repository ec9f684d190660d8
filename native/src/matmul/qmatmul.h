// The CPU mat-mul of weights in q4_0, q4_1 or q8_0 blocks with f32 activations, for passes of any
// number of tokens.
//
// ggml's own kernel (in the portable wheel: AVX2, one weight row by one column at a time) unpacks
// every weight block again for each column of a pass, so on two cores an 8-token pass costs about
// 4.5 single-token ones. Here the activations are quantised once per pass to 8-bit blocks of 32
// (an op of its own, shared by every projection of the same input), and each weight block is
// unpacked once for a tile of columns and dotted with VNNI (AVX-512) or AVX2 integer products.
// Every output (row, column) is summed by one thread in one order whatever the number of columns
// or threads, so a token gets the same bits alone, in a prompt or in a batch.
//
// The arithmetic is ggml's: a block's activations x are quantised as q = round(x / d) with
// d = max|x| / 127 (ties to even), its integer products are exact, and each block adds
// d_w d_x Σ q_w q_x (q4_0: q_w - 8; q4_1: + m_w d_x Σ q_x) to the row's f32 sum.
#pragma once

#include <ggml.h>

#include <cstddef>
#include <cstdint>

// The kernel this process runs: "amx-int8" (with AVX-512 VNNI for weights it does not pack),
// "avx512-vnni", "avx2", or nullptr (none: ggml's mul_mat serves). DELTAMEM_NO_AMX=1 keeps to
// AVX-512 VNNI, DELTAMEM_NO_AVX512=1 to AVX2; DELTAMEM_NO_AVX2=1 or DELTAMEM_NO_QMATMUL=1 to ggml's.
const char * dm_qmatmul_kernel();

// Weights of this type go through the kernel (when their rows are whole blocks and in host memory).
bool dm_qmatmul_takes_type(ggml_type type);

// Whether the kernel computes W x: W [k, rows] of a type it takes, contiguous in host memory, k a
// multiple of 32; x [k, n] f32 with contiguous columns.
bool dm_qmatmul_serves(const ggml_tensor * w, const ggml_tensor * x);

// Bytes of one column of k values quantised for the kernel (k a multiple of 32).
size_t dm_qact_bytes(int64_t k);

// Quantises n columns of k values, x_col_bytes apart from x, into out (dm_qact_bytes(k) bytes each).
void dm_qact_quantize(const float * x, size_t x_col_bytes, int64_t k, int64_t n, void * out);

// With AMX (Intel's tile unit) the kernel reads weights in a layout of its own, written once when the
// model loads: whether it packs weights of this type and shape (rows a multiple of 16, an even number
// of blocks a row; other shapes take the VNNI kernel as they are), and the packing, from the GGUF
// layout (rows × k values of `type`) into out, which takes the same number of bytes.
bool dm_qmatmul_packs(ggml_type type, int64_t k, int64_t rows);
void dm_qmatmul_pack(const void * w, ggml_type type, int64_t k, int64_t rows, void * out);
// A packed weight tensor is marked (its `extra`): only this kernel can read it.
void dm_qmatmul_mark_packed(ggml_tensor * w);
bool dm_qmatmul_is_packed(const ggml_tensor * w);

// y[c * y_stride + r] = W row r · column c, for rows [first, last) of W (rows w_row_bytes apart, of
// k values of `type`; packed: dm_qmatmul_pack's layout, first and last multiples of 16) and the n
// quantised columns xq (dm_qact_bytes(k) apart).
void dm_qmatmul_rows(const void * w, size_t w_row_bytes, ggml_type type, bool packed, int64_t k, int64_t first,
                     int64_t last, const void * xq, int64_t n, float * y, int64_t y_stride);

// Graph ops (ggml_custom_4d, no userdata).
// dst [dm_qact_bytes(k), n] i8: the columns of src[0], x [k, n] f32, quantised.
void dm_qact_op_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);
// dst [rows, n] f32 = W x: src[0] W [k, rows], src[1] the quantised x (dm_qact_op_cpu's dst), or x
// itself (f32 [k, n]), which each thread then quantises for itself (few columns).
void dm_qmatmul_op_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);
