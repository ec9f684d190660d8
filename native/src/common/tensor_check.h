// Shape checks shared by the model and adapter loaders.
#pragma once

#include <ggml.h>

#include <initializer_list>
#include <string>

namespace dm {

// Throws dm::Error "<what> '<name>' has shape [..], expected [..]" unless t has exactly this shape.
void check_shape(const ggml_tensor * t, const std::string & name, std::initializer_list<int64_t> shape,
                 const char * what);

} // namespace dm
