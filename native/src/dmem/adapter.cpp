#include "dmem/adapter.h"

#include "common/error.h"
#include "common/gguf_util.h"
#include "common/tensor_check.h"
#include "model/model.h"

#include <ggml-alloc.h>
#include <ggml-cpu.h>
#include <gguf.h>

#include <algorithm>
#include <cmath>
#include <set>

using dm::fail;
using dm::format;

namespace {

int32_t require_positive(const gguf_context * g, const char * key) {
    const int64_t v = dm::gguf_require_int(g, key);
    if (v <= 0 || v > (1 << 20)) fail("adapter key '%s' has invalid value %lld", key, static_cast<long long>(v));
    return static_cast<int32_t>(v);
}

dm_update_mode parse_update_mode(const std::string & s) {
    if (s == "standard") return dm_update_mode::standard;
    if (s == "lambda_outside") return dm_update_mode::lambda_outside;
    if (s == "no_lambda") return dm_update_mode::no_lambda;
    fail("adapter key 'deltamem.update_mode' = '%s' is not supported (standard, lambda_outside, no_lambda)", s.c_str());
}

dm_write_granularity parse_granularity(const std::string & s) {
    if (s == "token") return dm_write_granularity::token;
    if (s == "message_mean") return dm_write_granularity::message_mean;
    if (s == "sentence_mean") return dm_write_granularity::sentence_mean;
    fail("adapter key 'deltamem.write_granularity' = '%s' is not supported (token, message_mean, sentence_mean)", s.c_str());
}

// An eps divides or bounds a norm: NaN, inf or a value <= 0 would silently poison every correction.
float require_eps(const gguf_context * g, const char * key) {
    const double v = dm::gguf_float(g, key).value_or(1e-6);
    if (!std::isfinite(v) || v <= 0.0 || v > 1.0) fail("adapter key '%s' = %g: expected a small positive number", key, v);
    return static_cast<float>(v);
}

dm_dmem_config read_config(const gguf_context * g) {
    dm_dmem_config c;
    c.rank = require_positive(g, "deltamem.rank");
    c.n_heads = require_positive(g, "deltamem.num_state_heads");
    c.update_mode = parse_update_mode(dm::gguf_string(g, "deltamem.update_mode").value_or("standard"));
    c.granularity = parse_granularity(dm::gguf_string(g, "deltamem.write_granularity").value_or("token"));
    c.couple_lambda = dm::gguf_bool(g, "deltamem.couple_lambda").value_or(true);
    c.normalize_qk = dm::gguf_bool(g, "deltamem.normalize_qk").value_or(true);
    c.qk_norm_eps = require_eps(g, "deltamem.qk_norm_eps");
    c.delta_o_rmsnorm = dm::gguf_bool(g, "deltamem.delta_o_rmsnorm").value_or(false);
    c.delta_o_rmsnorm_eps = require_eps(g, "deltamem.delta_o_rmsnorm_eps");
    const bool rankwise = dm::gguf_bool(g, "deltamem.rankwise_gates").value_or(true);
    c.gate_width = rankwise ? c.width() : c.n_heads;
    if (!dm::gguf_bool(g, "deltamem.scales_folded").value_or(false)) {
        fail("adapter key 'deltamem.scales_folded' must be true: convert the adapter with deltamem convert-adapter");
    }
    return c;
}

void check_backbone(const gguf_context * g, const dm_model & model) {
    const dm_hparams & hp = model.hp;
    const std::string arch = dm::gguf_require_string(g, "general.architecture");
    if (arch != model.arch_name) {
        fail("adapter is for architecture '%s' but the model is '%s'", arch.c_str(), model.arch_name.c_str());
    }
    const struct { const char * key; int32_t want; } dims[] = {
        {"deltamem.block_count", hp.n_layer},
        {"deltamem.embedding_length", hp.n_embd},
    };
    for (const auto & d : dims) {
        const int64_t v = dm::gguf_int(g, d.key).value_or(0);   // 0: converted without --base, unknown
        if (v != 0 && v != d.want) fail("adapter does not fit the model: %s = %lld, the model has %d", d.key, static_cast<long long>(v), d.want);
    }
}

// Looks up and checks adapter tensors of one layer.
struct layer_reader {
    ggml_context * ctx;
    int32_t il;
    std::set<std::string> & claimed;

    ggml_tensor * get(const char * suffix, std::initializer_list<int64_t> shape, bool required, bool matrix) {
        const std::string name = format("blk.%d.dmem_%s", il, suffix);
        ggml_tensor * t = ggml_get_tensor(ctx, name.c_str());
        if (!t) {
            if (required) fail("adapter is missing tensor '%s'", name.c_str());
            return nullptr;
        }
        claimed.insert(name);
        dm::check_shape(t, name, shape, "adapter tensor");
        if (!matrix && t->type != GGML_TYPE_F32) fail("adapter tensor '%s' must be f32", name.c_str());
        if (matrix && t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16) {
            fail("adapter tensor '%s' has type %s (f32 or f16 expected)", name.c_str(), ggml_type_name(t->type));
        }
        return t;
    }
};

dm_dmem_layer read_layer(ggml_context * ctx, int32_t il, const dm_model & model, const dm_dmem_config & c,
                         const std::vector<std::string> & heads, std::set<std::string> & claimed) {
    const dm_hparams & hp = model.hp;
    const int64_t E = hp.n_embd, D = c.width(), G = c.gate_width;
    auto has = [&](const char * h) { return std::find(heads.begin(), heads.end(), h) != heads.end(); };
    layer_reader r{ctx, il, claimed};
    dm_dmem_layer l;
    l.il = il;
    l.mq = r.get("mq.weight", {E, D}, true, true);
    l.mk = r.get("mk.weight", {E, D}, true, true);
    l.mv = r.get("mv.weight", {E, D}, true, true);
    l.beta_w = r.get("beta.weight", {E, G}, true, true);
    l.beta_b = r.get("beta.bias", {G}, true, false);
    if (c.uses_lambda_weights()) {
        l.lambda_w = r.get("lambda.weight", {E, G}, true, true);
        l.lambda_b = r.get("lambda.bias", {G}, true, false);
    }
    // Only the listed heads are read: a correction matrix of another head is left unclaimed (an error).
    if (has("q")) l.dq = r.get("dq.weight", {D, hp.n_embd_q()}, true, true);
    if (has("k")) l.dk = r.get("dk.weight", {D, hp.n_embd_kv()}, true, true);
    if (has("v")) l.dv = r.get("dv.weight", {D, hp.n_embd_v_gqa()}, true, true);
    if (has("o")) l.d_o = r.get("do.weight", {D, E}, true, true);
    if (c.delta_o_rmsnorm && l.d_o) l.do_norm = r.get("do_norm.weight", {E}, true, false);
    return l;
}

// The active corrections, in q, k, v, o order; ["none"]: none (a no-op adapter, memory still kept).
std::vector<std::string> read_delta_heads(const gguf_context * g) {
    const char * key = "deltamem.delta_heads";
    const auto listed = dm::gguf_string_array(g, key);
    if (!listed || listed->empty()) fail("adapter key '%s' is missing or empty (a no-op adapter lists \"none\")", key);
    if (*listed == std::vector<std::string>{"none"}) return {};
    std::vector<std::string> heads;
    for (const char * h : {"q", "k", "v", "o"}) {
        if (std::find(listed->begin(), listed->end(), h) != listed->end()) heads.emplace_back(h);
    }
    for (const std::string & h : *listed) {
        if (std::find(heads.begin(), heads.end(), h) == heads.end()) fail("adapter key '%s' has unknown head '%s'", key, h.c_str());
    }
    if (heads.size() != listed->size()) fail("adapter key '%s' lists a head twice", key);
    return heads;
}

std::vector<int32_t> target_layers(const gguf_context * g, int32_t n_layer) {
    std::vector<int32_t> out;
    if (auto list = dm::gguf_int_array(g, "deltamem.target_layers")) {
        for (int64_t il : *list) {
            if (il < 0 || il >= n_layer) fail("adapter targets layer %lld but the model has %d layers", static_cast<long long>(il), n_layer);
            out.push_back(static_cast<int32_t>(il));
        }
    } else {
        for (int32_t il = 0; il < n_layer; ++il) out.push_back(il);
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
}

// Appends the rows of a [n_in, rows] matrix (f32 or f16) to dst as f32; a NaN or inf is an error.
float * copy_rows_f32(const ggml_tensor * t, float * dst) {
    const int64_t n = ggml_nelements(t);
    if (t->type == GGML_TYPE_F32) {
        ggml_backend_tensor_get(t, dst, 0, ggml_nbytes(t));
    } else {
        std::vector<ggml_fp16_t> tmp(static_cast<size_t>(n));
        ggml_backend_tensor_get(t, tmp.data(), 0, ggml_nbytes(t));
        ggml_fp16_to_fp32_row(tmp.data(), dst, n);
    }
    if (!std::all_of(dst, dst + n, [](float v) { return std::isfinite(v); })) {
        fail("adapter tensor '%s' holds NaN or infinite values", ggml_get_name(t));
    }
    return dst + n;
}

// Stores f32 values into a packed tensor of type f32 or f16.
void set_packed(ggml_tensor * dst, const std::vector<float> & values) {
    if (dst->type == GGML_TYPE_F32) {
        ggml_backend_tensor_set(dst, values.data(), 0, ggml_nbytes(dst));
        return;
    }
    std::vector<ggml_fp16_t> halves(values.size());
    ggml_fp32_to_fp16_row(values.data(), halves.data(), static_cast<int64_t>(values.size()));
    ggml_backend_tensor_set(dst, halves.data(), 0, ggml_nbytes(dst));
}

// A [D, out] correction matrix transposed to [out, D], as f32.
std::vector<float> transposed(const ggml_tensor * src) {
    const int64_t D = src->ne[0], out = src->ne[1];
    std::vector<float> a(static_cast<size_t>(D * out)), b(a.size());
    copy_rows_f32(src, a.data());
    for (int64_t o = 0; o < out; ++o) {
        for (int64_t d = 0; d < D; ++d) b[d * out + o] = a[o * D + d];
    }
    return b;
}

// Each correction matrix of a layer and the slot of its transposed copy in a packed set.
struct correction_slot {
    ggml_tensor * dm_dmem_layer::*  src;
    ggml_tensor * dm_dmem_packed::* dst;
    const char *                    name;
};
constexpr correction_slot k_corrections[] = {
    {&dm_dmem_layer::dq, &dm_dmem_packed::dq_t, "dq"}, {&dm_dmem_layer::dk, &dm_dmem_packed::dk_t, "dk"},
    {&dm_dmem_layer::dv, &dm_dmem_packed::dv_t, "dv"}, {&dm_dmem_layer::d_o, &dm_dmem_packed::do_t, "do"}};

bool all_matrices_f16(const dm_adapter & a) {
    for (const dm_dmem_layer & l : a.layers) {
        for (const ggml_tensor * t : {l.mq, l.mk, l.mv, l.beta_w, l.lambda_w, l.dq, l.dk, l.dv, l.d_o}) {
            if (t && t->type != GGML_TYPE_F16) return false;
        }
    }
    return true;
}

void new_packed(ggml_context * ctx, ggml_type type, const dm_dmem_layer & l, int64_t n_embd, int64_t rows,
                dm_dmem_packed & p) {
    const char * suffix = type == GGML_TYPE_F16 ? "_f16" : "";
    p.w_in = ggml_new_tensor_2d(ctx, type, n_embd, rows);
    ggml_format_name(p.w_in, "blk.%d.dmem_in%s", l.il, suffix);
    for (const correction_slot & c : k_corrections) {
        const ggml_tensor * src = l.*c.src;
        if (!src) continue;
        p.*c.dst = ggml_new_tensor_2d(ctx, type, src->ne[1], src->ne[0]);   // [out, D]
        ggml_format_name(p.*c.dst, "blk.%d.dmem_%s_t%s", l.il, c.name, suffix);
    }
}

// Fills the layer's packed sets (f32, and f16 when it has one) from the stacked input matrix w_in.
void fill_packed(dm_dmem_layer & l, const std::vector<float> & w_in) {
    std::vector<dm_dmem_packed *> sets = {&l.f32};
    if (l.f16.w_in) sets.push_back(&l.f16);
    for (dm_dmem_packed * p : sets) set_packed(p->w_in, w_in);
    for (const correction_slot & c : k_corrections) {
        if (!(l.*c.src)) continue;
        const std::vector<float> t = transposed(l.*c.src);
        for (dm_dmem_packed * p : sets) set_packed(p->*c.dst, t);
    }
}

// Lays the weights out for speed: each layer's input projections stacked into one matrix (and the
// gate biases into one vector), so a token costs one mat-mul instead of four or five, and the
// correction matrices transposed for outer-product sums. Small mat-muls are all overhead.
void pack_weights(dm_adapter & a, int64_t n_embd) {
    const dm_dmem_config & c = a.cfg;
    const int64_t n_gates = c.uses_lambda_weights() ? 2 * c.gate_width : c.gate_width;
    const int64_t rows = 3 * c.width() + n_gates;
    ggml_init_params params = {ggml_tensor_overhead() * (11 * a.layers.size() + 1), nullptr, /*no_alloc =*/ true};
    a.packed_ctx = ggml_init(params);
    if (!a.packed_ctx) fail("cannot create the δ-mem weight context");
    const bool half = all_matrices_f16(a);
    for (dm_dmem_layer & l : a.layers) {
        l.b_in = ggml_new_tensor_1d(a.packed_ctx, GGML_TYPE_F32, n_gates);
        ggml_format_name(l.b_in, "blk.%d.dmem_in_bias", l.il);
        new_packed(a.packed_ctx, GGML_TYPE_F32, l, n_embd, rows, l.f32);
        if (half) new_packed(a.packed_ctx, GGML_TYPE_F16, l, n_embd, rows, l.f16);
    }
    a.packed_buf = ggml_backend_alloc_ctx_tensors_from_buft(a.packed_ctx, ggml_backend_cpu_buffer_type());
    if (!a.packed_buf) fail("cannot allocate the δ-mem weights");
    ggml_backend_buffer_set_usage(a.packed_buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    std::vector<float> w(static_cast<size_t>(n_embd * rows)), b(static_cast<size_t>(n_gates));
    for (dm_dmem_layer & l : a.layers) {
        float * dst = w.data();
        for (const ggml_tensor * t : {l.mq, l.mk, l.mv, l.beta_w, l.lambda_w}) {
            if (t) dst = copy_rows_f32(t, dst);
        }
        float * bias = copy_rows_f32(l.beta_b, b.data());
        if (l.lambda_b) copy_rows_f32(l.lambda_b, bias);
        if (l.do_norm) {   // read in place by the graph: copied only to be checked
            std::vector<float> norm(static_cast<size_t>(n_embd));
            copy_rows_f32(l.do_norm, norm.data());
        }
        ggml_backend_tensor_set(l.b_in, b.data(), 0, ggml_nbytes(l.b_in));
        fill_packed(l, w);
    }
}

} // namespace

dm_adapter::~dm_adapter() {
    if (packed_buf) ggml_backend_buffer_free(packed_buf);
    if (packed_ctx) ggml_free(packed_ctx);
}

bool dm_has_packed_adapter(const gguf_context * gguf) { return gguf_find_key(gguf, "deltamem.rank") >= 0; }

std::unique_ptr<dm_adapter> dm_adapter_load(const dm_model & model, const std::string & path, bool use_mmap) {
    auto a = std::make_unique<dm_adapter>();
    const gguf_context * g = model.gguf;
    ggml_context * ctx = model.ctx_w;
    a->source = model.path;
    if (!path.empty()) {
        a->file = std::make_unique<dm_weights_file>();
        a->file->open(path);
        g = a->file->gguf;
        ctx = a->file->ctx;
        a->source = path;
        const std::string type = dm::gguf_string(g, "general.type").value_or("");
        const std::string kind = dm::gguf_string(g, "adapter.type").value_or("");
        if (type != "adapter" || kind != "delta-mem") {
            fail("'%s' is not a δ-mem adapter (general.type='%s', adapter.type='%s')", path.c_str(), type.c_str(), kind.c_str());
        }
    }
    check_backbone(g, model);
    a->cfg = read_config(g);
    a->fingerprint = dm::gguf_require_string(g, "deltamem.fingerprint");
    a->delta_heads = read_delta_heads(g);

    std::set<std::string> claimed;
    a->slot_of_layer.assign(model.hp.n_layer, -1);
    for (int32_t il : target_layers(g, model.hp.n_layer)) {
        a->slot_of_layer[il] = static_cast<int32_t>(a->layers.size());
        a->layers.push_back(read_layer(ctx, il, model, a->cfg, a->delta_heads, claimed));
    }
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
        const std::string name = ggml_get_name(t);
        if (name.find(".dmem_") != std::string::npos && !claimed.count(name)) {
            fail("adapter tensor '%s' belongs to no targeted layer or head", name.c_str());
        }
    }
    if (a->file) a->file->load_data(use_mmap);
    pack_weights(*a, model.hp.n_embd);
    return a;
}

void dm_adapter_offload(dm_adapter & a, const dm_placement & placement) {
    for (ggml_backend_dev_t dev : placement.devices) {
        std::vector<ggml_tensor **> tensors;
        for (dm_dmem_layer & l : a.layers) {
            if (placement.layer[l.il] != dev) continue;
            l.on_cpu = false;
            for (ggml_tensor ** t : {&l.b_in, &l.do_norm, &l.f32.w_in, &l.f32.dq_t, &l.f32.dk_t, &l.f32.dv_t, &l.f32.do_t}) {
                tensors.push_back(t);
            }
        }
        if (tensors.empty()) continue;
        a.device_weights.push_back(std::make_unique<dm_device_weights>());
        dm_copy_to_device(*a.device_weights.back(), dev, tensors);
    }
}
