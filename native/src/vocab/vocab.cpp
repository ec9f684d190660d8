#include "vocab/vocab.h"

#include "common/error.h"
#include "common/gguf_util.h"
#include "vocab/unicode.h"

#include <gguf.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <mutex>
#include <queue>

// Pieces already merged, keyed by their bytes. Text repeats words a lot, and BPE on a word is the
// costly step, so remembering results pays; the table is bounded and simply emptied when full.
struct dm_bpe_word_cache {
    static constexpr size_t k_max_words = 1 << 16;
    static constexpr size_t k_max_word_bytes = 128;   // longer pieces are rare; not worth keeping

    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>> words;
};

namespace {

// GPT-2's byte-level alphabet: every byte is shown as a printable code point. Printable ASCII and
// most of Latin-1 stand for themselves; the other 68 bytes take U+0100 upwards, in byte order.
bool byte_is_printable(int b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

const std::unordered_map<uint32_t, uint8_t> & byte_of_code_point() {
    static const std::unordered_map<uint32_t, uint8_t> table = [] {
        std::unordered_map<uint32_t, uint8_t> t;
        uint32_t next = 0x100;
        for (int b = 0; b < 256; ++b) {
            t.emplace(byte_is_printable(b) ? static_cast<uint32_t>(b) : next++, static_cast<uint8_t>(b));
        }
        return t;
    }();
    return table;
}

// Bytes of a token written in the byte-level alphabet; false when it uses a code point outside it
// (such a token cannot come out of byte-level BPE).
bool byte_level_decode(const std::string & text, std::string & bytes) {
    const auto & table = byte_of_code_point();
    bytes.clear();
    for (const uint32_t cp : dm::unicode::decode_utf8(text.data(), text.size())) {
        const auto it = table.find(cp);
        if (it == table.end()) {
            return false;
        }
        bytes.push_back(static_cast<char>(it->second));
    }
    return true;
}

// "<0x0A>" -> 0x0A (byte tokens of SentencePiece-style vocabularies); -1 when not of that form.
int parse_byte_token(const std::string & text) {
    if (text.size() != 6 || text.compare(0, 3, "<0x") != 0 || text[5] != '>') {
        return -1;
    }
    int value = 0;
    for (size_t i = 3; i < 5; ++i) {
        const char c = text[i];
        int digit = -1;
        if (c >= '0' && c <= '9') { digit = c - '0'; }
        if (c >= 'A' && c <= 'F') { digit = c - 'A' + 10; }
        if (c >= 'a' && c <= 'f') { digit = c - 'a' + 10; }
        if (digit < 0) {
            return -1;
        }
        value = value * 16 + digit;
    }
    return value;
}

uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// Texts of end-of-turn tokens in common chat formats, used when the GGUF names no EOT token.
const char * const k_eot_texts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>",
};
// Texts that end generation wherever they appear as control tokens.
const char * const k_eog_texts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "<|end_of_text|>",
};

const std::string k_empty;

} // namespace

void dm_vocab::reset() {
    *this = dm_vocab();
}

void dm_vocab::set_pre_type(const std::string & pre) {
    if (pre == "default" || pre == "gpt2" || pre == "gpt-2") {
        pre_type = dm_pre_type::gpt2;
    } else if (pre == "smollm") {
        pre_type = dm_pre_type::smollm;
    } else if (pre == "qwen2") {
        pre_type = dm_pre_type::qwen2;
        normalize_nfc = true;   // Qwen2's tokenizer.json has an NFC normalizer (llama.cpp skips it)
    } else if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3" || pre == "smaug-bpe") {
        // smaug-bpe is what llama.cpp calls SmolLM3's tokenizer, which is Llama-3's.
        pre_type = dm_pre_type::llama3;
        ignore_merges = true;   // Llama-3's tokenizer.json sets "ignore_merges": true
    } else {
        dm::fail("unknown pre-tokenizer '%s' (tokenizer.ggml.pre); supported: default, gpt2, smollm, "
                 "qwen2, llama-bpe, smaug-bpe", pre.c_str());
    }
}

void dm_vocab::load(const gguf_context * gguf) {
    reset();
    const auto model = dm::gguf_string(gguf, "tokenizer.ggml.model");
    const bool has_tokens = gguf_find_key(gguf, "tokenizer.ggml.tokens") >= 0;
    if (!model || *model == "none" || *model == "no_vocab") {
        if (!model && has_tokens) {
            dm::fail("GGUF has tokenizer.ggml.tokens but no tokenizer.ggml.model");
        }
        return;   // no tokenizer: the model still loads, tokenize() explains the problem
    }
    if (*model == "llama") {
        dm::fail("SentencePiece tokenizers (tokenizer.ggml.model = \"llama\") are not supported yet; "
                 "only byte-level BPE (\"gpt2\") is");
    }
    if (*model != "gpt2") {
        dm::fail("unsupported tokenizer model '%s' (tokenizer.ggml.model); only byte-level BPE (\"gpt2\") "
                 "is supported", model->c_str());
    }
    set_pre_type(dm::gguf_string(gguf, "tokenizer.ggml.pre").value_or("default"));
    load_tokens(gguf);
    load_merges(gguf);
    load_special(gguf);
    cache = std::make_shared<dm_bpe_word_cache>();
}

void dm_vocab::load_tokens(const gguf_context * gguf) {
    auto texts = dm::gguf_string_array(gguf, "tokenizer.ggml.tokens");
    if (!texts || texts->empty()) {
        dm::fail("GGUF tokenizer has no tokens (tokenizer.ggml.tokens)");
    }
    if (texts->size() > static_cast<size_t>(INT32_MAX)) {
        dm::fail("GGUF tokenizer has too many tokens (%zu)", texts->size());
    }
    tokens = std::move(*texts);
    const size_t n = tokens.size();

    types.assign(n, DM_TOKEN_TYPE_NORMAL);
    if (const auto t = dm::gguf_int_array(gguf, "tokenizer.ggml.token_type")) {
        if (t->size() != n) {
            dm::fail("tokenizer.ggml.token_type has %zu entries for %zu tokens", t->size(), n);
        }
        for (size_t i = 0; i < n; ++i) {
            types[i] = static_cast<int32_t>((*t)[i]);
        }
    }

    byte_token.fill(-1);
    pieces.assign(n, std::string());
    std::string bytes;
    for (size_t i = 0; i < n; ++i) {
        const auto id = static_cast<int32_t>(i);
        const std::string & text = tokens[i];
        switch (types[i]) {
            case DM_TOKEN_TYPE_CONTROL:
            case DM_TOKEN_TYPE_USER_DEFINED:
                pieces[i] = text;   // added tokens are stored as plain text, not byte-level
                if (!text.empty()) {
                    added.push_back({text, id, types[i] == DM_TOKEN_TYPE_CONTROL});
                }
                break;
            case DM_TOKEN_TYPE_BYTE: {
                const int b = parse_byte_token(text);
                pieces[i] = b >= 0 ? std::string(1, static_cast<char>(b)) : text;
                if (b >= 0 && byte_token[b] < 0) {
                    byte_token[b] = id;
                }
                break;
            }
            default:
                if (!byte_level_decode(text, bytes)) {
                    pieces[i] = text;   // unreachable by BPE; rendered as stored
                    break;
                }
                pieces[i] = bytes;
                if (types[i] == DM_TOKEN_TYPE_NORMAL || types[i] == DM_TOKEN_TYPE_UNDEFINED) {
                    bytes_to_token.emplace(bytes, id);   // the first of duplicates wins
                    if (bytes.size() == 1 && byte_token[static_cast<uint8_t>(bytes[0])] < 0) {
                        byte_token[static_cast<uint8_t>(bytes[0])] = id;
                    }
                }
                break;
        }
    }
    // Longest first, so that matching prefers "<|im_start|>" over a shorter token it starts with.
    std::stable_sort(added.begin(), added.end(),
        [](const added_token & a, const added_token & b) { return a.text.size() > b.text.size(); });
    for (size_t i = 0; i < added.size(); ++i) {
        added_by_first_byte[static_cast<uint8_t>(added[i].text[0])].push_back(static_cast<uint32_t>(i));
    }
}

void dm_vocab::load_merges(const gguf_context * gguf) {
    const auto list = dm::gguf_string_array(gguf, "tokenizer.ggml.merges");
    if (!list) {
        dm::fail("byte-level BPE tokenizer without merges (tokenizer.ggml.merges)");
    }
    std::unordered_map<std::string, int32_t> id_of_text;
    id_of_text.reserve(tokens.size());
    for (size_t i = 0; i < tokens.size(); ++i) {
        id_of_text.emplace(tokens[i], static_cast<int32_t>(i));
    }
    merges.reserve(list->size());
    for (size_t rank = 0; rank < list->size(); ++rank) {
        const std::string & merge = (*list)[rank];
        // "left right"; the left part is never empty, so search for the separator from 1.
        const size_t sep = merge.find(' ', 1);
        if (sep == std::string::npos) {
            dm::fail("malformed merge #%zu '%s' in tokenizer.ggml.merges", rank, merge.c_str());
        }
        const std::string left = merge.substr(0, sep);
        const std::string right = merge.substr(sep + 1);
        const auto l = id_of_text.find(left);
        const auto r = id_of_text.find(right);
        const auto m = id_of_text.find(left + right);
        if (l == id_of_text.end() || r == id_of_text.end() || m == id_of_text.end()) {
            continue;   // refers to tokens the vocabulary lacks: it can never apply
        }
        merges.emplace(pair_key(l->second, r->second), merge_result{static_cast<int32_t>(rank), m->second});
    }
}

void dm_vocab::load_special(const gguf_context * gguf) {
    auto token_id = [&](const char * key) -> int32_t {
        const auto v = dm::gguf_int(gguf, key);
        if (!v || *v < 0 || *v >= n_tokens()) {
            return -1;   // absent, or not a token of this vocabulary
        }
        return static_cast<int32_t>(*v);
    };
    bos = token_id("tokenizer.ggml.bos_token_id");
    eos = token_id("tokenizer.ggml.eos_token_id");
    eot = token_id("tokenizer.ggml.eot_token_id");
    const int32_t eom = token_id("tokenizer.ggml.eom_token_id");
    add_bos = dm::gguf_bool(gguf, "tokenizer.ggml.add_bos_token").value_or(false);
    add_eos = dm::gguf_bool(gguf, "tokenizer.ggml.add_eos_token").value_or(false);

    auto find_control = [&](const char * text) -> int32_t {
        for (const auto & a : added) {
            if (a.text == text) {
                return a.id;
            }
        }
        return -1;
    };
    if (eot < 0) {
        for (const char * text : k_eot_texts) {
            if ((eot = find_control(text)) >= 0) {
                break;
            }
        }
    }
    for (const int32_t id : {eos, eot, eom}) {
        if (id >= 0) {
            eog.insert(id);
        }
    }
    for (const char * text : k_eog_texts) {
        const int32_t id = find_control(text);
        if (id >= 0) {
            eog.insert(id);
        }
    }
}

bool dm_vocab::is_control(int32_t token) const {
    return token_type(token) == DM_TOKEN_TYPE_CONTROL;
}

int32_t dm_vocab::token_type(int32_t token) const {
    if (token < 0 || token >= n_tokens()) {
        dm::fail("token id %d is out of range [0, %d)", token, n_tokens());
    }
    return types[static_cast<size_t>(token)];
}

const std::string & dm_vocab::token_to_piece(int32_t token, bool special) const {
    switch (token_type(token)) {
        case DM_TOKEN_TYPE_CONTROL:
        case DM_TOKEN_TYPE_UNKNOWN:
            return special ? pieces[static_cast<size_t>(token)] : k_empty;
        case DM_TOKEN_TYPE_UNUSED:
            return k_empty;
        default:
            return pieces[static_cast<size_t>(token)];
    }
}

std::string dm_vocab::detokenize(const int32_t * ids, size_t n, bool special) const {
    std::string out;
    for (size_t i = 0; i < n; ++i) {
        out += token_to_piece(ids[i], special);
    }
    return out;
}

std::vector<int32_t> dm_vocab::tokenize(const char * text, size_t len, bool add_special, bool parse_special) const {
    if (empty()) {
        dm::fail("this model has no tokenizer (its GGUF lacks tokenizer.ggml.* metadata)");
    }
    std::vector<int32_t> out;
    out.reserve(len / 3 + 2);
    if (add_special && add_bos && bos >= 0) {
        out.push_back(bos);
    }
    for (const fragment & f : split_added(text, len, parse_special)) {
        if (f.id >= 0) {
            out.push_back(f.id);
        } else {
            tokenize_text(text + f.begin, f.end - f.begin, out);
        }
    }
    if (add_special && add_eos && eos >= 0) {
        out.push_back(eos);
    }
    return out;
}

// Splits out added tokens: at each position the longest one that starts there wins, scanning from
// the left (Hugging Face's leftmost-longest matching). Control tokens count only with parse_special.
std::vector<dm_vocab::fragment> dm_vocab::split_added(const char * text, size_t len, bool parse_special) const {
    std::vector<fragment> out;
    size_t text_begin = 0;
    size_t i = 0;
    while (i < len && !added.empty()) {
        const added_token * hit = nullptr;
        for (const uint32_t index : added_by_first_byte[static_cast<uint8_t>(text[i])]) {
            const added_token & a = added[index];
            if ((!a.control || parse_special) && a.text.size() <= len - i &&
                std::memcmp(text + i, a.text.data(), a.text.size()) == 0) {
                hit = &a;
                break;
            }
        }
        if (hit == nullptr) {
            ++i;
            continue;
        }
        if (i > text_begin) {
            out.push_back({-1, text_begin, i});
        }
        out.push_back({hit->id, i, i + hit->text.size()});
        i += hit->text.size();
        text_begin = i;
    }
    if (text_begin < len) {
        out.push_back({-1, text_begin, len});
    }
    return out;
}

void dm_vocab::tokenize_text(const char * text, size_t len, std::vector<int32_t> & out) const {
    std::vector<size_t> offsets;
    std::vector<uint32_t> cps = dm::unicode::decode_utf8(text, len, &offsets);
    std::string normalized;
    if (normalize_nfc) {
        std::vector<uint32_t> composed = dm::unicode::nfc(cps);
        if (composed != cps) {
            cps = std::move(composed);
            offsets.clear();
            for (const uint32_t cp : cps) {
                offsets.push_back(normalized.size());
                dm::unicode::append_utf8(normalized, cp);
            }
            offsets.push_back(normalized.size());
            text = normalized.data();
        }
    }
    size_t begin = 0;
    std::string piece;
    for (const size_t end : dm_pretokenize(pre_type, cps)) {
        piece.assign(text + offsets[begin], offsets[end] - offsets[begin]);
        tokenize_piece(piece, out);
        begin = end;
    }
}

void dm_vocab::tokenize_piece(const std::string & piece, std::vector<int32_t> & out) const {
    const bool cacheable = cache && piece.size() <= dm_bpe_word_cache::k_max_word_bytes;
    if (cacheable) {
        std::lock_guard<std::mutex> lock(cache->mutex);
        const auto it = cache->words.find(piece);
        if (it != cache->words.end()) {
            out.insert(out.end(), it->second.begin(), it->second.end());
            return;
        }
    }
    const size_t first = out.size();
    bpe(piece, out);
    if (cacheable) {
        std::lock_guard<std::mutex> lock(cache->mutex);
        if (cache->words.size() >= dm_bpe_word_cache::k_max_words) {
            cache->words.clear();
        }
        cache->words.emplace(piece, std::vector<int32_t>(out.begin() + static_cast<std::ptrdiff_t>(first), out.end()));
    }
}

// Byte-level BPE on one piece: start from one symbol per byte and repeatedly apply the merge of
// lowest rank (the leftmost among equal ranks), as Hugging Face's BPE model does.
void dm_vocab::bpe(const std::string & piece, std::vector<int32_t> & out) const {
    if (ignore_merges) {
        const auto whole = bytes_to_token.find(piece);
        if (whole != bytes_to_token.end()) {
            out.push_back(whole->second);
            return;
        }
    }
    struct symbol {
        int32_t token;
        int32_t prev;
        int32_t next;
    };
    std::vector<symbol> symbols;
    symbols.reserve(piece.size());
    for (const char c : piece) {
        const int32_t token = byte_token[static_cast<uint8_t>(c)];
        if (token < 0) {
            continue;   // a byte the vocabulary cannot spell is dropped (HF does the same without unk)
        }
        const auto index = static_cast<int32_t>(symbols.size());
        symbols.push_back({token, index - 1, index + 1});
    }
    if (symbols.empty()) {
        return;
    }
    symbols.back().next = -1;

    struct candidate {
        int32_t rank;
        int32_t pos;     // index of the left symbol
        int32_t left;    // the pair it was made for; stale once either side has changed
        int32_t right;
        bool operator>(const candidate & o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<candidate, std::vector<candidate>, std::greater<candidate>> queue;
    auto consider = [&](int32_t pos) {
        if (pos < 0 || symbols[pos].next < 0) {
            return;
        }
        const int32_t left = symbols[pos].token;
        const int32_t right = symbols[symbols[pos].next].token;
        const auto it = merges.find(pair_key(left, right));
        if (it != merges.end()) {
            queue.push({it->second.rank, pos, left, right});
        }
    };
    for (int32_t pos = 0; pos + 1 < static_cast<int32_t>(symbols.size()); ++pos) {
        consider(pos);
    }
    while (!queue.empty()) {
        const candidate top = queue.top();
        queue.pop();
        symbol & left = symbols[top.pos];
        if (left.token != top.left || left.next < 0 || symbols[left.next].token != top.right) {
            continue;
        }
        const symbol right = symbols[left.next];
        left.token = merges.at(pair_key(top.left, top.right)).token;
        symbols[left.next].token = -1;   // merged away
        left.next = right.next;
        if (right.next >= 0) {
            symbols[right.next].prev = top.pos;
        }
        consider(left.prev);
        consider(top.pos);
    }
    for (int32_t pos = 0; pos >= 0; pos = symbols[pos].next) {
        out.push_back(symbols[pos].token);
    }
}
