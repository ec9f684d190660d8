// The tokenizer: byte-level BPE read from GGUF metadata (tokenizer.ggml.*).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct gguf_context;

struct dm_vocab {
    // Reads tokenizer.ggml.* from the model file; throws dm::Error on a missing/unsupported tokenizer.
    void load(const gguf_context * gguf);

    int32_t n_tokens() const { return static_cast<int32_t>(tokens.size()); }

    std::vector<std::string> tokens;
};
