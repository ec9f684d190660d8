#include "bindings/bindings.h"

void bind_vocab(py::module_ & m) {}
