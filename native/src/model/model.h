// The model: hyper-parameters and weights read from a GGUF file, shared by every context.
#pragma once

#include "device/device_weights.h"
#include "device/devices.h"
#include "dmem/adapter.h"
#include "model/repack.h"
#include "model/weights_file.h"
#include "vocab/vocab.h"

#include <ggml-backend.h>
#include <ggml.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct gguf_context;

enum class dm_arch { llama, qwen2, qwen3, smollm3 };

struct dm_hparams {
    int32_t n_vocab     = 0;
    int32_t n_ctx_train = 0;
    int32_t n_embd      = 0;
    int32_t n_layer     = 0;
    int32_t n_head      = 0;
    int32_t n_head_kv   = 0;
    int32_t n_ff        = 0;
    int32_t head_dim_k  = 0;   // per-head width of q and k
    int32_t head_dim_v  = 0;   // per-head width of v
    int32_t n_rot       = 0;   // rotated dimensions per head
    float   rms_eps     = 1e-6f;
    float   rope_freq_base = 10000.0f;
    int     rope_mode   = GGML_ROPE_TYPE_NORMAL;
    std::vector<bool> rope_layer;   // [n_layer] false on NoPE layers (SmolLM3)

    int32_t n_embd_q()  const { return n_head * head_dim_k; }
    int32_t n_embd_kv() const { return n_head_kv * head_dim_k; }
    int32_t n_embd_v_gqa() const { return n_head_kv * head_dim_v; }
    int32_t n_embd_o()  const { return n_head * head_dim_v; }
};

struct dm_layer {
    ggml_tensor * attn_norm = nullptr;   // [n_embd]
    ggml_tensor * wq = nullptr;          // [n_embd, n_embd_q]
    ggml_tensor * wk = nullptr;          // [n_embd, n_embd_kv]
    ggml_tensor * wv = nullptr;          // [n_embd, n_embd_v_gqa]
    ggml_tensor * wo = nullptr;          // [n_embd_o, n_embd]
    ggml_tensor * bq = nullptr;          // biases: required for Qwen2's q/k/v, optional elsewhere
    ggml_tensor * bk = nullptr;
    ggml_tensor * bv = nullptr;
    ggml_tensor * bo = nullptr;
    ggml_tensor * q_norm = nullptr;      // [head_dim_k] (Qwen3)
    ggml_tensor * k_norm = nullptr;      // [head_dim_k] (Qwen3)
    ggml_tensor * ffn_norm = nullptr;    // [n_embd]
    ggml_tensor * ffn_gate = nullptr;    // [n_embd, n_ff]
    ggml_tensor * ffn_up = nullptr;      // [n_embd, n_ff]
    ggml_tensor * ffn_down = nullptr;    // [n_ff, n_embd]
    ggml_tensor * rope_freqs = nullptr;  // [n_rot/2] the model's optional frequency factors, on this layer's device
};

struct dm_model {
    std::string path;
    std::string arch_name;
    dm_arch     arch = dm_arch::llama;
    dm_hparams  hp;

    dm_weights_file file;                // the GGUF: metadata and weight storage
    dm_repacked_weights repacked;        // mat-mul weights moved to the repack buffer (after file: freed first)
    dm_placement    placement;           // the device of each layer and of the output
    std::vector<std::unique_ptr<dm_device_weights>> device_weights;   // the offloaded layers' weights, per device
    gguf_context *  gguf = nullptr;      // = file.gguf
    ggml_context *  ctx_w = nullptr;     // = file.ctx, tensor descriptors of the weights

    ggml_tensor * tok_embd = nullptr;      // [n_embd, n_vocab]
    ggml_tensor * output_norm = nullptr;   // [n_embd]
    ggml_tensor * output = nullptr;        // [n_embd, n_vocab] (tok_embd when tied)
    ggml_tensor * rope_freqs = nullptr;    // [n_rot/2] optional frequency factors
    std::vector<dm_layer> layers;

    dm_vocab vocab;
    std::unique_ptr<dm_adapter> adapter;   // δ-mem, when loaded (or packed in the model file)

    // Rendered metadata for the C API, built once at load.
    std::vector<std::string> meta_keys, meta_types, meta_values;

    dm_model() = default;
    dm_model(const dm_model &) = delete;
    dm_model & operator=(const dm_model &) = delete;
};

// Loads and validates everything before any compute, and puts the layers on their devices; throws
// dm::Error naming the key or tensor at fault.
void dm_model_load_file(dm_model & model, const std::string & path, bool use_mmap, bool use_repack,
                        const dm_placement_params & placement);
// Attaches a δ-mem adapter from its own file, or the one packed in the model file (empty path); its
// weights go where their layers are.
void dm_model_attach_adapter(dm_model & model, const std::string & adapter_path, bool use_mmap);
