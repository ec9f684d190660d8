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

dm_weight_copies::~dm_weight_copies() {
    if (buf) ggml_backend_buffer_free(buf);
    if (ctx) ggml_free(ctx);
}

namespace {

using weight_move = std::pair<ggml_tensor **, ggml_tensor *>;   // (model's pointer, mapped original)

// Copies the moved weights into a new buffer of buft, each written by write(copy, original), and
// points the model at the copies.
template <typename Write>
void copy_weights(const std::vector<weight_move> & moves, ggml_backend_buffer_type_t buft, dm_weight_copies & out,
                  Write write) {
    if (moves.empty()) return;
    ggml_init_params params = {ggml_tensor_overhead() * (moves.size() + 1), nullptr, /*no_alloc =*/ true};
    out.ctx = ggml_init(params);
    if (!out.ctx) dm::fail("cannot create the repacked weight context");
    std::vector<ggml_tensor *> copies;
    for (const auto & m : moves) {
        ggml_tensor * copy = ggml_dup_tensor(out.ctx, m.second);
        ggml_set_name(copy, ggml_get_name(m.second));
        copies.push_back(copy);
    }
    out.buf = ggml_backend_alloc_ctx_tensors_from_buft(out.ctx, buft);
    if (!out.buf) dm::fail("cannot allocate the repacked weights");
    ggml_backend_buffer_set_usage(out.buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    for (size_t i = 0; i < moves.size(); ++i) {
        write(copies[i], moves[i].second);
        *moves[i].first = copies[i];
    }
}

} // namespace

void dm_repack_weights(dm_model & model) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_buffer_type_t repack_buft = dev ? cpu_repack_buffer_type(dev) : nullptr;

    std::vector<weight_move> to_ggml, to_amx;
    for (ggml_tensor ** w : mul_mat_weights(model)) {
        const ggml_tensor * t = *w;
        if (dm_qmatmul_takes_type(t->type)) {
            // The engine's own kernel takes its types whatever the pass size (ggml's repacked q4_0 is slower for few tokens).
            if (dm_qmatmul_packs(t->type, t->ne[0], t->ne[1]) && ggml_is_contiguous(t)) to_amx.emplace_back(w, *w);
        } else if (repack_buft && mul_mat_supported(dev, repack_buft, t)) {
            to_ggml.emplace_back(w, *w);
        }
    }
    dm_repacked_weights & r = model.repacked;
    copy_weights(to_ggml, repack_buft, r.ggml_repack, [](ggml_tensor * copy, const ggml_tensor * from) {
        ggml_backend_tensor_set(copy, from->data, 0, ggml_nbytes(from));   // the buffer repacks
    });
    copy_weights(to_amx, ggml_backend_cpu_buffer_type(), r.amx, [](ggml_tensor * copy, const ggml_tensor * from) {
        dm_qmatmul_pack(from->data, from->type, from->ne[0], from->ne[1], copy->data);
        dm_qmatmul_mark_packed(copy);
    });
    r.n_tensors = static_cast<int>(to_ggml.size() + to_amx.size());
}
