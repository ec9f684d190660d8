// δ-mem state of one context: per targeted layer, H matrices of r×r float32, on the context's backend.
#pragma once

#include <ggml-backend.h>
#include <ggml.h>

#include <vector>

struct dm_adapter;

struct dm_memory {
    std::vector<ggml_tensor *> state;   // per adapter layer [r (key dims), r (value dims), H]
    ggml_context *        ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;

    dm_memory() = default;
    dm_memory(const dm_memory &) = delete;
    dm_memory & operator=(const dm_memory &) = delete;
    ~dm_memory();

    void   init(const dm_adapter & adapter, ggml_backend_buffer_type_t buft);
    void   clear();                         // every state back to zero
    size_t n_floats() const;                // n_layers * H * r * r
    void   get(float * out) const;          // [n_layers, H, r (rows), r (cols)] row-major
    void   set(const float * in);
};
