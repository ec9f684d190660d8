#include "model/model.h"

#include "common/error.h"
#include "common/gguf_util.h"
#include "common/tensor_check.h"

#include <ggml-cpu.h>
#include <gguf.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>

using dm::fail;
using dm::format;

namespace {

// What the loader and the graph must know of each architecture, as llama.cpp reads its GGUF.
struct arch_traits {
    const char * name;
    dm_arch      arch;
    int          rope_mode;   // NORMAL rotates adjacent pairs (the converter permuted q/k rows), NEOX the two halves
    bool         qk_norm;     // per-head RMSNorm of q and k before RoPE (required tensors)
    bool         qkv_bias;    // q, k and v projections carry biases (required tensors)
};

constexpr arch_traits k_archs[] = {
    {"llama",   dm_arch::llama,   GGML_ROPE_TYPE_NORMAL, false, false},
    {"qwen2",   dm_arch::qwen2,   GGML_ROPE_TYPE_NEOX,   false, true},
    {"qwen3",   dm_arch::qwen3,   GGML_ROPE_TYPE_NEOX,   true,  false},
    {"smollm3", dm_arch::smollm3, GGML_ROPE_TYPE_NORMAL, false, false},
};

const arch_traits & find_arch(const std::string & name) {
    std::string supported;
    for (const arch_traits & t : k_archs) {
        if (name == t.name) return t;
        supported += supported.empty() ? t.name : std::string(", ") + t.name;
    }
    fail("unsupported model architecture '%s' (supported: %s)", name.c_str(), supported.c_str());
}

int32_t positive_int(const gguf_context * g, const std::string & key, std::optional<int64_t> fallback = std::nullopt) {
    std::optional<int64_t> v = dm::gguf_int(g, key);
    if (!v) v = fallback;
    if (!v) fail("GGUF is missing required key '%s'", key.c_str());
    if (*v <= 0 || *v > (1 << 30)) fail("GGUF key '%s' has invalid value %lld", key.c_str(), static_cast<long long>(*v));
    return static_cast<int32_t>(*v);
}

// A real-valued hyper-parameter, finite and within [lo, hi].
float bounded_float(const gguf_context * g, const std::string & key, std::optional<double> fallback, double lo, double hi) {
    std::optional<double> v = dm::gguf_float(g, key);
    if (!v) v = fallback;
    if (!v) fail("GGUF is missing required key '%s'", key.c_str());
    if (!std::isfinite(*v) || *v < lo || *v > hi) {
        fail("GGUF key '%s' has invalid value %g (expected a finite number in [%g, %g])", key.c_str(), *v, lo, hi);
    }
    return static_cast<float>(*v);
}

void read_rope_layers(const gguf_context * g, const std::string & arch, dm_hparams & hp, dm_arch a) {
    hp.rope_layer.assign(hp.n_layer, true);
    if (a != dm_arch::smollm3) return;
    // HF semantics: 1 = the layer applies RoPE. llama.cpp's own files lack the key and use every 4th layer.
    if (auto list = dm::gguf_int_array(g, arch + ".no_rope_layers")) {
        if (static_cast<int32_t>(list->size()) != hp.n_layer) {
            fail("GGUF key '%s.no_rope_layers' has %zu entries, expected %d (one per layer)", arch.c_str(), list->size(), hp.n_layer);
        }
        for (int32_t il = 0; il < hp.n_layer; ++il) hp.rope_layer[il] = (*list)[il] != 0;
    } else {
        for (int32_t il = 0; il < hp.n_layer; ++il) hp.rope_layer[il] = (il + 1) % 4 != 0;
    }
}

void read_hparams(dm_model & model, const arch_traits & traits) {
    const gguf_context * g = model.gguf;
    const std::string & a = model.arch_name;
    dm_hparams & hp = model.hp;

    hp.n_embd      = positive_int(g, a + ".embedding_length");
    hp.n_layer     = positive_int(g, a + ".block_count");
    hp.n_ff        = positive_int(g, a + ".feed_forward_length");
    hp.n_head      = positive_int(g, a + ".attention.head_count");
    hp.n_head_kv   = positive_int(g, a + ".attention.head_count_kv", hp.n_head);
    hp.n_ctx_train = positive_int(g, a + ".context_length");
    if (hp.n_embd % hp.n_head != 0 && !dm::gguf_int(g, a + ".attention.key_length")) {
        fail("embedding_length %d is not divisible by head_count %d and no attention.key_length is given", hp.n_embd, hp.n_head);
    }
    hp.head_dim_k = positive_int(g, a + ".attention.key_length", hp.n_embd / hp.n_head);
    hp.head_dim_v = positive_int(g, a + ".attention.value_length", hp.head_dim_k);
    hp.n_rot      = positive_int(g, a + ".rope.dimension_count", hp.head_dim_k);
    if (hp.n_head % hp.n_head_kv != 0) {
        fail("attention.head_count %d is not a multiple of attention.head_count_kv %d", hp.n_head, hp.n_head_kv);
    }
    if (hp.n_rot > hp.head_dim_k || hp.n_rot % 2 != 0) {
        fail("rope.dimension_count %d must be even and at most the head width %d", hp.n_rot, hp.head_dim_k);
    }
    // Bounds wide enough for every released model (ε 1e-5..1e-6, base 1e4..1e7), narrow enough to catch a
    // NaN, inf, sign or exponent slip that would otherwise load and only show as garbage logits.
    // ε in [1e-12, 0.1]: a larger ε flattens the norm, a smaller one no longer guards the division.
    // base in [2, 1e10]: below 2 the frequencies hardly decay (1: not at all), above 1e10 all but the
    // first few pairs stop rotating.
    hp.rms_eps = bounded_float(g, a + ".attention.layer_norm_rms_epsilon", std::nullopt, 1e-12, 0.1);
    hp.rope_freq_base = bounded_float(g, a + ".rope.freq_base", 10000.0, 2.0, 1e10);

    const std::string scaling = dm::gguf_string(g, a + ".rope.scaling.type").value_or("none");
    if (scaling != "none") {
        fail("RoPE scaling '%s' (key %s.rope.scaling.type) is not supported yet", scaling.c_str(), a.c_str());
    }
    hp.rope_mode = traits.rope_mode;
    read_rope_layers(g, a, hp, model.arch);
}

// Finds tensors by name and checks their shape and type; records every name it was asked for.
struct tensor_checker {
    ggml_context * ctx;
    std::set<std::string> claimed;

    ggml_tensor * get(const std::string & name, std::initializer_list<int64_t> shape, bool required, bool matrix) {
        claimed.insert(name);
        ggml_tensor * t = ggml_get_tensor(ctx, name.c_str());
        if (!t) {
            if (required) fail("model file is missing tensor '%s'", name.c_str());
            return nullptr;
        }
        dm::check_shape(t, name, shape, "tensor");
        check_type(t, name, matrix);
        return t;
    }

    static void check_type(const ggml_tensor * t, const std::string & name, bool matrix) {
        if (!matrix) {
            if (t->type != GGML_TYPE_F32) {
                fail("tensor '%s' has type %s, expected f32 (norms and biases stay f32)", name.c_str(), ggml_type_name(t->type));
            }
            return;
        }
        const ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(t->type);
        if (!traits || !traits->vec_dot) {
            fail("tensor '%s' has type %s, which the CPU backend cannot multiply", name.c_str(), ggml_type_name(t->type));
        }
    }
};

std::string blk(int il, const char * name) { return format("blk.%d.%s", il, name); }

void bind_tensors(dm_model & model, const arch_traits & traits) {
    const dm_hparams & hp = model.hp;
    tensor_checker tc{model.ctx_w, {}};

    ggml_tensor * embd = ggml_get_tensor(model.ctx_w, "token_embd.weight");
    if (!embd) fail("model file is missing tensor 'token_embd.weight'");
    model.hp.n_vocab = static_cast<int32_t>(embd->ne[1]);
    const int64_t n_vocab = model.hp.n_vocab;
    const int64_t n_embd = hp.n_embd;

    model.tok_embd    = tc.get("token_embd.weight", {n_embd, n_vocab}, true, true);
    model.output_norm = tc.get("output_norm.weight", {n_embd}, true, false);
    model.output      = tc.get("output.weight", {n_embd, n_vocab}, false, true);
    if (!model.output) model.output = model.tok_embd;   // tied embeddings
    model.rope_freqs  = tc.get("rope_freqs.weight", {hp.n_rot / 2}, false, false);

    model.layers.resize(hp.n_layer);
    for (int il = 0; il < hp.n_layer; ++il) {
        dm_layer & l = model.layers[il];
        l.attn_norm = tc.get(blk(il, "attn_norm.weight"), {n_embd}, true, false);
        l.wq = tc.get(blk(il, "attn_q.weight"), {n_embd, hp.n_embd_q()}, true, true);
        l.wk = tc.get(blk(il, "attn_k.weight"), {n_embd, hp.n_embd_kv()}, true, true);
        l.wv = tc.get(blk(il, "attn_v.weight"), {n_embd, hp.n_embd_v_gqa()}, true, true);
        l.wo = tc.get(blk(il, "attn_output.weight"), {hp.n_embd_o(), n_embd}, true, true);
        l.bq = tc.get(blk(il, "attn_q.bias"), {hp.n_embd_q()}, traits.qkv_bias, false);
        l.bk = tc.get(blk(il, "attn_k.bias"), {hp.n_embd_kv()}, traits.qkv_bias, false);
        l.bv = tc.get(blk(il, "attn_v.bias"), {hp.n_embd_v_gqa()}, traits.qkv_bias, false);
        l.bo = tc.get(blk(il, "attn_output.bias"), {n_embd}, false, false);
        l.q_norm = tc.get(blk(il, "attn_q_norm.weight"), {hp.head_dim_k}, traits.qk_norm, false);
        l.k_norm = tc.get(blk(il, "attn_k_norm.weight"), {hp.head_dim_k}, traits.qk_norm, false);
        l.ffn_norm = tc.get(blk(il, "ffn_norm.weight"), {n_embd}, true, false);
        l.ffn_gate = tc.get(blk(il, "ffn_gate.weight"), {n_embd, hp.n_ff}, true, true);
        l.ffn_up   = tc.get(blk(il, "ffn_up.weight"), {n_embd, hp.n_ff}, true, true);
        l.ffn_down = tc.get(blk(il, "ffn_down.weight"), {hp.n_ff, n_embd}, true, true);
        l.rope_freqs = model.rope_freqs;
    }

    // Every tensor must be one we know: a stray tensor means a file for another architecture.
    // δ-mem tensors (blk.N.dmem_*) belong to a packed adapter and are checked by the adapter loader.
    for (ggml_tensor * t = ggml_get_first_tensor(model.ctx_w); t; t = ggml_get_next_tensor(model.ctx_w, t)) {
        const std::string name = ggml_get_name(t);
        if (tc.claimed.count(name) || name.find(".dmem_") != std::string::npos) continue;
        fail("model file has unexpected tensor '%s' for architecture '%s'", name.c_str(), model.arch_name.c_str());
    }
}

void render_metadata(dm_model & model) {
    const int64_t n = gguf_get_n_kv(model.gguf);
    for (int64_t i = 0; i < n; ++i) {
        const gguf_type t = gguf_get_kv_type(model.gguf, i);
        model.meta_keys.emplace_back(gguf_get_key(model.gguf, i));
        model.meta_types.emplace_back(t == GGUF_TYPE_ARRAY ? "array" : gguf_type_name(t));
        model.meta_values.push_back(dm::gguf_value_text(model.gguf, i));
    }
}

// Every tensor a layer's graph reads.
std::vector<ggml_tensor **> layer_tensors(dm_layer & l) {
    return {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv, &l.bo, &l.q_norm, &l.k_norm,
            &l.ffn_norm, &l.ffn_gate, &l.ffn_up, &l.ffn_down, &l.rope_freqs};
}

// Copies the weights of the offloaded layers (and the output) to their devices, one buffer each.
// The token embedding stays on the host, where the input tokens are looked up.
void offload(dm_model & model) {
    const dm_placement & p = model.placement;
    for (ggml_backend_dev_t dev : p.devices) {
        std::vector<ggml_tensor **> tensors;
        for (int il = 0; il < model.hp.n_layer; ++il) {
            if (p.layer[il] != dev) continue;
            for (ggml_tensor ** t : layer_tensors(model.layers[il])) tensors.push_back(t);
        }
        if (p.output == dev) {
            tensors.push_back(&model.output_norm);
            tensors.push_back(&model.output);   // a tied output gets a copy of the embedding here
        }
        model.device_weights.push_back(std::make_unique<dm_device_weights>());
        dm_copy_to_device(*model.device_weights.back(), dev, tensors);
    }
}

} // namespace

void dm_model_load_file(dm_model & model, const std::string & path, bool use_mmap, bool use_repack,
                        const dm_placement_params & placement) {
    model.path = path;
    model.file.open(path);
    model.gguf = model.file.gguf;
    model.ctx_w = model.file.ctx;

    const std::string type = dm::gguf_string(model.gguf, "general.type").value_or("model");
    if (type == "adapter") fail("'%s' is an adapter, not a model: pass it as adapter=", path.c_str());
    model.arch_name = dm::gguf_require_string(model.gguf, "general.architecture");
    const arch_traits & traits = find_arch(model.arch_name);
    model.arch = traits.arch;
    read_hparams(model, traits);
    bind_tensors(model, traits);
    model.vocab.load(model.gguf);
    model.placement = dm_place_layers(model.hp.n_layer, placement);
    model.file.load_data(use_mmap);
    offload(model);
    if (use_repack) dm_repack_weights(model);   // what stayed on the CPU
    render_metadata(model);
}

void dm_model_attach_adapter(dm_model & model, const std::string & adapter_path, bool use_mmap) {
    if (adapter_path.empty() && !dm_has_packed_adapter(model.gguf)) return;
    model.adapter = dm_adapter_load(model, adapter_path, use_mmap);
    dm_adapter_offload(*model.adapter, model.placement);
}
