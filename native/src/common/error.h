// Errors: the core throws dm::Error; the C API catches it at the boundary and stores the message.
#pragma once

#include "common/device_failure.h"

#include <cxxabi.h>

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

// The object a C entry point works on; throws dm::Error naming it when the caller passed NULL.
template <typename T>
T & deref(T * object, const char * what) {
    if (object == nullptr) fail("%s is NULL", what);
    return *object;
}

// Runs fn, converting any exception into the thread's last error and the given failure value.
template <typename T, typename Fn>
T guard(T on_failure, Fn && fn) {
    try {
        clear_last_error();
        device_call_scope devices;   // a remote device failing inside fn is an error of this call
        return fn();
    } catch (abi::__forced_unwind &) {
        throw;   // a thread being cancelled (pthread_exit, e.g. by Python's finalization) must unwind
    } catch (const std::exception & e) {
        set_last_error(e.what());
    } catch (...) {
        set_last_error("unknown native error");
    }
    return on_failure;
}

} // namespace dm
