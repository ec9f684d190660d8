// Errors: the core throws dm::Error; the C API catches it at the boundary and stores the message.
#pragma once

#include <cstdarg>
#include <stdexcept>
#include <string>

namespace dm {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Throws dm::Error with a printf-formatted message.
[[noreturn]] void fail(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

std::string format(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

void set_last_error(const std::string & message);
const char * last_error();
void clear_last_error();

// Runs fn, converting any exception into the thread's last error and the given failure value.
template <typename T, typename Fn>
T guard(T on_failure, Fn && fn) {
    try {
        clear_last_error();
        return fn();
    } catch (const std::exception & e) {
        set_last_error(e.what());
    } catch (...) {
        set_last_error("unknown native error");
    }
    return on_failure;
}

} // namespace dm
