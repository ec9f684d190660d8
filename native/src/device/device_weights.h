// Weights copied from the host (the mapped file, or the adapter's packed buffer) into a device's
// memory: one buffer per device, holding the tensors of the layers placed there.
#pragma once

#include <ggml-backend.h>
#include <ggml.h>

#include <vector>

struct dm_device_weights {
    ggml_backend_dev_t    dev = nullptr;
    ggml_context *        ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;

    dm_device_weights() = default;
    dm_device_weights(const dm_device_weights &) = delete;
    dm_device_weights & operator=(const dm_device_weights &) = delete;
    ~dm_device_weights();
};

// Copies each *t (a tensor with host data) into one new buffer on dev and points *t at its copy.
// Null entries are skipped. Throws dm::Error when the device cannot hold them.
void dm_copy_to_device(dm_device_weights & out, ggml_backend_dev_t dev, const std::vector<ggml_tensor **> & tensors);
