// Python binding of the tokenizer (deltamem.h, vocab section). Functions take the _core.Model
// handle and run under a shared use of it; the Python Model class wraps them.
#include "bindings/handles.h"

#include <pybind11/stl.h>

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

namespace {

void check_result(int32_t rc) {
    check(rc != INT32_MIN);
}

std::vector<dm_token> tokenize(ModelHandle & model, const std::string & text, bool add_special, bool parse_special) {
    if (text.size() > static_cast<size_t>(INT32_MAX) - 2) {
        throw py::value_error("text too long to tokenize (over 2 GiB)");
    }
    const auto len = static_cast<int32_t>(text.size());
    std::vector<dm_token> ids(text.size() + 2);   // each token covers at least one byte, plus BOS/EOS
    ModelHandle::use u(model);
    int32_t n = 0;
    {
        py::gil_scoped_release release;
        n = dm_tokenize(u.object, text.data(), len, ids.data(), static_cast<int32_t>(ids.size()), add_special,
                        parse_special);
        if (n < 0 && n != INT32_MIN) {
            ids.resize(static_cast<size_t>(-n));
            n = dm_tokenize(u.object, text.data(), len, ids.data(), -n, add_special, parse_special);
        }
    }
    check_result(n);
    ids.resize(static_cast<size_t>(n));
    return ids;
}

// Calls fill(buf, size) until the bytes fit (fill returns the length or -needed).
template <typename Fill>
py::bytes read_bytes(Fill fill) {
    std::string buf(64, '\0');
    int32_t n = fill(buf.data(), static_cast<int32_t>(buf.size()));
    if (n < 0 && n != INT32_MIN) {
        buf.resize(static_cast<size_t>(-n));
        n = fill(buf.data(), -n);
    }
    check_result(n);
    buf.resize(static_cast<size_t>(n));
    return py::bytes(buf);
}

py::bytes token_to_piece(ModelHandle & model, const py::handle & token, bool special) {
    const dm_token id = int32_arg(token, "token");
    ModelHandle::use u(model);
    return read_bytes([&](char * buf, int32_t size) { return dm_token_to_piece(u.object, id, buf, size, special); });
}

py::bytes detokenize(ModelHandle & model, const std::vector<dm_token> & ids, bool special) {
    if (ids.size() > static_cast<size_t>(INT32_MAX)) {
        throw py::value_error("too many tokens");
    }
    ModelHandle::use u(model);
    return read_bytes([&](char * buf, int32_t size) {
        return dm_detokenize(u.object, ids.data(), static_cast<int32_t>(ids.size()), buf, size, special);
    });
}

// A fact about one token of an open model (a shared use), the id checked to fit dm_token.
template <typename Get>
auto token_fact(Get get) {
    return [get](ModelHandle & model, const py::handle & token) {
        const dm_token id = int32_arg(token, "token");
        ModelHandle::use u(model);
        return get(u.object, id);
    };
}

// Owns a dm_utf8_decoder: feed(bytes) -> str releases complete characters only.
class StreamDecoder {
public:
    StreamDecoder() : dec(dm_utf8_decoder_new()) { check(dec != nullptr); }
    ~StreamDecoder() { dm_utf8_decoder_free(dec); }
    StreamDecoder(const StreamDecoder &) = delete;
    StreamDecoder & operator=(const StreamDecoder &) = delete;

    py::str feed(const std::string & bytes) {
        if (bytes.size() > static_cast<size_t>(INT32_MAX) / 4) {
            throw py::value_error("chunk too large");
        }
        const auto len = static_cast<int32_t>(bytes.size());
        std::string out(3 * (bytes.size() + 3), '\0');   // enough for any input (see deltamem.h)
        const int32_t n = dm_utf8_decoder_feed(dec, bytes.data(), len, out.data(), static_cast<int32_t>(out.size()));
        check(n >= 0);
        out.resize(static_cast<size_t>(n));
        return py::str(out);
    }

    py::str flush() {
        char out[8];
        const int32_t n = dm_utf8_decoder_flush(dec, out, static_cast<int32_t>(sizeof(out)));
        check(n >= 0);
        return py::str(out, static_cast<size_t>(n));
    }

private:
    dm_utf8_decoder * dec;
};

} // namespace

void bind_vocab(py::module_ & m) {
    m.def("tokenize", &tokenize, py::arg("model"), py::arg("text"), py::arg("add_special") = true,
          py::arg("parse_special") = false,
          "Token ids of text (bytes, or str as UTF-8); raises ValueError on error.");
    m.def("token_to_piece", &token_to_piece, py::arg("model"), py::arg("token"), py::arg("special") = false,
          "Bytes of one token; control tokens are empty unless special.");
    m.def("detokenize", &detokenize, py::arg("model"), py::arg("ids"), py::arg("special") = false,
          "Bytes of a token sequence.");
    m.def("token_bos", with_model(dm_token_bos), py::arg("model"));
    m.def("token_eos", with_model(dm_token_eos), py::arg("model"));
    m.def("token_eot", with_model(dm_token_eot), py::arg("model"));
    m.def("token_is_eog", token_fact(dm_token_is_eog), py::arg("model"), py::arg("token"));
    m.def("token_is_control", token_fact(dm_token_is_control), py::arg("model"), py::arg("token"));
    m.def("token_get_text", token_fact([](const dm_model * model, dm_token token) {
              const char * text = dm_token_get_text(model, token);
              check(text != nullptr);
              return py::bytes(text);
          }), py::arg("model"), py::arg("token"),
          "Token text as stored in the GGUF (byte-level form for ordinary tokens).");

    py::class_<StreamDecoder>(m, "StreamDecoder",
                              "Incremental UTF-8 decoder: never emits half a character; ill-formed "
                              "bytes become U+FFFD as with bytes.decode(errors='replace').")
        .def(py::init<>())
        .def("feed", &StreamDecoder::feed, py::arg("data"))
        .def("flush", &StreamDecoder::flush);
}
