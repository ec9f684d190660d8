// The tokenizer: byte-level BPE read from GGUF metadata (tokenizer.ggml.*).
//
// Tokenization follows Hugging Face `tokenizers` (the reference): added tokens are split out of the
// text first (longest match at the leftmost position), the rest is normalised (NFC for Qwen2),
// pre-tokenized by the model's pattern, mapped to bytes, and each piece is merged by BPE in rank
// order (lowest rank first, leftmost first among equals).
#pragma once

#include "vocab/pretokenize.h"

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

struct gguf_context;

// Token types as gguf-py writes them (tokenizer.ggml.token_type).
enum dm_token_type : int32_t {
    DM_TOKEN_TYPE_UNDEFINED    = 0,
    DM_TOKEN_TYPE_NORMAL       = 1,
    DM_TOKEN_TYPE_UNKNOWN      = 2,
    DM_TOKEN_TYPE_CONTROL      = 3,
    DM_TOKEN_TYPE_USER_DEFINED = 4,
    DM_TOKEN_TYPE_UNUSED       = 5,
    DM_TOKEN_TYPE_BYTE         = 6,
};

struct dm_bpe_word_cache;

struct dm_vocab {
    // Reads tokenizer.ggml.* from the model file; throws dm::Error on a missing/unsupported tokenizer.
    // A file without tokenizer metadata leaves the vocab empty (tokenize then fails).
    void load(const gguf_context * gguf);

    int32_t n_tokens() const { return static_cast<int32_t>(tokens.size()); }
    bool    empty() const { return tokens.empty(); }

    // Throws dm::Error when the vocab is empty.
    std::vector<int32_t> tokenize(const char * text, size_t len, bool add_special, bool parse_special) const;
    // Bytes of one token (see dm_token_to_piece); throws dm::Error on an id out of range.
    const std::string & token_to_piece(int32_t token, bool special) const;
    std::string detokenize(const int32_t * ids, size_t n, bool special) const;

    int32_t token_bos() const { return bos; }
    int32_t token_eos() const { return eos; }
    int32_t token_eot() const { return eot; }
    bool    is_eog(int32_t token) const { return eog.count(token) != 0; }
    bool    is_control(int32_t token) const;
    int32_t token_type(int32_t token) const;

    std::vector<std::string> tokens;   // token text as stored (byte-level form for ordinary tokens)

private:
    struct merge_result {
        int32_t rank;
        int32_t token;   // the merged token
    };
    // An added token that is split out of the text before pre-tokenization.
    struct added_token {
        std::string text;
        int32_t     id;
        bool        control;   // only recognised with parse_special
    };
    // A run of input: either an added token (id >= 0) or text to pre-tokenize.
    struct fragment {
        int32_t id;
        size_t  begin;
        size_t  end;
    };

    std::vector<int32_t>     types;    // dm_token_type per token
    std::vector<std::string> pieces;   // bytes each token stands for (its text for special tokens)

    dm_pre_type pre_type = dm_pre_type::gpt2;
    bool normalize_nfc = false;   // Qwen2's tokenizer applies NFC before pre-tokenization
    bool ignore_merges = false;   // a piece that is itself a token is emitted whole (Llama-3)

    std::array<int32_t, 256> byte_token{};                 // token of each single byte, -1 if none
    std::unordered_map<std::string, int32_t> bytes_to_token;   // ordinary tokens by their bytes
    std::unordered_map<uint64_t, merge_result> merges;         // (left, right) token pair -> merge
    std::vector<added_token> added;                            // longest text first
    std::array<std::vector<uint32_t>, 256> added_by_first_byte;   // indices into added, same order

    int32_t bos = -1;
    int32_t eos = -1;
    int32_t eot = -1;
    bool add_bos = false;
    bool add_eos = false;
    std::unordered_set<int32_t> eog;

    std::shared_ptr<dm_bpe_word_cache> cache;

    void reset();
    void load_tokens(const gguf_context * gguf);
    void load_merges(const gguf_context * gguf);
    void load_special(const gguf_context * gguf);
    void set_pre_type(const std::string & pre);

    std::vector<fragment> split_added(const char * text, size_t len, bool parse_special) const;
    void tokenize_text(const char * text, size_t len, std::vector<int32_t> & out) const;
    void tokenize_piece(const std::string & piece, std::vector<int32_t> & out) const;
    void bpe(const std::string & piece, std::vector<int32_t> & out) const;
};
