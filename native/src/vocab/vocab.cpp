#include "vocab/vocab.h"

#include "common/error.h"

#include <gguf.h>

void dm_vocab::load(const gguf_context * gguf) {
    const int64_t key = gguf_find_key(gguf, "tokenizer.ggml.tokens");
    if (key < 0) {
        return;
    }
    const size_t n = gguf_get_arr_n(gguf, key);
    tokens.resize(n);
    for (size_t i = 0; i < n; ++i) {
        tokens[i] = gguf_get_arr_str(gguf, key, i);
    }
}
