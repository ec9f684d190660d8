// Typed, checked access to GGUF metadata. gguf's own getters abort on a type mismatch; these throw
// dm::Error naming the key instead, so a malformed file becomes a Python exception.
#pragma once

#include <gguf.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dm {

std::optional<int64_t>     gguf_int   (const gguf_context * g, const std::string & key);
std::optional<double>      gguf_float (const gguf_context * g, const std::string & key);
std::optional<bool>        gguf_bool  (const gguf_context * g, const std::string & key);
std::optional<std::string> gguf_string(const gguf_context * g, const std::string & key);
std::optional<std::vector<int64_t>>     gguf_int_array(const gguf_context * g, const std::string & key);
std::optional<std::vector<std::string>> gguf_string_array(const gguf_context * g, const std::string & key);

// Required variants: throw "missing key" when absent.
int64_t     gguf_require_int   (const gguf_context * g, const std::string & key);
double      gguf_require_float (const gguf_context * g, const std::string & key);
std::string gguf_require_string(const gguf_context * g, const std::string & key);

// The value of key i rendered as text (JSON for short arrays, a "[type; n]" summary for long ones).
std::string gguf_value_text(const gguf_context * g, int64_t i);

} // namespace dm
