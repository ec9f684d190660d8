// Quantization: a thin, validating wrapper around ggml's own quantizers (ggml_quantize_chunk).
// ggml asserts (and aborts the process) on bad arguments, so every argument is checked here
// first; the mix rules (which tensor gets which type) live in Python (pydeltamem/quantize.py).
#include "deltamem.h"

#include "common/error.h"

#include <ggml.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace {

// The types a GGUF weight may be quantized to without an importance matrix, restricted to the
// ones ggml_quantize_chunk handles (it aborts on the others, e.g. Q8_1 and Q8_K).
bool is_quantize_target(ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:  case GGML_TYPE_F16:  case GGML_TYPE_BF16:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1: case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
        case GGML_TYPE_IQ4_NL: case GGML_TYPE_IQ4_XS:
            return true;
        default:
            return false;
    }
}

bool is_known_type(int32_t type) {
    if (type < 0 || type >= GGML_TYPE_COUNT) {
        return false;
    }
    // Removed types keep their number but have no traits (block size 0).
    return ggml_blck_size(static_cast<ggml_type>(type)) > 0;
}

ggml_type checked_target(int32_t type) {
    if (!is_known_type(type) || !is_quantize_target(static_cast<ggml_type>(type))) {
        dm::fail("ggml type %d cannot be a quantization target", type);
    }
    const auto t = static_cast<ggml_type>(type);
    if (ggml_quantize_requires_imatrix(t)) {
        dm::fail("type %s needs an importance matrix, which is not supported", ggml_type_name(t));
    }
    return t;
}

void check_shape(ggml_type type, int64_t n_rows, int64_t n_per_row) {
    if (n_rows < 0 || n_per_row <= 0) {
        dm::fail("bad shape: %lld rows of %lld values", static_cast<long long>(n_rows), static_cast<long long>(n_per_row));
    }
    if (n_per_row % ggml_blck_size(type) != 0) {
        dm::fail("row length %lld is not a multiple of %s's block size %lld", static_cast<long long>(n_per_row),
                 ggml_type_name(type), static_cast<long long>(ggml_blck_size(type)));
    }
}

// Non-finite inputs make some quantizers loop or write NaN scales that fail ggml's row
// validation at load time; refuse them up front with the position that is wrong.
void check_finite(const float * src, int64_t n_values) {
    for (int64_t i = 0; i < n_values; ++i) {
        if (!std::isfinite(src[i])) {
            dm::fail("value %lld is not finite (%f)", static_cast<long long>(i), static_cast<double>(src[i]));
        }
    }
}

// Quantizes rows [first_row, first_row + n_rows) into their place in dst.
void quantize_row_range(ggml_type type, const float * src, void * dst, int64_t first_row, int64_t n_rows,
                        int64_t n_per_row) {
    if (n_rows <= 0) {
        return;
    }
    // ggml_quantize_chunk addresses dst from the start of the tensor by itself (start / n_per_row rows in).
    ggml_quantize_chunk(type, src, dst, first_row * n_per_row, n_rows, n_per_row, nullptr);
}

// Splits the rows into one contiguous band per thread; rows are independent, so the bands
// can be quantized in parallel without any synchronisation besides the final join.
void quantize_parallel(ggml_type type, const float * src, void * dst, int64_t n_rows, int64_t n_per_row,
                       int32_t n_threads) {
    const int64_t n_bands = std::max<int64_t>(1, std::min<int64_t>(n_threads, n_rows));
    const int64_t rows_per_band = (n_rows + n_bands - 1) / n_bands;
    // ggml_quantize_init fills shared lookup tables lazily; doing it once here avoids every
    // thread racing to do it (it is locked, but the first caller would stall the others anyway).
    ggml_quantize_init(type);
    std::vector<std::thread> workers;
    std::vector<std::exception_ptr> errors(static_cast<size_t>(n_bands));
    for (int64_t band = 1; band < n_bands; ++band) {
        workers.emplace_back([&, band] {
            try {
                const int64_t first = band * rows_per_band;
                quantize_row_range(type, src, dst, first, std::min(rows_per_band, n_rows - first), n_per_row);
            } catch (...) {
                errors[static_cast<size_t>(band)] = std::current_exception();
            }
        });
    }
    quantize_row_range(type, src, dst, 0, std::min(rows_per_band, n_rows), n_per_row);
    for (auto & w : workers) {
        w.join();
    }
    for (auto & e : errors) {
        if (e) {
            std::rethrow_exception(e);
        }
    }
}

} // namespace

extern "C" {

bool dm_quant_type_known(int32_t type) {
    return is_known_type(type);
}

bool dm_quant_type_is_target(int32_t type) {
    return is_known_type(type) && is_quantize_target(static_cast<ggml_type>(type)) &&
           !ggml_quantize_requires_imatrix(static_cast<ggml_type>(type));
}

const char * dm_quant_type_name(int32_t type) {
    return is_known_type(type) ? ggml_type_name(static_cast<ggml_type>(type)) : nullptr;
}

int64_t dm_quant_block_size(int32_t type) {
    return is_known_type(type) ? ggml_blck_size(static_cast<ggml_type>(type)) : -1;
}

int64_t dm_quant_row_size(int32_t type, int64_t n_per_row) {
    if (!is_known_type(type) || n_per_row < 0) {
        return -1;
    }
    const auto t = static_cast<ggml_type>(type);
    if (n_per_row % ggml_blck_size(t) != 0) {
        return -1;
    }
    return static_cast<int64_t>(ggml_row_size(t, n_per_row));
}

bool dm_quant_requires_imatrix(int32_t type) {
    return is_known_type(type) && ggml_quantize_requires_imatrix(static_cast<ggml_type>(type));
}

int64_t dm_quantize_rows(int32_t type, const float * src, int64_t n_rows, int64_t n_per_row, void * dst,
                         size_t dst_size, int32_t n_threads) {
    return dm::guard<int64_t>(-1, [&]() -> int64_t {
        const ggml_type t = checked_target(type);
        check_shape(t, n_rows, n_per_row);
        const size_t row_bytes = ggml_row_size(t, n_per_row);
        const auto rows = static_cast<size_t>(n_rows);
        if (rows != 0 && row_bytes > SIZE_MAX / rows) {
            dm::fail("tensor too large to quantize");
        }
        const size_t needed = row_bytes * rows;
        if (dst_size < needed) {
            dm::fail("output buffer holds %zu bytes, %zu needed", dst_size, needed);
        }
        if (rows == 0) {
            return 0;
        }
        if (src == nullptr || dst == nullptr) {
            dm::fail("null source or destination");
        }
        check_finite(src, n_rows * n_per_row);
        quantize_parallel(t, src, dst, n_rows, n_per_row, std::max<int32_t>(1, n_threads));
        // Same safety net as llama.cpp's quantizer: never hand back rows ggml would reject at load.
        if (!ggml_validate_row_data(t, dst, needed)) {
            dm::fail("ggml rejected the quantized %s data (row validation failed)", ggml_type_name(t));
        }
        return static_cast<int64_t>(needed);
    });
}

} // extern "C"
