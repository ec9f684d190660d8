// δ-mem in the forward graph: memory projections, the read-before-write scan, corrections.
#pragma once

#include "dmem/adapter.h"
#include "dmem/memory.h"
#include "matmul/matmul_graph.h"

#include <ggml.h>

#include <cstdint>
#include <memory>
#include <vector>

struct dm_memory_op;
struct dm_scan_batch_op;

// What the memory does during one pass, decided per call on the host.
struct dm_dmem_plan {
    // true: token writes, each token reads the state and then writes (in token order).
    // false: every token reads the state as it was at the start of the pass, then `items` write.
    bool interleaved = true;
    bool write = true;                             // interleaved only: false = read without writing
    std::vector<std::vector<int32_t>> items;       // read-then-write: token indices averaged into each write

    // One write per segment id >= 0 (in increasing id order) for a mean granularity given ids with
    // some id >= 0; token writes otherwise (no ids, or all -1), as the official runtime does.
    static dm_dmem_plan make(const dm_dmem_config & cfg, const int32_t * ids, int32_t n_tokens, bool write);

    // The plan as the ops read it: [n_tokens + 1], the write item of each token (-1: none), then
    // the mode (0: token writes, 1: read, then the items write).
    std::vector<int32_t> codes(int32_t n_tokens) const;

    // Plans with the same shape build the same graph (only the plan inputs differ).
    bool same_shape(const dm_dmem_plan & o) const { return interleaved == o.interleaved && items.size() == o.items.size(); }
};

// A projection W x (+ bias) whose output gets a δ-mem correction. plain: W's rows are stored as
// ggml's vec_dot reads them (not interleaved by the repack buffer), so the memory op may compute it.
struct dm_linear {
    ggml_tensor * w    = nullptr;
    ggml_tensor * bias = nullptr;
    bool          plain = false;

    ggml_tensor * apply(dm_matmuls & mm, ggml_tensor * x) const {   // as graph nodes
        ggml_tensor * y = mm.mul(w, x);
        return bias ? ggml_add(mm.ctx, y, bias) : y;
    }
};

// Graph inputs the δ-mem ops need, shared by every layer of a pass.
struct dm_dmem_inputs {
    ggml_tensor * plan = nullptr;   // [n_tokens + 1] i32: write item per token (-1: none), then the mode
    ggml_tensor * avg  = nullptr;   // [n_tokens, n_items] f32: averaging weights of each write item
};

struct dm_dmem_builder {
    ggml_context *       ctx;
    ggml_cgraph *        gf;
    const dm_adapter &   adapter;
    const dm_memory &    memory;
    const dm_dmem_plan & plan;
    int32_t              n_tokens;
    bool                 fused_ops;   // CPU layers' memory as CPU custom ops (dmem_cpu); device ops otherwise
    dm_dmem_inputs       in;
    std::shared_ptr<dm_memory_op> op; // userdata of the fused memory ops (shared: an incomplete type here)
    std::vector<std::shared_ptr<dm_scan_batch_op>> scan_ops;   // userdata of scan_batch's ops

    void make_inputs();

    struct layer_pass {
        ggml_tensor * reads;       // the reads o transposed, [n_tokens, D]: the corrections' layout
        ggml_tensor * corrected;   // W x (+ bias) + W_Δ o, when a target was given
    };
    // Runs the memory of one targeted layer on x ([n_embd, n_tokens], the attention input after
    // its RMSNorm) and updates its state. The target projection (w null: none) with its W_Δᵀ is
    // computed and corrected in the same op where the fused ops allow.
    layer_pass read_and_write(const dm_dmem_layer & layer, ggml_tensor * state, ggml_tensor * x,
                              const dm_linear & target, ggml_tensor * w_delta_t, dm_matmuls & mm);
    // The same for one sequence of a batched pass, from its columns packed [3D + G (+ G), n_tokens]
    // of the batch's projections (w_in x over every token, gate biases not added): its reads
    // [n_tokens, D]. The corrections of the batch then take every sequence's reads at once.
    ggml_tensor * scan_projected(const dm_dmem_layer & l, ggml_tensor * state, ggml_tensor * packed);
    // Every sequence's scan of a batched pass in one CPU op, when layer l runs fused ops (else
    // null: scan_projected per sequence): from the batch's packed projections [3D + G (+ G), T], the
    // sequences' states, their plans one after another (dm_dmem_plan::codes) and the [2, n_seqs]
    // table of their token counts; the reads [T, D].
    ggml_tensor * scan_batch(const dm_dmem_layer & l, const std::vector<ggml_tensor *> & states, ggml_tensor * packed,
                             ggml_tensor * plans, ggml_tensor * seqs);
    // The layer's packed weights this pass uses: f16 ones (when the adapter has them) for the
    // few-token passes of the fused ops, f32 otherwise.
    const dm_dmem_packed & weights(const dm_dmem_layer & l) const;
    // y + W_Δ o (+ residual) for layer l's y [out, m], w_delta_t = W_Δᵀ [out, D] and the reads
    // [n_tokens, D] of which y holds the last m tokens (m < n_tokens when only the last tokens go
    // on). y must be read by nothing else: the fused CPU op writes the sum into it.
    ggml_tensor * correct(const dm_dmem_layer & l, ggml_tensor * y, ggml_tensor * w_delta_t, ggml_tensor * reads_t,
                          ggml_tensor * residual = nullptr) const;
    // W_Δ o alone for the last m tokens: [out, m] (device ops).
    ggml_tensor * correction(ggml_tensor * w_delta_t, ggml_tensor * reads_t, int64_t m) const;
    // Host data of the inputs (once allocated) for a plan of the same shape as the built one.
    void set_inputs(const dm_dmem_plan & call_plan) const;

private:
    struct projections {
        ggml_tensor * packed;                          // [3D + G (+ G), n], gate biases not yet added
        ggml_tensor * q, * k, * v, * beta, * lambda;   // raw (before nonlinearities): [D or G, n]
    };
    // ggml_gated_delta_net's per-head coefficients for δ-mem's gates, each [G, n] (v_scale null: 1).
    struct gdn_coefficients {
        ggml_tensor * g, * beta, * v_scale;
    };
    struct gdn_pass {
        ggml_tensor * reads;   // [D, n]: S_t q_t' after step t's write, or null without q
        ggml_tensor * state;   // [r, r, H]: the state after every step
    };
    bool          fused(const dm_dmem_layer & l) const { return fused_ops && l.on_cpu; }
    projections   project(const dm_dmem_layer & l, ggml_tensor * x) const;
    projections   slices(const dm_dmem_layer & l, ggml_tensor * packed) const;
    ggml_tensor * memory_op(ggml_tensor ** args, int64_t size);         // the fused CPU op, in the graph
    ggml_tensor * normalize(ggml_tensor * m) const;                     // [D, n] -> [r, H, n]
    ggml_tensor * column(ggml_tensor * m, int64_t i) const;             // [rows, n] -> [rows, 1]
    ggml_tensor * heads(ggml_tensor * col) const;                       // [D, 1] -> [r, 1, H]
    ggml_tensor * read(ggml_tensor * S, ggml_tensor * q_col) const;     // -> [D, 1]
    int64_t       gdn_width() const;
    gdn_coefficients coefficients(ggml_tensor * beta_logit, ggml_tensor * lambda_logit) const;
    ggml_tensor * rows_as_heads(ggml_tensor * m) const;                 // [D, n] -> [1, r·H, n]
    ggml_tensor * gates_as_heads(ggml_tensor * m) const;                // [G, n] -> [1, r·H, n]
    ggml_tensor * heads_as_rows(ggml_tensor * m) const;                 // [1, r·H, n] -> [D, n]
    gdn_pass      gdn_writes(ggml_tensor * state, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                             ggml_tensor * beta_logit, ggml_tensor * lambda_logit) const;
    ggml_tensor * device_scan(const projections & p, ggml_tensor * state);
    bool          op_computes(const dm_linear & target, ggml_tensor * x) const;
    layer_pass    fused_pass(const dm_dmem_layer & l, ggml_tensor * state, ggml_tensor * x, const dm_linear & target,
                             ggml_tensor * w_delta_t, dm_matmuls & mm);
};

