// Weight mat-muls in a forward graph: the engine's own CPU kernel (matmul/qmatmul.h) where it serves,
// ggml_mul_mat elsewhere (other types, device layers).
#pragma once

#include <ggml.h>

#include <utility>
#include <vector>

// The mat-muls of one graph build. Projections of the same input of many columns (q, k, v; gate,
// up) share one quantisation of it.
struct dm_matmuls {
    ggml_context * ctx;
    std::vector<std::pair<const ggml_tensor *, ggml_tensor *>> quantised;   // (x, x quantised for the kernel)

    // W x: [rows, n] for W [k, rows] and x [k, n].
    ggml_tensor * mul(ggml_tensor * w, ggml_tensor * x);

private:
    ggml_tensor * quantise(ggml_tensor * x);
};
