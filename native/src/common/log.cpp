#include "common/log.h"

#include <ggml.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace dm {

namespace {

ggml_log_level threshold_from_env() {
    const char * s = std::getenv("DELTAMEM_LOG_LEVEL");
    if (!s) return GGML_LOG_LEVEL_WARN;
    if (std::strcmp(s, "debug") == 0) return GGML_LOG_LEVEL_DEBUG;
    if (std::strcmp(s, "info") == 0) return GGML_LOG_LEVEL_INFO;
    if (std::strcmp(s, "error") == 0) return GGML_LOG_LEVEL_ERROR;
    if (std::strcmp(s, "none") == 0) return GGML_LOG_LEVEL_CONT;   // above every real level: nothing passes
    return GGML_LOG_LEVEL_WARN;
}

ggml_log_level g_threshold = GGML_LOG_LEVEL_WARN;
thread_local bool g_last_shown = false;   // a CONT line follows the fate of the line it continues

void filtered_log(ggml_log_level level, const char * text, void *) {
    const bool show = level == GGML_LOG_LEVEL_CONT ? g_last_shown : level >= g_threshold;
    g_last_shown = show;
    if (show) {
        std::fputs(text, stderr);
        std::fflush(stderr);
    }
}

} // namespace

void install_ggml_log() {
    static std::once_flag once;
    std::call_once(once, [] {
        g_threshold = threshold_from_env();
        ggml_log_set(filtered_log, nullptr);
    });
}

} // namespace dm
