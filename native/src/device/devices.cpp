#include "device/devices.h"

#include "common/error.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <sstream>

using dm::fail;

namespace {

ggml_backend_reg_t rpc_registry() {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    if (!reg) {
        fail("this ggml has no RPC backend (the portable libggml-python wheel is CPU-only): build one with "
             "scripts/build_ggml.sh VENV --rpc");
    }
    return reg;
}

std::vector<std::string> split_endpoints(const std::string & servers) {
    std::vector<std::string> out;
    std::stringstream in(servers);
    std::string item;
    while (std::getline(in, item, ',')) {
        item.erase(0, item.find_first_not_of(" \t"));
        item.erase(item.find_last_not_of(" \t") + 1);
        if (item.empty()) continue;
        const size_t colon = item.rfind(':');
        if (colon == std::string::npos || colon == 0 || colon + 1 == item.size() ||
            item.find_first_not_of("0123456789", colon + 1) != std::string::npos) {
            fail("RPC server '%s' is not host:port", item.c_str());
        }
        out.push_back(item);
    }
    return out;
}

bool offloadable(ggml_backend_dev_t dev) {
    const enum ggml_backend_dev_type t = ggml_backend_dev_type(dev);
    return t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU;
}

// Cumulative shares of the offloaded layers per device, ending at 1: tensor_split's, or everything
// on main_gpu without one.
std::vector<double> cumulative_shares(size_t n_devices, const std::vector<float> & split, int32_t main_gpu) {
    std::vector<double> w(n_devices, 0.0);
    if (split.empty()) {
        w[static_cast<size_t>(main_gpu)] = 1.0;
    } else {
        if (split.size() > n_devices) {
            fail("tensor_split has %zu entries but there are %zu devices to offload to", split.size(), n_devices);
        }
        for (size_t i = 0; i < split.size(); ++i) {
            if (!(split[i] >= 0.0f) || split[i] > 1e30f) fail("tensor_split[%zu] = %g is not a non-negative number", i, split[i]);
            w[i] = split[i];
        }
    }
    const double sum = std::accumulate(w.begin(), w.end(), 0.0);
    if (sum <= 0.0) fail("tensor_split gives every device a share of 0");
    std::vector<double> cum(w.size());
    double acc = 0.0;
    for (size_t i = 0; i < w.size(); ++i) cum[i] = (acc += w[i]) / sum;
    cum.back() = 1.0;
    return cum;
}

} // namespace

std::vector<ggml_backend_dev_t> dm_add_rpc_servers(const std::string & servers) {
    const std::vector<std::string> endpoints = split_endpoints(servers);
    std::vector<ggml_backend_dev_t> out;
    if (endpoints.empty()) return out;
    ggml_backend_reg_t rpc = rpc_registry();
    using add_server_fn = ggml_backend_reg_t (*)(const char * endpoint);
    auto add_server = reinterpret_cast<add_server_fn>(ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server"));
    if (!add_server) fail("this ggml's RPC backend cannot add servers");
    static std::mutex mutex;
    static std::map<std::string, ggml_backend_reg_t> registered;
    std::lock_guard<std::mutex> lock(mutex);
    for (const std::string & e : endpoints) {
        auto it = registered.find(e);
        if (it == registered.end()) {
            ggml_backend_reg_t reg = add_server(e.c_str());
            if (!reg) fail("RPC server %s does not answer (is `deltamem rpc-server` running there?)", e.c_str());
            ggml_backend_register(reg);   // its devices join the registry, after the local ones
            it = registered.emplace(e, reg).first;
        }
        for (size_t i = 0; i < ggml_backend_reg_dev_count(it->second); ++i) out.push_back(ggml_backend_reg_dev_get(it->second, i));
    }
    return out;
}

std::vector<ggml_backend_dev_t> dm_offload_devices(const std::string & rpc_servers) {
    std::vector<ggml_backend_dev_t> out;
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (offloadable(dev) && (!rpc || ggml_backend_dev_backend_reg(dev) != rpc)) out.push_back(dev);
    }
    for (ggml_backend_dev_t dev : dm_add_rpc_servers(rpc_servers)) out.push_back(dev);
    return out;
}

std::string dm_available_backends() {
    std::string out;
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        const std::string name = ggml_backend_reg_name(ggml_backend_reg_get(i));
        if (name == "CPU") continue;
        out += out.empty() ? name : ", " + name;
    }
    return out.empty() ? "none" : out;
}

dm_placement dm_place_layers(int32_t n_layer, const dm_placement_params & p) {
    if (p.n_gpu_layers < -1) fail("n_gpu_layers must be -1 (all) or >= 0, got %d", p.n_gpu_layers);
    const std::vector<ggml_backend_dev_t> devs = dm_offload_devices(p.rpc_servers);
    dm_placement out;
    out.layer.assign(n_layer, nullptr);
    if (p.n_gpu_layers == 0) {
        if (!p.tensor_split.empty()) fail("tensor_split needs n_gpu_layers > 0");
        return out;
    }
    if (devs.empty()) {
        fail("n_gpu_layers=%d asks for a GPU or RPC device, but there is none (backends in this ggml besides the CPU: %s; "
             "GPU builds: scripts/build_ggml.sh VENV --cuda, remote devices: rpc_servers= with a build from --rpc)",
             p.n_gpu_layers, dm_available_backends().c_str());
    }
    if (p.main_gpu < 0 || p.main_gpu >= static_cast<int32_t>(devs.size())) {
        fail("main_gpu=%d is not one of the %zu offload devices", p.main_gpu, devs.size());
    }
    // As llama.cpp counts: the output layer is number n_layer, offloaded only when every layer is.
    const int32_t n_offload = p.n_gpu_layers < 0 ? n_layer + 1 : std::min(p.n_gpu_layers, n_layer + 1);
    const int32_t first = std::max(n_layer - n_offload, 0);
    const std::vector<double> cum = cumulative_shares(devs.size(), p.tensor_split, p.main_gpu);
    const int32_t n_blocks = std::min(n_offload, n_layer);
    std::set<ggml_backend_dev_t> used;
    for (int32_t il = first; il < n_layer; ++il) {
        const double at = (static_cast<double>(il - first) + 0.5) / n_blocks;
        const size_t d = static_cast<size_t>(std::upper_bound(cum.begin(), cum.end(), at) - cum.begin());
        out.layer[il] = devs[std::min(d, devs.size() - 1)];
        used.insert(out.layer[il]);
    }
    if (n_offload > n_layer) out.output = out.layer[n_layer - 1];   // with the last layer: no extra split
    for (ggml_backend_dev_t dev : devs) {
        if (used.count(dev)) out.devices.push_back(dev);
    }
    return out;
}

void dm_serve_devices(const std::string & endpoint, int32_t n_threads) {
    ggml_backend_reg_t rpc = rpc_registry();
    using start_fn = void (*)(const char *, const char *, size_t, size_t, ggml_backend_dev_t *);
    auto start = reinterpret_cast<start_fn>(ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_start_server"));
    if (!start) fail("this ggml's RPC backend cannot serve");
    if (split_endpoints(endpoint).size() != 1) fail("RPC endpoint '%s' is not host:port", endpoint.c_str());
    // Like llama.cpp's rpc-server: the local GPUs when there are any, else the CPU.
    std::vector<ggml_backend_dev_t> serve;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (offloadable(dev) && ggml_backend_dev_backend_reg(dev) != rpc) serve.push_back(dev);
    }
    if (serve.empty()) serve.push_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    if (n_threads <= 0) fail("threads must be positive, got %d", n_threads);
    start(endpoint.c_str(), nullptr, static_cast<size_t>(n_threads), serve.size(), serve.data());
    fail("the RPC server on %s stopped (is the port in use?)", endpoint.c_str());
}

const char * dm_device_type_name(enum ggml_backend_dev_type type) {
    switch (type) {
        case GGML_BACKEND_DEVICE_TYPE_CPU: return "cpu";
        case GGML_BACKEND_DEVICE_TYPE_GPU: return "gpu";
        case GGML_BACKEND_DEVICE_TYPE_IGPU: return "igpu";
        case GGML_BACKEND_DEVICE_TYPE_ACCEL: return "accel";
        case GGML_BACKEND_DEVICE_TYPE_META: return "meta";
    }
    return "unknown";
}
