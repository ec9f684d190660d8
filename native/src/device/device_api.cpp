// C API for devices: argument checks and exception-to-error translation only.
#include <deltamem.h>

#include "common/error.h"
#include "common/log.h"
#include "device/devices.h"

#include <string>

const char * dm_backends(void) {
    static const std::string names = [] {
        std::string out;
        for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
            out += (out.empty() ? "" : ", ") + std::string(ggml_backend_reg_name(ggml_backend_reg_get(i)));
        }
        return out;
    }();
    return names.c_str();
}

int32_t dm_device_count(void) {
    return dm::guard<int32_t>(-1, [] { return static_cast<int32_t>(ggml_backend_dev_count()); });
}

int32_t dm_device_get(int32_t i, dm_device_info * out) {
    return dm::guard<int32_t>(-1, [&] {
        dm::deref(out, "device info");
        if (i < 0 || static_cast<size_t>(i) >= ggml_backend_dev_count()) {
            dm::fail("device %d is outside [0, %zu)", i, ggml_backend_dev_count());
        }
        ggml_backend_dev_t dev = ggml_backend_dev_get(static_cast<size_t>(i));
        out->name = ggml_backend_dev_name(dev);
        out->description = ggml_backend_dev_description(dev);
        out->type = dm_device_type_name(ggml_backend_dev_type(dev));
        ggml_backend_dev_memory(dev, &out->free, &out->total);
        return 0;
    });
}

int32_t dm_rpc_add_servers(const char * servers) {
    return dm::guard<int32_t>(-1, [&] {
        dm::install_ggml_log();
        if (!servers) dm::fail("servers is NULL");
        dm_add_rpc_servers(servers);
        return 0;
    });
}

int32_t dm_rpc_serve(const char * endpoint, int32_t n_threads) {
    return dm::guard<int32_t>(-1, [&] {
        dm::install_ggml_log();
        if (!endpoint) dm::fail("endpoint is NULL");
        dm_serve_devices(endpoint, n_threads);
        return 0;
    });
}
