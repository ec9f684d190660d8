#include "device/device_weights.h"

#include "common/device_failure.h"
#include "common/error.h"

dm_device_weights::~dm_device_weights() {
    dm::free_buffer(buf);
    if (ctx) ggml_free(ctx);
}

void dm_copy_to_device(dm_device_weights & out, ggml_backend_dev_t dev, const std::vector<ggml_tensor **> & tensors) {
    out.dev = dev;
    ggml_init_params params = {ggml_tensor_overhead() * (tensors.size() + 1), nullptr, /*no_alloc =*/ true};
    out.ctx = ggml_init(params);
    if (!out.ctx) dm::fail("cannot create a weight context for %s", ggml_backend_dev_name(dev));
    std::vector<std::pair<ggml_tensor **, ggml_tensor *>> copies;
    for (ggml_tensor ** t : tensors) {
        if (!*t) continue;
        ggml_tensor * copy = ggml_dup_tensor(out.ctx, *t);
        ggml_set_name(copy, ggml_get_name(*t));
        copies.emplace_back(t, copy);
    }
    if (copies.empty()) return;
    out.buf = ggml_backend_alloc_ctx_tensors_from_buft(out.ctx, ggml_backend_dev_buffer_type(dev));
    if (!out.buf) dm::fail("cannot allocate the weights on %s (%s): not enough device memory?", ggml_backend_dev_name(dev),
                           ggml_backend_dev_description(dev));
    ggml_backend_buffer_set_usage(out.buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);   // the scheduler runs ops where their weights are
    for (auto & c : copies) {
        ggml_backend_tensor_set(c.second, (*c.first)->data, 0, ggml_nbytes(c.second));
        *c.first = c.second;
    }
}
