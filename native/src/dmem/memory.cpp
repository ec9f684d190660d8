#include "dmem/memory.h"

#include "common/error.h"
#include "device/devices.h"
#include "dmem/adapter.h"


void dm_memory::init(const dm_adapter & adapter, const dm_placement & placement) {
    const int64_t r = adapter.cfg.rank, H = adapter.cfg.n_heads;
    for (const dm_dmem_layer & l : adapter.layers) {
        ggml_context * ctx = storage.context_for(dm_layer_buffer_type(placement.layer[l.il]), adapter.layers.size());
        state.push_back(ggml_new_tensor_3d(ctx, GGML_TYPE_F32, r, r, H));
        ggml_format_name(state.back(), "dmem_state_l%d", l.il);
    }
    storage.allocate("the δ-mem state");
}

void dm_memory::clear() { storage.clear(); }

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
