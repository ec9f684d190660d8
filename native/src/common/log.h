// ggml's log, filtered: by default only its warnings and errors reach stderr (ggml is chatty at
// debug/info level, e.g. one line per repacked tensor). DELTAMEM_LOG_LEVEL=debug|info|warn|error|none.
#pragma once

namespace dm {

// Installs the filter once per process; cheap to call again.
void install_ggml_log();

} // namespace dm
