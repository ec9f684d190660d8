#include "model/repack.h"

#include "common/error.h"
#include "matmul/qmatmul.h"
#include "model/model.h"

#include <ggml-alloc.h>

#include <cstring>
#include <string>
#include <utility>

namespace {

ggml_backend_buffer_type_t cpu_repack_buffer_type(ggml_backend_dev_t dev) {
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto get_extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts"));
    if (!get_extra) return nullptr;
    for (ggml_backend_buffer_type_t * b = get_extra(dev); b && *b; ++b) {
        if (std::strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) return *b;
    }
    return nullptr;
}

// Asks the CPU device whether a mat-mul with this weight, stored in buft, is one it can run
// (the repack kernels exist only for some types and row counts).
bool mul_mat_supported(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft, const ggml_tensor * w) {
    ggml_init_params params = {ggml_tensor_overhead() * 4, nullptr, /*no_alloc =*/ true};
    ggml_context * ctx = ggml_init(params);
    if (!ctx) return false;
    ggml_tensor * weight = ggml_new_tensor_2d(ctx, w->type, w->ne[0], w->ne[1]);
    ggml_tensor * op = ggml_mul_mat(ctx, weight, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[0], 512));
    ggml_backend_buffer_t probe = ggml_backend_buft_alloc_buffer(buft, 0);
    bool ok = false;
    if (probe) {
        weight->buffer = probe;
        ok = ggml_backend_dev_supports_op(dev, op);
        ggml_backend_buffer_free(probe);
    }
    ggml_free(ctx);
    return ok;
}

// The weights on the CPU that only feed mat-muls (token_embd is also read by get_rows, so it stays;
// offloaded weights live in their device's buffers).
std::vector<ggml_tensor **> mul_mat_weights(dm_model & model) {
    std::vector<ggml_tensor **> out;
    for (dm_layer & l : model.layers) {
        for (ggml_tensor ** w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_gate, &l.ffn_up, &l.ffn_down}) out.push_back(w);
    }
    if (model.output != model.tok_embd) out.push_back(&model.output);
    std::vector<ggml_tensor **> on_host;
    for (ggml_tensor ** w : out) {
        if ((*w)->buffer == model.file.buf) on_host.push_back(w);
    }
    return on_host;
}

} // namespace

dm_repacked_weights::~dm_repacked_weights() {
    if (buf) ggml_backend_buffer_free(buf);
    if (ctx) ggml_free(ctx);
}

void dm_repack_weights(dm_model & model) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_buffer_type_t buft = dev ? cpu_repack_buffer_type(dev) : nullptr;
    if (!buft) return;

    std::vector<std::pair<ggml_tensor **, ggml_tensor *>> moves;   // (model's pointer, mapped original)
    for (ggml_tensor ** w : mul_mat_weights(model)) {
        // The engine's own kernel takes its types whatever the pass size (ggml's repacked q4_0 is slower for few tokens).
        if (!dm_qmatmul_takes_type((*w)->type) && mul_mat_supported(dev, buft, *w)) moves.emplace_back(w, *w);
    }
    if (moves.empty()) return;

    dm_repacked_weights & r = model.repacked;
    ggml_init_params params = {ggml_tensor_overhead() * (moves.size() + 1), nullptr, /*no_alloc =*/ true};
    r.ctx = ggml_init(params);
    if (!r.ctx) dm::fail("cannot create the repacked weight context");
    std::vector<ggml_tensor *> copies;
    for (auto & m : moves) {
        ggml_tensor * copy = ggml_dup_tensor(r.ctx, m.second);
        ggml_set_name(copy, ggml_get_name(m.second));
        copies.push_back(copy);
    }
    r.buf = ggml_backend_alloc_ctx_tensors_from_buft(r.ctx, buft);
    if (!r.buf) dm::fail("cannot allocate the repacked weights");
    ggml_backend_buffer_set_usage(r.buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    for (size_t i = 0; i < moves.size(); ++i) {
        ggml_backend_tensor_set(copies[i], moves[i].second->data, 0, ggml_nbytes(moves[i].second));   // repacks
        *moves[i].first = copies[i];
    }
    r.n_tensors = static_cast<int>(moves.size());
}
