#include "common/device_failure.h"

#include "common/error.h"

#include <ggml.h>

#include <cstdio>
#include <mutex>
#include <string>

namespace dm {

namespace {

thread_local int t_scopes = 0;

// Called by ggml_abort, which calls abort() when this returns: in a scope it does not return.
void on_ggml_abort(const char * message) {
    if (t_scopes > 0) throw Error(std::string("device failure: ") + message);
    std::fprintf(stderr, "%s\n", message);
}

} // namespace

void install_device_failure_hook() {
    static std::once_flag once;
    std::call_once(once, [] { ggml_set_abort_callback(on_ggml_abort); });
}

device_call_scope::device_call_scope() {
    install_device_failure_hook();
    ++t_scopes;
}

device_call_scope::~device_call_scope() { --t_scopes; }

void free_buffer(ggml_backend_buffer_t buf) noexcept {
    if (!buf) return;
    try {
        device_call_scope scope;
        ggml_backend_buffer_free(buf);
    } catch (...) {
        // the device is gone, and its memory with it; the host-side handle is left behind
    }
}

} // namespace dm
