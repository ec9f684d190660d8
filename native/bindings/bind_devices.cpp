// Bindings for devices: the registry's list, RPC servers to add, and serving this machine's.
#include "bindings/bindings.h"

#include <pybind11/stl.h>

#include <string>

namespace {

py::list device_list() {
    py::list out;
    const int32_t n = dm_device_count();
    for (int32_t i = 0; i < n; ++i) {
        dm_device_info info{};
        check(dm_device_get(i, &info) == 0);
        py::dict d;
        d["name"] = native_text(info.name);
        d["description"] = native_text(info.description);
        d["type"] = native_text(info.type);
        d["free"] = info.free;
        d["total"] = info.total;
        out.append(d);
    }
    return out;
}

} // namespace

void bind_devices(py::module_ & m) {
    m.def("backends", [] { return native_text(dm_backends()); }, "ggml's backends in this build, comma-separated.");
    m.def("devices", &device_list, "ggml's devices (with the RPC servers added so far) as dicts.");
    m.def("rpc_add_servers",
          [](const std::string & servers) {
              int32_t rc = 0;
              {
                  py::gil_scoped_release release;
                  rc = dm_rpc_add_servers(servers.c_str());
              }
              check(rc == 0);
          },
          py::arg("servers"), "Adds the devices of RPC servers (\"host:port,host:port\").");
    m.def("rpc_serve",
          [](const std::string & endpoint, const py::handle & n_threads) {
              const int32_t threads = int32_arg(n_threads, "n_threads");
              int32_t rc = 0;
              {
                  py::gil_scoped_release release;   // serves until the process ends
                  rc = dm_rpc_serve(endpoint.c_str(), threads);
              }
              check(rc == 0);
          },
          py::arg("endpoint"), py::arg("n_threads"), "Serves this machine's devices over ggml's RPC protocol (blocks).");
}
