#pragma once

#include <pybind11/pybind11.h>

#include <deltamem.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace py = pybind11;

// Native text as a Python str. Messages and metadata may quote bytes from a file or a path that are
// not UTF-8: they become U+FFFD, as bytes.decode(errors="replace") does, instead of a UnicodeDecodeError.
inline py::str native_text(const char * text, size_t len) {
    PyObject * s = PyUnicode_DecodeUTF8(text, static_cast<Py_ssize_t>(len), "replace");
    if (!s) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(s);
}
inline py::str native_text(const char * text) { return native_text(text, std::strlen(text)); }

// Raises the C API's last error as a Python ValueError (bad input) when ok is false.
inline void check(bool ok) {
    if (!ok) {
        PyErr_SetObject(PyExc_ValueError, native_text(dm_last_error()).ptr());
        throw py::error_already_set();
    }
}

// A Python int that must fit an int32_t argument of the C API; ValueError naming the argument
// otherwise (pybind's own conversion would reject it as "incompatible function arguments").
inline int32_t int32_arg(const py::handle & value, const char * name) {
    if (!PyIndex_Check(value.ptr()) || PyBool_Check(value.ptr())) {
        throw py::value_error(std::string(name) + " must be an int, got " + std::string(py::repr(value)));
    }
    const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
    if (!index) throw py::error_already_set();
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow != 0 || v < INT32_MIN || v > INT32_MAX) {
        throw py::value_error(std::string(name) + " = " + std::string(py::str(index)) + " is out of range (a 32-bit int)");
    }
    return static_cast<int32_t>(v);
}

void bind_model(py::module_ & m);
void bind_vocab(py::module_ & m);
void bind_sampling(py::module_ & m);
void bind_generate(py::module_ & m);
void bind_quantize(py::module_ & m);
void bind_devices(py::module_ & m);
