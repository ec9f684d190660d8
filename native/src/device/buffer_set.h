// Tensors of one kind (the KV cache, the δ-mem state) spread over devices: one ggml context and
// one buffer per buffer type, so each layer's part lives where that layer is computed.
#pragma once

#include <ggml-backend.h>
#include <ggml.h>

#include <vector>

struct dm_buffer_set {
    struct part {
        ggml_backend_buffer_type_t buft = nullptr;
        ggml_context *             ctx = nullptr;
        ggml_backend_buffer_t      buf = nullptr;
    };
    std::vector<part> parts;

    dm_buffer_set() = default;
    dm_buffer_set(const dm_buffer_set &) = delete;
    dm_buffer_set & operator=(const dm_buffer_set &) = delete;
    ~dm_buffer_set();

    // The context for tensors in buft (made on first use, room for max_tensors).
    ggml_context * context_for(ggml_backend_buffer_type_t buft, size_t max_tensors);
    // Allocates every part and zeroes it; throws dm::Error naming what (e.g. "the KV cache").
    void allocate(const char * what);
    void clear();
};

// The buffer type of the device that computes a layer (nullptr: the CPU).
ggml_backend_buffer_type_t dm_layer_buffer_type(ggml_backend_dev_t dev);
