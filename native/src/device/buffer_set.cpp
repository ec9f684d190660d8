#include "device/buffer_set.h"

#include "common/device_failure.h"
#include "common/error.h"

#include <ggml-alloc.h>
#include <ggml-cpu.h>

dm_buffer_set::~dm_buffer_set() {
    for (part & p : parts) {
        dm::free_buffer(p.buf);
        if (p.ctx) ggml_free(p.ctx);
    }
}

ggml_context * dm_buffer_set::context_for(ggml_backend_buffer_type_t buft, size_t max_tensors) {
    for (part & p : parts) {
        if (p.buft == buft) return p.ctx;
    }
    ggml_init_params params = {ggml_tensor_overhead() * (max_tensors + 1), nullptr, /*no_alloc =*/ true};
    part p;
    p.buft = buft;
    p.ctx = ggml_init(params);
    if (!p.ctx) dm::fail("cannot create a tensor context");
    parts.push_back(p);
    return p.ctx;
}

void dm_buffer_set::allocate(const char * what) {
    for (part & p : parts) {
        p.buf = ggml_backend_alloc_ctx_tensors_from_buft(p.ctx, p.buft);
        if (!p.buf) dm::fail("cannot allocate %s in %s", what, ggml_backend_buft_name(p.buft));
    }
    clear();
}

void dm_buffer_set::clear() {
    for (part & p : parts) {
        if (p.buf) ggml_backend_buffer_clear(p.buf, 0);
    }
}

ggml_backend_buffer_type_t dm_layer_buffer_type(ggml_backend_dev_t dev) {
    return dev ? ggml_backend_dev_buffer_type(dev) : ggml_backend_cpu_buffer_type();
}
