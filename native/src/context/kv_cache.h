// The KV cache of one sequence: per layer, keys and values of every past position.
#pragma once

#include "device/buffer_set.h"

#include <ggml-backend.h>
#include <ggml.h>

#include <cstdint>
#include <vector>

struct dm_model;

struct dm_kv_cache {
    ggml_type type = GGML_TYPE_F16;
    int32_t   n_ctx = 0;
    std::vector<ggml_tensor *> k;   // per layer [n_embd_kv,    n_ctx]
    std::vector<ggml_tensor *> v;   // per layer [n_embd_v_gqa, n_ctx]

    dm_buffer_set storage;          // each layer's rows on the device of that layer

    // Allocates the cache of every layer on the device the model placed it on.
    void init(const dm_model & model, int32_t n_ctx, ggml_type type);
    size_t bytes_per_token() const;   // one row of keys and values in every layer
};
