#include "dmem/memory.h"

#include "common/error.h"
#include "dmem/adapter.h"

#include <ggml-alloc.h>

dm_memory::~dm_memory() {
    if (buf) ggml_backend_buffer_free(buf);
    if (ctx) ggml_free(ctx);
}

void dm_memory::init(const dm_adapter & adapter, ggml_backend_buffer_type_t buft) {
    const int64_t r = adapter.cfg.rank, H = adapter.cfg.n_heads;
    ggml_init_params params = {ggml_tensor_overhead() * (adapter.layers.size() + 1), nullptr, /*no_alloc =*/ true};
    ctx = ggml_init(params);
    if (!ctx) dm::fail("cannot create the δ-mem state context");
    for (const dm_dmem_layer & l : adapter.layers) {
        state.push_back(ggml_new_tensor_3d(ctx, GGML_TYPE_F32, r, r, H));
        ggml_format_name(state.back(), "dmem_state_l%d", l.il);
    }
    buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
    if (!buf) dm::fail("cannot allocate the δ-mem state");
    clear();
}

void dm_memory::clear() {
    if (buf) ggml_backend_buffer_clear(buf, 0);
}

size_t dm_memory::n_floats() const {
    size_t n = 0;
    for (const ggml_tensor * t : state) n += static_cast<size_t>(ggml_nelements(t));
    return n;
}

// The tensor layout is [col, row, head] with the column fastest, which is the row-major
// [head, row, col] order of the Python view: a plain copy in both directions.
void dm_memory::get(float * out) const {
    for (const ggml_tensor * t : state) {
        ggml_backend_tensor_get(t, out, 0, ggml_nbytes(t));
        out += ggml_nelements(t);
    }
}

void dm_memory::set(const float * in) {
    for (ggml_tensor * t : state) {
        ggml_backend_tensor_set(t, in, 0, ggml_nbytes(t));
        in += ggml_nelements(t);
    }
}
