// C API of the tokenizer (deltamem.h, "vocab" section): argument checks and buffer conventions;
// the work is in dm_vocab.
#include <deltamem.h>

#include "common/error.h"
#include "model/model.h"
#include "vocab/unicode.h"
#include "vocab/vocab.h"

#include <climits>
#include <cstring>
#include <string>
#include <vector>

struct dm_utf8_decoder {
    dm::unicode::utf8_stream stream;
};

namespace {

const dm_vocab & vocab_of(const dm_model * model) {
    if (model == nullptr) {
        dm::fail("model is NULL");
    }
    return model->vocab;
}

void check_buffer(const void * buf, int32_t size, const char * what) {
    if (size < 0) {
        dm::fail("%s: negative buffer size %d", what, size);
    }
    if (buf == nullptr && size > 0) {
        dm::fail("%s: buffer is NULL", what);
    }
}

int32_t checked_length(size_t n) {
    if (n > static_cast<size_t>(INT32_MAX)) {
        dm::fail("result too large (%zu)", n);
    }
    return static_cast<int32_t>(n);
}

// Copies bytes into buf when they fit; returns their length, or -length when they do not.
int32_t copy_out(const std::string & bytes, char * buf, int32_t size) {
    const int32_t n = checked_length(bytes.size());
    if (n > size) {
        return -n;
    }
    if (n > 0) {
        std::memcpy(buf, bytes.data(), bytes.size());
    }
    return n;
}

} // namespace

extern "C" {

int32_t dm_tokenize(const dm_model * model, const char * text, int32_t len, dm_token * out, int32_t n_max,
                    bool add_special, bool parse_special) {
    return dm::guard<int32_t>(INT32_MIN, [&]() -> int32_t {
        const dm_vocab & vocab = vocab_of(model);
        if (len < 0) {
            dm::fail("dm_tokenize: negative text length %d", len);
        }
        if (text == nullptr && len > 0) {
            dm::fail("dm_tokenize: text is NULL");
        }
        check_buffer(out, n_max, "dm_tokenize");
        const std::vector<int32_t> ids =
            vocab.tokenize(text ? text : "", static_cast<size_t>(len), add_special, parse_special);
        const int32_t n = checked_length(ids.size());
        if (n > n_max) {
            return -n;
        }
        if (n > 0) {
            std::memcpy(out, ids.data(), ids.size() * sizeof(dm_token));
        }
        return n;
    });
}

int32_t dm_token_to_piece(const dm_model * model, dm_token token, char * buf, int32_t size, bool special) {
    return dm::guard<int32_t>(INT32_MIN, [&]() -> int32_t {
        const dm_vocab & vocab = vocab_of(model);
        check_buffer(buf, size, "dm_token_to_piece");
        return copy_out(vocab.token_to_piece(token, special), buf, size);
    });
}

int32_t dm_detokenize(const dm_model * model, const dm_token * tokens, int32_t n_tokens, char * buf,
                      int32_t size, bool special) {
    return dm::guard<int32_t>(INT32_MIN, [&]() -> int32_t {
        const dm_vocab & vocab = vocab_of(model);
        if (n_tokens < 0 || (tokens == nullptr && n_tokens > 0)) {
            dm::fail("dm_detokenize: bad token array (n_tokens = %d)", n_tokens);
        }
        check_buffer(buf, size, "dm_detokenize");
        return copy_out(vocab.detokenize(tokens, static_cast<size_t>(n_tokens), special), buf, size);
    });
}

dm_token dm_token_bos(const dm_model * model) {
    return dm::guard<dm_token>(-1, [&] { return vocab_of(model).token_bos(); });
}

dm_token dm_token_eos(const dm_model * model) {
    return dm::guard<dm_token>(-1, [&] { return vocab_of(model).token_eos(); });
}

dm_token dm_token_eot(const dm_model * model) {
    return dm::guard<dm_token>(-1, [&] { return vocab_of(model).token_eot(); });
}

bool dm_token_is_eog(const dm_model * model, dm_token token) {
    return dm::guard<bool>(false, [&] { return vocab_of(model).is_eog(token); });
}

bool dm_token_is_control(const dm_model * model, dm_token token) {
    return dm::guard<bool>(false, [&] { return vocab_of(model).is_control(token); });
}

const char * dm_token_get_text(const dm_model * model, dm_token token) {
    return dm::guard<const char *>(nullptr, [&]() -> const char * {
        const dm_vocab & vocab = vocab_of(model);
        vocab.token_type(token);   // range check
        return vocab.tokens[static_cast<size_t>(token)].c_str();
    });
}

dm_utf8_decoder * dm_utf8_decoder_new(void) {
    return dm::guard<dm_utf8_decoder *>(nullptr, [] { return new dm_utf8_decoder(); });
}

void dm_utf8_decoder_free(dm_utf8_decoder * dec) {
    delete dec;
}

int32_t dm_utf8_decoder_feed(dm_utf8_decoder * dec, const char * bytes, int32_t len, char * out, int32_t size) {
    return dm::guard<int32_t>(INT32_MIN, [&]() -> int32_t {
        if (dec == nullptr) {
            dm::fail("dm_utf8_decoder_feed: decoder is NULL");
        }
        if (len < 0 || (bytes == nullptr && len > 0)) {
            dm::fail("dm_utf8_decoder_feed: bad input (len = %d)", len);
        }
        check_buffer(out, size, "dm_utf8_decoder_feed");
        const dm::unicode::utf8_stream before = dec->stream;
        std::string text;
        dec->stream.feed(bytes, static_cast<size_t>(len), text);
        const int32_t n = copy_out(text, out, size);
        if (n < 0) {
            dec->stream = before;   // nothing consumed: the caller retries with a larger buffer
        }
        return n;
    });
}

int32_t dm_utf8_decoder_flush(dm_utf8_decoder * dec, char * out, int32_t size) {
    return dm::guard<int32_t>(INT32_MIN, [&]() -> int32_t {
        if (dec == nullptr) {
            dm::fail("dm_utf8_decoder_flush: decoder is NULL");
        }
        check_buffer(out, size, "dm_utf8_decoder_flush");
        const dm::unicode::utf8_stream before = dec->stream;
        std::string text;
        dec->stream.finish(text);
        const int32_t n = copy_out(text, out, size);
        if (n < 0) {
            dec->stream = before;
        }
        return n;
    });
}

} // extern "C"
