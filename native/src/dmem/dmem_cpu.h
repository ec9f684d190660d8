// CPU kernels of δ-mem's fused graph ops. dmem_graph builds the nodes; its portable formulation
// (plain ggml ops, for other backends) computes the same thing.
#pragma once

#include "dmem/adapter.h"

#include <ggml.h>

#include <atomic>
#include <cstdint>
#include <vector>

// Userdata of the memory ops of one graph (they run one after another, never concurrently). The
// op's threads never all meet inside it: each projects its share of x; thread 0 waits for the
// projections and scans while the others go on to the rows of the corrected projection (W x in
// chunks from a shared counter), and a row's correction waits only for the scan's reads.
struct dm_memory_op {
    struct alignas(64) per_thread {
        std::vector<char>    x_dot;    // x converted to the vec_dot type of the op's own projection
        std::vector<int32_t> pending;  // row chunks this thread computed before the reads were ready
    };

    const dm_dmem_config *  cfg = nullptr;
    std::vector<float>      scratch;   // the terms of a mean write (thread 0 only)
    std::vector<per_thread> threads;   // one per possible thread: each touches its own only
    alignas(64) std::atomic<int32_t> arrived{0};      // threads done with the call's first phase
    alignas(64) std::atomic<int32_t> next_chunk{0};
    alignas(64) std::atomic<int32_t> finished{0};     // threads done with the current call
    alignas(64) std::atomic<bool>    reads_ready{false};

    explicit dm_memory_op(const dm_dmem_config & c);
};

// The memory of one layer in one op. Sources:
//   [0] the projections [3D + G (+ G), n] (q, k, v, β and λ logits), or x [n_embd, n] with [4]
//   [1] the gate biases [G (+ G)]    [2] the state [r, r, H], updated in place
//   [3] the plan [n + 1] i32 (dm_dmem_builder::set_inputs)
//   [4] w_in [n_embd, 3D + G (+ G)]: the op projects x itself (few tokens), or null
//   [5] y [rows, n] and [6] W_Δᵀ [rows, D]: a correction y + W_Δ o done in the same op (few
//       tokens), or null
//   [7] W [n_embd, rows] and [8] its bias [rows] or null, in place of [5]: y = W x (+ bias) is
//       computed by the op itself (few tokens, W in a layout ggml's vec_dot reads)
// dst, one dimension: the reads o transposed [n, D], then y + W_Δ o [rows, n] when [5] or [7] is
// set, then room for the projections [3D + G (+ G), n] when [4] is set, then for the tokens' scan
// terms [n][5 D]: dm_memory_op_size floats in all.
void dm_memory_op_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);
int64_t dm_memory_op_size(int64_t n_tokens, int64_t D, int64_t rows, int64_t projection_rows);

// Userdata of a batched pass's scan op on one layer: its sequences' states.
struct dm_scan_batch_op {
    const dm_dmem_config *          cfg = nullptr;
    std::vector<ggml_tensor *>      states;    // per sequence [r, r, H], updated in place
    std::vector<std::vector<float>> scratch;   // per thread: the terms of a mean write
    alignas(64) std::atomic<int32_t> arrived{0};    // threads done with the tokens' terms
    alignas(64) std::atomic<int32_t> next_seq{0};   // sequences handed out
    alignas(64) std::atomic<int32_t> finished{0};

    explicit dm_scan_batch_op(const dm_dmem_config & c);
};

// The memory scans of every sequence of a batched pass on one layer, in one op: the threads
// compute the tokens' terms together, then take the sequences' recurrences one each. Sources:
//   [0] the batch's projections [3D + G (+ G), T] (gate biases not added)   [1] the gate biases
//   [2] the sequences' plans one after another, n_tokens + 1 each (dm_dmem_plan::codes)
//   [3] [2, n_seqs] i32: each sequence's n_tokens (and n_past, unused)
// dst, one dimension: the reads [T, D] (o transposed, as the corrections take them), then room for
// the tokens' terms: dm_scan_batch_size floats.
void dm_scan_batch_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);
int64_t dm_scan_batch_size(int64_t n_tokens, int64_t D);

// dst [rows, m] = y + W_Δ o (+ residual), from the sources y [rows, m], W_Δᵀ [rows, D], the reads
// [n, D] of which y has the last m tokens, and the residual [rows, m] or null. dst may be y itself.
void dm_correct_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);
