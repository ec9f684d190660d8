// ggml aborts the process when a remote (RPC) device fails mid-call: the server died, the network
// went. Inside engine calls such a failure becomes a dm::Error instead, so Python gets an
// exception; the device's buffers are then abandoned rather than freed (freeing would ask the dead
// server again).
#pragma once

#include <ggml-backend.h>

namespace dm {

// Installs the process-wide ggml abort hook (once; cheap to call again).
void install_device_failure_hook();

// While one lives on this thread, a ggml abort throws dm::Error instead of ending the process.
struct device_call_scope {
    device_call_scope();
    ~device_call_scope();
    device_call_scope(const device_call_scope &) = delete;
    device_call_scope & operator=(const device_call_scope &) = delete;
};

// Frees a buffer, or abandons it when its device no longer answers (never throws).
void free_buffer(ggml_backend_buffer_t buf) noexcept;

} // namespace dm
