// A δ-mem adapter: configuration and weights (docs/adapter-format.md), validated against a model.
#pragma once

#include "device/device_weights.h"
#include "model/weights_file.h"

#include <ggml-backend.h>
#include <ggml.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct dm_model;
struct dm_placement;

enum class dm_update_mode { standard, lambda_outside, no_lambda };
enum class dm_write_granularity { token, message_mean, sentence_mean };

struct dm_dmem_config {
    int32_t rank = 8;             // r
    int32_t n_heads = 1;          // H, state heads
    int32_t gate_width = 8;       // D (rankwise gates) or H (one gate per head)
    dm_update_mode       update_mode = dm_update_mode::standard;
    dm_write_granularity granularity = dm_write_granularity::token;
    bool    couple_lambda = true;
    bool    normalize_qk = true;
    float   qk_norm_eps = 1e-6f;
    bool    delta_o_rmsnorm = false;
    float   delta_o_rmsnorm_eps = 1e-6f;

    int32_t width() const { return rank * n_heads; }   // D
    bool uses_lambda_weights() const { return !couple_lambda && update_mode != dm_update_mode::no_lambda; }
};

// The packed weights of one layer in one precision (dm_dmem_layer), laid out for speed.
struct dm_dmem_packed {
    // mq, mk, mv, beta_w (and lambda_w) stacked, so one mat-mul projects everything the scan needs:
    // rows [0, D) q, [D, 2D) k, [2D, 3D) v, then G β logits, then G λ logits when uncoupled.
    ggml_tensor * w_in = nullptr;     // [n_embd, 3D + G (+ G)]

    // The W_Δ matrices transposed to [out, D]: a correction is then an outer-product sum over
    // the D = r·H memory dimensions with long rows, instead of out × n_tokens dot products of length D.
    ggml_tensor * dq_t = nullptr;
    ggml_tensor * dk_t = nullptr;
    ggml_tensor * dv_t = nullptr;
    ggml_tensor * do_t = nullptr;
};

// Weights of one targeted layer; the W_Δ matrices already carry every constant scale.
struct dm_dmem_layer {
    int32_t       il = -1;            // backbone layer index
    bool          on_cpu = true;      // false: the layer's f32 packed weights and b_in live on its device
    ggml_tensor * mq = nullptr;       // [n_embd, D]
    ggml_tensor * mk = nullptr;       // [n_embd, D]
    ggml_tensor * mv = nullptr;       // [n_embd, D]
    ggml_tensor * beta_w = nullptr;   // [n_embd, G]
    ggml_tensor * beta_b = nullptr;   // [G]
    ggml_tensor * lambda_w = nullptr; // [n_embd, G] (uncoupled λ only)
    ggml_tensor * lambda_b = nullptr; // [G]
    ggml_tensor * dq = nullptr;       // [D, n_embd_q]     (absent when q is not a delta head)
    ggml_tensor * dk = nullptr;       // [D, n_embd_kv]
    ggml_tensor * dv = nullptr;       // [D, n_embd_v_gqa]
    ggml_tensor * d_o = nullptr;      // [D, n_embd]
    ggml_tensor * do_norm = nullptr;  // [n_embd] (delta_o_rmsnorm only)

    ggml_tensor *  b_in = nullptr;    // [G (+ G)] f32, the gate biases, in w_in's row order
    dm_dmem_packed f32;               // for mat-muls over many tokens and the portable ops
    // The same in f16, only when every matrix of the file is f16 (so it holds the same values):
    // a single-token pass reads each δ-mem weight once, and half the bytes is what it costs.
    dm_dmem_packed f16;
};

struct dm_adapter {
    dm_dmem_config             cfg;
    std::string                fingerprint;
    std::string                source;        // the adapter file, or the model file when packed
    std::vector<dm_dmem_layer> layers;        // one per targeted layer, in layer order
    std::vector<int32_t>       slot_of_layer; // [n_layer] index into layers, or -1
    std::vector<std::string>   delta_heads;
    std::unique_ptr<dm_weights_file> file;    // own storage when loaded from a separate file

    ggml_context *        packed_ctx = nullptr;   // the packed weights of every layer
    ggml_backend_buffer_t packed_buf = nullptr;
    std::vector<std::unique_ptr<dm_device_weights>> device_weights;   // copies for offloaded layers, per device

    dm_adapter() = default;
    dm_adapter(const dm_adapter &) = delete;
    dm_adapter & operator=(const dm_adapter &) = delete;
    ~dm_adapter();

    const dm_dmem_layer * for_layer(int32_t il) const {
        const int32_t s = slot_of_layer[il];
        return s < 0 ? nullptr : &layers[s];
    }
};

// True when the model file carries an adapter's keys (a packed model).
bool dm_has_packed_adapter(const gguf_context * gguf);

// Reads and validates an adapter against the model: from its own file (path), or packed in the
// model's file (path empty). Throws dm::Error naming the key or tensor at fault.
std::unique_ptr<dm_adapter> dm_adapter_load(const dm_model & model, const std::string & path, bool use_mmap);
// Copies what the device formulation of each offloaded layer reads (b_in, the f32 packed weights,
// the Δo norm) to that layer's device.
void dm_adapter_offload(dm_adapter & adapter, const dm_placement & placement);
