// Devices: the ggml backends a model can put its layers on (GPUs, RPC servers), and where each
// layer goes. The CPU is always there and takes whatever is not offloaded.
#pragma once

#include <ggml-backend.h>

#include <cstdint>
#include <string>
#include <vector>

// How a model spreads over devices (llama.cpp's meanings).
struct dm_placement_params {
    int32_t            n_gpu_layers = 0;   // layers to offload, the last ones first; -1 or > n_layer: all and the output
    int32_t            main_gpu = 0;       // without tensor_split: the one offload device that takes every offloaded layer
    std::vector<float> tensor_split;       // proportions of the offloaded layers over the offload devices
    std::string        rpc_servers;        // "host:port,host:port": remote devices added before the local ones
};

// Where each layer runs: nullptr is the CPU.
struct dm_placement {
    std::vector<ggml_backend_dev_t> layer;    // [n_layer]
    ggml_backend_dev_t              output = nullptr;
    std::vector<ggml_backend_dev_t> devices;  // distinct non-CPU devices in use, in offload order

    bool on_cpu(int32_t il) const { return layer[il] == nullptr; }
};

// Adds the RPC servers' devices to ggml's registry (once per endpoint) and returns them, in the
// order given; throws dm::Error naming a server that does not answer, or when this ggml was built
// without RPC.
std::vector<ggml_backend_dev_t> dm_add_rpc_servers(const std::string & servers);
// The devices a model with these RPC servers offloads to: this machine's GPUs (registry order),
// then the servers' devices (the order given).
std::vector<ggml_backend_dev_t> dm_offload_devices(const std::string & rpc_servers);
// Decides where each of n_layer layers and the output go; throws dm::Error on parameters that
// ask for devices this build or machine does not have.
dm_placement dm_place_layers(int32_t n_layer, const dm_placement_params & params);

// Serves this machine's devices (its GPUs, else its CPU) to other machines over ggml's RPC
// protocol on endpoint "host:port"; returns only on failure (throws dm::Error).
void dm_serve_devices(const std::string & endpoint, int32_t n_threads);

// Type names as pydeltamem.devices() reports them: "cpu", "gpu", "igpu", "accel".
const char * dm_device_type_name(enum ggml_backend_dev_type type);

// What this build's ggml offers besides the CPU, for error messages: "CUDA, RPC" or "none".
std::string dm_available_backends();
