// δ-mem state of one context: per targeted layer, H matrices of r×r float32, on the device of its layer.
#pragma once

#include "device/buffer_set.h"

#include <ggml-backend.h>
#include <ggml.h>

#include <vector>

struct dm_adapter;
struct dm_placement;

struct dm_memory {
    std::vector<ggml_tensor *> state;   // per adapter layer [r (key dims), r (value dims), H]
    dm_buffer_set storage;              // each layer's state on the device of that layer

    void   init(const dm_adapter & adapter, const dm_placement & placement);
    void   clear();                         // every state back to zero
    size_t n_floats() const;                // n_layers * H * r * r
    void   get(float * out) const;          // [n_layers, H, r (rows), r (cols)] row-major
    void   set(const float * in);
};
