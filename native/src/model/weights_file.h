// A GGUF file whose tensors live in a ggml CPU buffer: the model's file, or a δ-mem adapter's.
#pragma once

#include <ggml-backend.h>
#include <ggml.h>

#include <string>

struct gguf_context;

struct dm_weights_file {
    std::string           path;
    gguf_context *        gguf = nullptr;      // metadata
    ggml_context *        ctx = nullptr;       // tensor descriptors
    ggml_backend_buffer_t buf = nullptr;       // tensor data (the mapped file, or a copy)
    void *                mapping = nullptr;
    size_t                mapping_size = 0;

    dm_weights_file() = default;
    dm_weights_file(const dm_weights_file &) = delete;
    dm_weights_file & operator=(const dm_weights_file &) = delete;
    ~dm_weights_file();

    // Parses the header and tensor descriptors; throws dm::Error on a file that is not valid GGUF.
    void open(const std::string & path);
    // Checks every tensor lies inside the file, then points the tensors at their bytes.
    void load_data(bool use_mmap);
};
