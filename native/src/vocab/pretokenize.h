// Pre-tokenizers: split text into the pieces BPE works on, as the regular expressions of the
// Hugging Face tokenizers do, but matched by hand (one small matcher per pattern, no regex engine).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

enum class dm_pre_type {
    gpt2,     // GPT-2:  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    smollm,   // every \p{N} on its own, then the GPT-2 pattern on the text between (SmolLM/SmolLM2)
    llama3,   // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
    qwen2,    // the Llama-3 pattern with \p{N} (single digits) instead of \p{N}{1,3}
};

// Splits the code points cps into pieces; returns the end index of each piece, in order (the last
// one is cps.size(); nothing for empty input).
std::vector<size_t> dm_pretokenize(dm_pre_type type, const std::vector<uint32_t> & cps);
