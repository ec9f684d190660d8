// Python binding of the quantization section of deltamem.h: numpy rows in, quantized bytes out.
#include "bindings/bindings.h"

#include <pybind11/numpy.h>

#include <cstdint>

namespace {

using float_rows = py::array_t<float, py::array::c_style | py::array::forcecast>;

// Quantizes a 2-D float32 array (rows of values) and returns uint8 [n_rows, row_bytes].
py::array_t<uint8_t> quantize_rows(int32_t type, const float_rows & values, int32_t n_threads) {
    if (values.ndim() != 2) {
        throw py::value_error("quantize_rows expects a 2-D array [n_rows, n_per_row]");
    }
    const int64_t n_rows = values.shape(0);
    const int64_t n_per_row = values.shape(1);
    const int64_t row_bytes = dm_quant_row_size(type, n_per_row);
    if (row_bytes < 0) {
        // Let the C API word the error (unknown type or misfit row length).
        check(dm_quantize_rows(type, nullptr, 0, n_per_row, nullptr, 0, 1) >= 0);
        throw py::value_error("bad quantization arguments");
    }
    py::array_t<uint8_t> out({static_cast<py::ssize_t>(n_rows), static_cast<py::ssize_t>(row_bytes)});
    const float * src = values.data();
    void * dst = out.mutable_data();
    const auto dst_size = static_cast<size_t>(n_rows) * static_cast<size_t>(row_bytes);
    int64_t written = 0;
    {
        py::gil_scoped_release release;
        written = dm_quantize_rows(type, src, n_rows, n_per_row, dst, dst_size, n_threads);
    }
    check(written >= 0);
    return out;
}

// y [n, rows] = x [n, n_per_row] · Wᵀ by the engine's quantised mat-mul kernel, W as quantize_rows returns it.
py::array_t<float> quant_matmul(int32_t type, const py::array_t<uint8_t, py::array::c_style> & w, int64_t rows,
                                const float_rows & x) {
    if (x.ndim() != 2) throw py::value_error("quant_matmul expects x as a 2-D array [n, n_per_row]");
    const int64_t n = x.shape(0), n_per_row = x.shape(1);
    py::array_t<float> y({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(rows > 0 ? rows : 0)});
    int32_t rc = 0;
    {
        py::gil_scoped_release release;
        rc = dm_quant_matmul(type, w.data(), static_cast<size_t>(w.nbytes()), rows, n_per_row, x.data(), n,
                             y.mutable_data());
    }
    check(rc == 0);
    return y;
}

py::object matmul_kernel() {
    const char * name = dm_quant_matmul_kernel();
    return name == nullptr ? py::object(py::none()) : py::object(py::str(name));
}

py::object type_name(int32_t type) {
    const char * name = dm_quant_type_name(type);
    return name == nullptr ? py::object(py::none()) : py::object(py::str(name));
}

} // namespace

void bind_quantize(py::module_ & m) {
    m.def("quantize_rows", &quantize_rows, py::arg("type"), py::arg("values"), py::arg("n_threads") = 1,
          "Quantize float32 rows [n_rows, n_per_row] with ggml; returns uint8 [n_rows, row_bytes].");
    m.def("quant_matmul", &quant_matmul, py::arg("type"), py::arg("w"), py::arg("rows"), py::arg("x"),
          "y [n, rows] = x [n, n_per_row] · Wᵀ by the engine's quantised CPU mat-mul (W: quantize_rows' bytes).");
    m.def("quant_matmul_kernel", &matmul_kernel, "The quantised mat-mul kernel: 'avx512-vnni', 'avx2' or None.");
    m.def("quant_type_known", &dm_quant_type_known, py::arg("type"));
    m.def("quant_type_is_target", &dm_quant_type_is_target, py::arg("type"));
    m.def("quant_type_name", &type_name, py::arg("type"));
    m.def("quant_block_size", &dm_quant_block_size, py::arg("type"));
    m.def("quant_row_size", &dm_quant_row_size, py::arg("type"), py::arg("n_per_row"));
    m.def("quant_requires_imatrix", &dm_quant_requires_imatrix, py::arg("type"));
}
