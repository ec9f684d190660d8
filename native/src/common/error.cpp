#include "common/error.h"

#include <cstdio>
#include <vector>

namespace dm {

static thread_local std::string g_last_error;

static std::string vformat(const char * fmt, va_list args) {
    va_list copy;
    va_copy(copy, args);
    const int n = std::vsnprintf(nullptr, 0, fmt, copy);
    va_end(copy);
    if (n <= 0) {
        return std::string();
    }
    std::vector<char> buf(static_cast<size_t>(n) + 1);
    std::vsnprintf(buf.data(), buf.size(), fmt, args);
    return std::string(buf.data(), static_cast<size_t>(n));
}

std::string format(const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::string s = vformat(fmt, args);
    va_end(args);
    return s;
}

void fail(const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::string s = vformat(fmt, args);
    va_end(args);
    throw Error(s);
}

void set_last_error(const std::string & message) { g_last_error = message; }
const char * last_error() { return g_last_error.c_str(); }
void clear_last_error() { g_last_error.clear(); }

} // namespace dm
