// pybind11 entry point: each concern binds its part of the C API.
#include "bindings/bindings.h"

PYBIND11_MODULE(_core, m) {
    m.doc() = "pydeltamem native core (thin bindings over deltamem.h)";
    bind_model(m);
    bind_vocab(m);
    bind_sampling(m);
    bind_generate(m);
    bind_quantize(m);
    bind_devices(m);
}
