#include "matmul/matmul_graph.h"

#include "common/error.h"
#include "matmul/qmatmul.h"

ggml_tensor * dm_matmuls::quantise(ggml_tensor * x) {
    for (const auto & [from, q] : quantised) {
        if (from == x) return q;
    }
    ggml_tensor * args[] = {x};
    ggml_tensor * q = ggml_custom_4d(ctx, GGML_TYPE_I8, static_cast<int64_t>(dm_qact_bytes(x->ne[0])), x->ne[1], 1, 1,
                                     args, 1, dm_qact_op_cpu, GGML_N_TASKS_MAX, nullptr);
    quantised.emplace_back(x, q);
    return q;
}

// Up to this many columns every thread of the mat-mul quantises x itself: less work than the
// barrier a shared quantisation node costs (single-token decodes and small batches).
constexpr int64_t k_own_quantisation = 8;

ggml_tensor * dm_matmuls::mul(ggml_tensor * w, ggml_tensor * x) {
    if (!dm_qmatmul_serves(w, x)) {
        if (dm_qmatmul_is_packed(w)) dm::fail("weight %s is packed for the AMX kernel, which cannot take this input", ggml_get_name(w));
        return ggml_mul_mat(ctx, w, x);
    }
    ggml_tensor * args[] = {w, x->ne[1] <= k_own_quantisation ? x : quantise(x)};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], 1, 1, args, 2, dm_qmatmul_op_cpu, GGML_N_TASKS_MAX,
                          nullptr);
}
