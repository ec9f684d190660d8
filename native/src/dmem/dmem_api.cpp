// C API for δ-mem: the adapter's description and a context's memory.
#include <deltamem.h>

#include "common/error.h"
#include "context/context.h"
#include "model/model.h"

#include <cstdint>
#include <string>

namespace {

// Length of the valid UTF-8 sequence at s[i] (1 to 4), or 0 when the bytes there are not one
// (overlong forms and surrogates included: Python's strict decoder refuses them).
size_t utf8_length(const std::string & s, size_t i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (n == 0 || i + n > s.size()) return 0;
    uint32_t cp = n == 1 ? c : c & (0x3fu >> (n - 1));
    for (size_t k = 1; k < n; ++k) {
        const unsigned char b = static_cast<unsigned char>(s[i + k]);
        if ((b & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (b & 0x3fu);
    }
    static const uint32_t k_min[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < k_min[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return n;
}

// A JSON string literal: quotes, backslashes and control characters escaped; bytes that are not
// UTF-8 (a path may hold any) become U+FFFD, so the text always parses.
std::string json_string(const std::string & text) {
    std::string out = "\"";
    for (size_t i = 0; i < text.size();) {
        const size_t n = utf8_length(text, i);
        const unsigned char c = static_cast<unsigned char>(text[i]);
        if (n == 0) {
            out += "\\ufffd";
            i += 1;
            continue;
        }
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c < 0x20) {
            out += dm::format("\\u%04x", static_cast<unsigned>(c));
        } else {
            out.append(text, i, n);
        }
        i += n;
    }
    return out + "\"";
}

std::string json_list(const std::vector<std::string> & items) {
    std::string s = "[";
    for (size_t i = 0; i < items.size(); ++i) s += (i ? ", " : "") + json_string(items[i]);
    return s + "]";
}

const char * mode_name(dm_update_mode m) {
    switch (m) {
        case dm_update_mode::standard: return "standard";
        case dm_update_mode::lambda_outside: return "lambda_outside";
        case dm_update_mode::no_lambda: return "no_lambda";
    }
    return "?";
}

const char * granularity_name(dm_write_granularity g) {
    switch (g) {
        case dm_write_granularity::token: return "token";
        case dm_write_granularity::message_mean: return "message_mean";
        case dm_write_granularity::sentence_mean: return "sentence_mean";
    }
    return "?";
}

std::string adapter_json(const dm_adapter & a) {
    const dm_dmem_config & c = a.cfg;
    std::string layers = "[";
    for (size_t i = 0; i < a.layers.size(); ++i) layers += (i ? ", " : "") + std::to_string(a.layers[i].il);
    layers += "]";
    return dm::format(
        "{\"rank\": %d, \"num_state_heads\": %d, \"rankwise_gates\": %s, \"update_mode\": \"%s\", "
        "\"couple_lambda\": %s, \"normalize_qk\": %s, \"write_granularity\": \"%s\", \"delta_heads\": %s, "
        "\"target_layers\": %s, \"delta_o_rmsnorm\": %s, \"fingerprint\": %s, \"source\": %s}",
        c.rank, c.n_heads, c.gate_width == c.width() ? "true" : "false", mode_name(c.update_mode),
        c.couple_lambda ? "true" : "false", c.normalize_qk ? "true" : "false", granularity_name(c.granularity),
        json_list(a.delta_heads).c_str(), layers.c_str(), c.delta_o_rmsnorm ? "true" : "false",
        json_string(a.fingerprint).c_str(), json_string(a.source).c_str());
}

} // namespace

const char * dm_model_adapter_info(const dm_model * model) {
    return dm::guard<const char *>(nullptr, [&]() -> const char * {
        const dm_model & m = dm::deref(model, "model");
        if (!m.adapter) return nullptr;
        static thread_local std::string info;
        info = adapter_json(*m.adapter);
        return info.c_str();
    });
}

static const dm_memory & memory_of(const dm_context * ctx) { return dm::deref(ctx, "context").memory; }

int64_t dm_memory_size(const dm_context * ctx) {
    return dm::guard<int64_t>(-1, [&] { return static_cast<int64_t>(memory_of(ctx).n_floats()); });
}

// Checks that a caller's buffer of n floats fits the memory of ctx.
static void check_memory_buffer(const dm_context * ctx, const void * buf, int64_t n) {
    const auto need = static_cast<int64_t>(memory_of(ctx).n_floats());
    if (n != need) dm::fail("memory has %lld floats, buffer holds %lld", static_cast<long long>(need), static_cast<long long>(n));
    if (n > 0 && !buf) dm::fail("memory buffer is NULL");
}

int32_t dm_memory_get(const dm_context * ctx, float * out, int64_t n) {
    return dm::guard<int32_t>(-1, [&] {
        check_memory_buffer(ctx, out, n);
        ctx->memory.get(out);
        return 0;
    });
}

int32_t dm_memory_set(dm_context * ctx, const float * in, int64_t n) {
    return dm::guard<int32_t>(-1, [&] {
        if (!dm::deref(ctx, "context").model->adapter) dm::fail("the model has no δ-mem adapter");
        check_memory_buffer(ctx, in, n);
        ctx->memory.set(in);
        return 0;
    });
}

void dm_memory_reset(dm_context * ctx) {
    dm::guard<int32_t>(-1, [&] {
        dm::deref(ctx, "context").memory.clear();
        return 0;
    });
}
