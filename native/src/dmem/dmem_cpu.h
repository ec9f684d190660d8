// CPU kernels of δ-mem's fused graph ops. dmem_graph builds the nodes; its portable formulation
// (plain ggml ops, for other backends) computes the same thing.
#pragma once

#include "dmem/adapter.h"

#include <ggml.h>

#include <atomic>
#include <cstdint>
#include <vector>

// Lets the threads of one custom op meet between its phases (projection, scan, correction), so
// that the phases need no graph nodes of their own: every node costs a barrier of ggml's as well.
class dm_spin_barrier {
public:
    void wait(int nth);

private:
    alignas(64) std::atomic<int>      arrived{0};
    alignas(64) std::atomic<uint32_t> generation{0};
};

// Userdata of the memory ops of one graph (they run one after another, never concurrently).
struct dm_memory_op {
    const dm_dmem_config * cfg = nullptr;
    dm_spin_barrier        barrier;
    std::vector<float>     scratch;   // the scan's work vectors (thread 0 only)

    explicit dm_memory_op(const dm_dmem_config & c);
};

// The memory of one layer in one op. Sources:
//   [0] the projections [3D + G (+ G), n] (q, k, v, β and λ logits), or x [n_embd, n] with [4]
//   [1] the gate biases [G (+ G)]    [2] the state [r, r, H], updated in place
//   [3] the plan [n + 1] i32 (dm_dmem_builder::set_inputs)
//   [4] w_in [n_embd, 3D + G (+ G)]: the op projects x itself (few tokens), or null
//   [5] y [rows, n] and [6] W_Δᵀ [rows, D]: a correction y + W_Δ o done in the same op, or null
// dst, one dimension: the reads o transposed [n, D], then y + W_Δ o [rows, n] when [5] is set,
// then room for the projections [3D + G (+ G), n] when [4] is set.
void dm_memory_op_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);

// dst [rows, m] = y + W_Δ o (+ residual), from the sources y [rows, m], W_Δᵀ [rows, D], the reads
// [n, D] of which y has the last m tokens, and the residual [rows, m] or null.
void dm_correct_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);
