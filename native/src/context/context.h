// A context: one sequence being decoded against a model, with its own KV cache and thread pool.
#pragma once

#include "context/kv_cache.h"
#include "context/thread_pool.h"
#include "dmem/dmem_graph.h"
#include "dmem/memory.h"
#include "graph/graph.h"
#include "model/model.h"

#include <deltamem.h>

#include <ggml-alloc.h>
#include <ggml-backend.h>
#include <ggml-cpp.h>
#include <ggml-cpu.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

// Frees the scheduler's compute buffers even when a remote device no longer answers.
struct dm_sched_deleter {
    void operator()(ggml_backend_sched_t sched) const noexcept;
};
using dm_sched_ptr = std::unique_ptr<ggml_backend_sched, dm_sched_deleter>;

struct dm_context {
    dm_model *               model = nullptr;
    dm_context_params        params{};
    // Every native resource is a member that frees itself, so a constructor that throws half way
    // leaks nothing. Declaration order is release order reversed: the scheduler goes before the
    // backends it runs on, the CPU backend before the thread pool it uses.
    dm_threadpool_ptr        threadpool;
    ggml_backend_ptr         cpu;
    std::vector<ggml_backend_ptr> devices;   // one backend per device the model's layers are on
    dm_sched_ptr             sched;          // runs each pass over the devices and the CPU
    int32_t                  n_splits = 0;   // graph splits of the last pass (one per device change)
    dm_abort_callback        abort_callback = nullptr;   // asked between and during passes
    void *                   abort_data = nullptr;
    dm_kv_cache              kv;
    dm_memory                memory;       // δ-mem state, when the model has an adapter
    std::vector<uint8_t>     graph_meta;   // storage for graph and tensor descriptors, reused per pass
    std::vector<dm_token>    tokens;       // the sequence so far; tokens.size() == n_past
    std::vector<ggml_fp16_t> mask_buf;
    std::vector<int32_t>     pos_buf;
    std::vector<int64_t>     idx_buf;

    // The last pass's graph, kept allocated: a pass of the same shape (every decode step until the
    // attended cache grows past its padding) only refreshes the inputs and computes again.
    struct cached_graph {
        ggml_context *                 ctx = nullptr;   // lives in graph_meta
        dm_graph                       graph;
        dm_graph_shape                 shape;
        dm_dmem_plan                   plan;            // its shape only: ids change per pass
        std::optional<dm_dmem_builder> dmem;
        bool matches(const dm_graph_shape & s, const dm_dmem_plan & p) const {
            return ctx && shape == s && plan.same_shape(p);
        }
    } cached;

    dm_context(dm_model & model, const dm_context_params & params);
    dm_context(const dm_context &) = delete;
    dm_context & operator=(const dm_context &) = delete;
    ~dm_context();

    void set_abort_callback(dm_abort_callback callback, void * data);

    int32_t n_past() const { return static_cast<int32_t>(tokens.size()); }

    // Appends tokens; writes logits per `which`. seg_ids (may be null) are the message or sentence
    // ids the adapter's write granularity averages over; write = false reads the memory only.
    // Throws dm::Error on bad input, leaving the context unchanged.
    void decode(const dm_token * toks, int32_t n_tokens, dm_logits which, float * logits_out,
                const int32_t * seg_ids = nullptr, bool write = true);
    // KV rows of the sequence (per layer: keys, then values) for saving and restoring state.
    size_t kv_bytes() const;
    void   kv_get(void * out) const;
    void   kv_set(const dm_token * toks, int32_t n_tokens, const void * data, size_t size);
    // Keeps the first n tokens of the sequence (later KV cells are simply ignored).
    void truncate(int32_t n);

    // Throws dm::Error on tokens this context cannot take (bad ids, empty, overflow).
    void validate(const dm_token * toks, int32_t n_tokens) const;
    // Tokens a pass takes: n_batch, or the whole call for segment-mean writes (they average over it).
    int32_t chunk_size(int32_t n_tokens, const int32_t * seg_ids, bool write) const;

    bool abort_requested() const { return abort_callback && abort_callback(abort_data); }

    const uint64_t id;   // unique for the process's life (an address may be reused by a later context)
    std::shared_ptr<struct dm_batch_runner> batch;   // graphs of the batched passes this context leads
    // A scheduler over this context's backends (devices first, the CPU last) for graphs of up to
    // graph_size nodes and leaves.
    dm_sched_ptr new_scheduler(size_t graph_size) const;
    // Computes gf on a scheduler of this context's backends, its thread pool taking its turn.
    ggml_status compute(ggml_backend_sched_t s, ggml_cgraph * gf) const;

private:
    // One forward pass over a chunk of at most n_batch tokens.
    void run_pass(const dm_token * toks, const int32_t * seg_ids, int32_t n_tokens, int32_t n_outputs,
                  float * logits_out, bool write);
    void set_inputs(const dm_graph & g, const dm_token * toks, const dm_graph_shape & shape);
    // The graph for this pass: the cached one when the shape matches, else a new one, allocated.
    const cached_graph & graph_for(const dm_graph_shape & shape, const dm_dmem_plan & plan);
    void drop_cached_graph();
    ggml_context * new_graph_context(size_t max_nodes);
    void init_backends();
};

// Positions, cache cells and causal mask of n_tokens new tokens after n_past, attending n_kv cells:
// pos [n_tokens], idx [n_tokens], mask [n_tokens][n_kv] (0, or -inf for cells a token must not see).
void dm_fill_pass_inputs(int32_t n_past, int32_t n_tokens, int32_t n_kv, int32_t * pos, int64_t * idx, ggml_fp16_t * mask);

// Physical cores of this machine (falls back to logical CPUs).
int32_t dm_physical_cores();
