#include "model/weights_file.h"

#include "common/error.h"

#include <ggml-cpu.h>
#include <gguf.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

using dm::fail;

dm_weights_file::~dm_weights_file() {
    if (buf) ggml_backend_buffer_free(buf);
    if (mapping) munmap(mapping, mapping_size);
    if (ctx) ggml_free(ctx);
    if (gguf) gguf_free(gguf);
}

void dm_weights_file::open(const std::string & path_) {
    path = path_;
    FILE * probe = std::fopen(path.c_str(), "rb");
    if (!probe) fail("cannot open '%s': %s", path.c_str(), std::strerror(errno));
    char magic[4] = {0, 0, 0, 0};
    const size_t got = std::fread(magic, 1, 4, probe);
    std::fclose(probe);
    if (got != 4 || std::memcmp(magic, "GGUF", 4) != 0) fail("'%s' is not a GGUF file (bad magic)", path.c_str());

    gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ &ctx};
    gguf = gguf_init_from_file(path.c_str(), params);
    if (!gguf) fail("cannot parse GGUF file '%s': corrupted or truncated header", path.c_str());
}

namespace {

size_t file_size_of(int fd, const std::string & path) {
    struct stat st {};
    if (fstat(fd, &st) != 0) fail("cannot stat '%s'", path.c_str());
    return static_cast<size_t>(st.st_size);
}

// A truncated download is the usual culprit when a tensor ends past the end of the file.
void check_data_bounds(const gguf_context * gguf, size_t file_size) {
    const size_t data_offset = gguf_get_data_offset(gguf);
    const int64_t n = gguf_get_n_tensors(gguf);
    for (int64_t i = 0; i < n; ++i) {
        const size_t begin = data_offset + gguf_get_tensor_offset(gguf, i);
        const size_t size = gguf_get_tensor_size(gguf, i);
        if (begin > file_size || size > file_size - begin) {
            fail("tensor '%s' lies beyond the end of the file (%zu bytes): the file is truncated",
                 gguf_get_tensor_name(gguf, i), file_size);
        }
    }
}

} // namespace

// The file is mapped read-only and wrapped as a CPU buffer, so loading costs no copy and pages
// come in on first use; without mmap the data is read into an allocated buffer.
void dm_weights_file::load_data(bool use_mmap) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail("cannot open '%s': %s", path.c_str(), std::strerror(errno));
    struct fd_closer { int fd; ~fd_closer() { close(fd); } } closer{fd};

    const size_t file_size = file_size_of(fd, path);
    check_data_bounds(gguf, file_size);

    const size_t data_offset = gguf_get_data_offset(gguf);
    uint8_t * base = nullptr;
    if (use_mmap && file_size > 0) {
        void * addr = mmap(nullptr, file_size, PROT_READ, MAP_SHARED, fd, 0);
        if (addr != MAP_FAILED) {
            mapping = addr;
            mapping_size = file_size;
            buf = ggml_backend_cpu_buffer_from_ptr(addr, file_size);
            base = static_cast<uint8_t *>(addr) + data_offset;
        }
    }
    if (!buf) {
        const size_t data_size = file_size - data_offset;
        buf = ggml_backend_buft_alloc_buffer(ggml_backend_cpu_buffer_type(), data_size);
        if (!buf) fail("cannot allocate %zu bytes for the weights", data_size);
        base = static_cast<uint8_t *>(ggml_backend_buffer_get_base(buf));
        if (pread(fd, base, data_size, static_cast<off_t>(data_offset)) != static_cast<ssize_t>(data_size)) {
            fail("cannot read the weights of '%s'", path.c_str());
        }
    }
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);

    const int64_t n = gguf_get_n_tensors(gguf);
    for (int64_t i = 0; i < n; ++i) {
        ggml_tensor * t = ggml_get_tensor(ctx, gguf_get_tensor_name(gguf, i));
        if (!t) fail("internal: tensor '%s' has no descriptor", gguf_get_tensor_name(gguf, i));
        const ggml_status st = ggml_backend_tensor_alloc(buf, t, base + gguf_get_tensor_offset(gguf, i));
        if (st != GGML_STATUS_SUCCESS) fail("cannot place tensor '%s' in the weight buffer", ggml_get_name(t));
    }
}
