// C API of the quantised mat-mul kernel (deltamem.h): the arithmetic CPU layers run, on host arrays.
#include "deltamem.h"

#include "common/error.h"
#include "matmul/qmatmul.h"

#include <ggml.h>

#include <vector>

const char * dm_quant_matmul_kernel(void) { return dm_qmatmul_kernel(); }

int32_t dm_quant_matmul(int32_t type, const void * w, size_t w_size, int64_t rows, int64_t n_per_row, const float * x,
                        int64_t n, float * y) {
    return dm::guard<int32_t>(-1, [&]() -> int32_t {
        if (!dm_qmatmul_kernel()) dm::fail("no quantised mat-mul kernel on this CPU (or it is disabled)");
        if (type < 0 || type >= GGML_TYPE_COUNT || !dm_qmatmul_takes_type(static_cast<ggml_type>(type))) {
            dm::fail("the quantised mat-mul takes q4_0, q4_1 and q8_0 weights, not type %d", type);
        }
        const auto t = static_cast<ggml_type>(type);
        if (rows < 1 || n < 1 || n_per_row < 1 || n_per_row % 32 != 0) {
            dm::fail("bad shape: %lld rows of %lld values (a multiple of 32), %lld columns", static_cast<long long>(rows),
                     static_cast<long long>(n_per_row), static_cast<long long>(n));
        }
        const size_t row_bytes = ggml_row_size(t, n_per_row);
        if (w_size / row_bytes < static_cast<size_t>(rows)) {
            dm::fail("the weights hold %zu bytes, %lld rows of %s need %zu", w_size, static_cast<long long>(rows),
                     ggml_type_name(t), row_bytes * static_cast<size_t>(rows));
        }
        if (!w || !x || !y) dm::fail("null array");
        std::vector<char> xq(dm_qact_bytes(n_per_row) * static_cast<size_t>(n));
        dm_qact_quantize(x, static_cast<size_t>(n_per_row) * sizeof(float), n_per_row, n, xq.data());
        const bool packs = dm_qmatmul_packs(t, n_per_row, rows);   // as a model's weights are stored for the AMX kernel
        std::vector<char> packed(packs ? row_bytes * static_cast<size_t>(rows) : 0);
        if (packs) dm_qmatmul_pack(w, t, n_per_row, rows, packed.data());
        dm_qmatmul_rows(packs ? packed.data() : w, row_bytes, t, packs, n_per_row, 0, rows, xq.data(), n, y, rows);
        return 0;
    });
}
