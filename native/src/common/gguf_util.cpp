#include "common/gguf_util.h"

#include "common/error.h"

#include <cstdio>

namespace dm {

static bool is_int_type(gguf_type t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16:
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64:
            return true;
        default:
            return false;
    }
}

// Reads element i of a buffer of integers of gguf type t.
static int64_t int_at(gguf_type t, const void * data, size_t i) {
    switch (t) {
        case GGUF_TYPE_UINT8:  return static_cast<const uint8_t  *>(data)[i];
        case GGUF_TYPE_INT8:   return static_cast<const int8_t   *>(data)[i];
        case GGUF_TYPE_UINT16: return static_cast<const uint16_t *>(data)[i];
        case GGUF_TYPE_INT16:  return static_cast<const int16_t  *>(data)[i];
        case GGUF_TYPE_UINT32: return static_cast<const uint32_t *>(data)[i];
        case GGUF_TYPE_INT32:  return static_cast<const int32_t  *>(data)[i];
        case GGUF_TYPE_UINT64: return static_cast<int64_t>(static_cast<const uint64_t *>(data)[i]);
        case GGUF_TYPE_INT64:  return static_cast<const int64_t  *>(data)[i];
        case GGUF_TYPE_BOOL:   return static_cast<const int8_t   *>(data)[i] != 0;
        default:               fail("internal: not an integer gguf type");
    }
}

static double float_at(gguf_type t, const void * data, size_t i) {
    if (t == GGUF_TYPE_FLOAT32) return static_cast<const float *>(data)[i];
    if (t == GGUF_TYPE_FLOAT64) return static_cast<const double *>(data)[i];
    return static_cast<double>(int_at(t, data, i));
}

static int64_t find(const gguf_context * g, const std::string & key) { return gguf_find_key(g, key.c_str()); }

[[noreturn]] static void wrong_type(const gguf_context * g, const std::string & key, int64_t id, const char * want) {
    fail("GGUF key '%s' has type %s, expected %s", key.c_str(), gguf_type_name(gguf_get_kv_type(g, id)), want);
}

std::optional<int64_t> gguf_int(const gguf_context * g, const std::string & key) {
    const int64_t id = find(g, key);
    if (id < 0) return std::nullopt;
    const gguf_type t = gguf_get_kv_type(g, id);
    if (!is_int_type(t)) wrong_type(g, key, id, "an integer");
    return int_at(t, gguf_get_val_data(g, id), 0);
}

std::optional<double> gguf_float(const gguf_context * g, const std::string & key) {
    const int64_t id = find(g, key);
    if (id < 0) return std::nullopt;
    const gguf_type t = gguf_get_kv_type(g, id);
    if (t != GGUF_TYPE_FLOAT32 && t != GGUF_TYPE_FLOAT64 && !is_int_type(t)) wrong_type(g, key, id, "a number");
    return float_at(t, gguf_get_val_data(g, id), 0);
}

std::optional<bool> gguf_bool(const gguf_context * g, const std::string & key) {
    const int64_t id = find(g, key);
    if (id < 0) return std::nullopt;
    const gguf_type t = gguf_get_kv_type(g, id);
    if (t == GGUF_TYPE_BOOL) return gguf_get_val_bool(g, id);
    if (is_int_type(t)) return int_at(t, gguf_get_val_data(g, id), 0) != 0;
    wrong_type(g, key, id, "a bool");
}

std::optional<std::string> gguf_string(const gguf_context * g, const std::string & key) {
    const int64_t id = find(g, key);
    if (id < 0) return std::nullopt;
    if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) wrong_type(g, key, id, "a string");
    return std::string(gguf_get_val_str(g, id));
}

std::optional<std::vector<int64_t>> gguf_int_array(const gguf_context * g, const std::string & key) {
    const int64_t id = find(g, key);
    if (id < 0) return std::nullopt;
    if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY) wrong_type(g, key, id, "an array of integers");
    const gguf_type t = gguf_get_arr_type(g, id);
    if (!is_int_type(t) && t != GGUF_TYPE_BOOL) {
        fail("GGUF key '%s' is an array of %s, expected integers", key.c_str(), gguf_type_name(t));
    }
    const size_t n = gguf_get_arr_n(g, id);
    std::vector<int64_t> out(n);
    const void * data = n ? gguf_get_arr_data(g, id) : nullptr;
    for (size_t i = 0; i < n; ++i) out[i] = int_at(t, data, i);
    return out;
}

std::optional<std::vector<std::string>> gguf_string_array(const gguf_context * g, const std::string & key) {
    const int64_t id = find(g, key);
    if (id < 0) return std::nullopt;
    if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, id) != GGUF_TYPE_STRING) {
        fail("GGUF key '%s' must be an array of strings", key.c_str());
    }
    const size_t n = gguf_get_arr_n(g, id);
    std::vector<std::string> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = gguf_get_arr_str(g, id, i);
    return out;
}

int64_t gguf_require_int(const gguf_context * g, const std::string & key) {
    auto v = gguf_int(g, key);
    if (!v) fail("GGUF is missing required key '%s'", key.c_str());
    return *v;
}

double gguf_require_float(const gguf_context * g, const std::string & key) {
    auto v = gguf_float(g, key);
    if (!v) fail("GGUF is missing required key '%s'", key.c_str());
    return *v;
}

std::string gguf_require_string(const gguf_context * g, const std::string & key) {
    auto v = gguf_string(g, key);
    if (!v) fail("GGUF is missing required key '%s'", key.c_str());
    return *v;
}

static std::string json_quote(const std::string & s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"':  out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof(buf), "\\u%04x", c);
                    out += buf;
                } else {
                    out += static_cast<char>(c);
                }
        }
    }
    return out + "\"";
}

static std::string number_text(gguf_type t, const void * data, size_t i) {
    if (t == GGUF_TYPE_BOOL) return static_cast<const int8_t *>(data)[i] ? "true" : "false";
    if (t == GGUF_TYPE_FLOAT32 || t == GGUF_TYPE_FLOAT64) return format("%.9g", float_at(t, data, i));
    if (t == GGUF_TYPE_UINT64) return format("%llu", static_cast<unsigned long long>(static_cast<const uint64_t *>(data)[i]));
    return format("%lld", static_cast<long long>(int_at(t, data, i)));
}

std::string gguf_value_text(const gguf_context * g, int64_t id) {
    constexpr size_t max_rendered = 16;   // longer arrays (vocabularies, merges) are only summarised
    const gguf_type t = gguf_get_kv_type(g, id);
    if (t == GGUF_TYPE_STRING) return gguf_get_val_str(g, id);
    if (t != GGUF_TYPE_ARRAY) return number_text(t, gguf_get_val_data(g, id), 0);

    const gguf_type et = gguf_get_arr_type(g, id);
    const size_t n = gguf_get_arr_n(g, id);
    if (n > max_rendered || et == GGUF_TYPE_ARRAY) {
        return format("[%s; %zu]", gguf_type_name(et), n);
    }
    std::string out = "[";
    for (size_t i = 0; i < n; ++i) {
        if (i) out += ", ";
        out += et == GGUF_TYPE_STRING ? json_quote(gguf_get_arr_str(g, id, i))
                                      : number_text(et, gguf_get_arr_data(g, id), i);
    }
    return out + "]";
}

} // namespace dm
