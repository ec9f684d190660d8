#pragma once

#include <pybind11/pybind11.h>

#include <deltamem.h>

#include <stdexcept>

namespace py = pybind11;

// Raises the C API's last error as a Python ValueError (bad input) when cond is false.
inline void check(bool ok) {
    if (!ok) {
        throw py::value_error(dm_last_error());
    }
}

void bind_model(py::module_ & m);
void bind_vocab(py::module_ & m);
void bind_sampling(py::module_ & m);
void bind_generate(py::module_ & m);
void bind_quantize(py::module_ & m);
