#include "common/tensor_check.h"

#include "common/error.h"

namespace dm {

static std::string dims_text(const int64_t * dims, int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s;
}

void check_shape(const ggml_tensor * t, const std::string & name, std::initializer_list<int64_t> shape,
                 const char * what) {
    int i = 0;
    bool ok = true;
    for (int64_t d : shape) ok = ok && t->ne[i++] == d;
    for (; i < GGML_MAX_DIMS; ++i) ok = ok && t->ne[i] == 1;
    if (!ok) {
        fail("%s '%s' has shape [%s], expected [%s]", what, name.c_str(), dims_text(t->ne, ggml_n_dims(t)).c_str(),
             dims_text(shape.begin(), static_cast<int>(shape.size())).c_str());
    }
}

} // namespace dm
