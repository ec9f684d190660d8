// C API of what every module shares: the thread's last error and what the ggml CPU backend offers.
#include <deltamem.h>

#include "common/error.h"

#include <ggml-backend.h>
#include <ggml-cpu.h>

#include <string>

const char * dm_last_error(void) { return dm::last_error(); }

static std::string cpu_backend_features() {
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    auto get_features = reinterpret_cast<ggml_backend_get_features_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features"));
    std::string info;
    for (const ggml_backend_feature * f = get_features ? get_features(reg) : nullptr; f && f->name; ++f) {
        info += (info.empty() ? "" : " | ") + std::string(f->name) + " = " + f->value;
    }
    return info;
}

const char * dm_system_info(void) {
    static const std::string info = cpu_backend_features();
    return info.c_str();
}
