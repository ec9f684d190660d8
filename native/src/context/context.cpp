#include "context/context.h"

#include "common/error.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>

using dm::fail;

int32_t dm_physical_cores() {
    std::ifstream cpuinfo("/proc/cpuinfo");
    std::set<std::pair<std::string, std::string>> cores;
    std::string line, physical = "0";
    while (std::getline(cpuinfo, line)) {
        const auto colon = line.find(':');
        if (colon == std::string::npos) continue;
        const std::string value = colon + 2 <= line.size() ? line.substr(colon + 2) : "";
        if (line.rfind("physical id", 0) == 0) physical = value;
        if (line.rfind("core id", 0) == 0) cores.emplace(physical, value);
    }
    if (!cores.empty()) return static_cast<int32_t>(cores.size());
    return static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
}

namespace {
std::atomic<uint64_t> g_next_context_id{1};
}

dm_context::dm_context(dm_model & m, const dm_context_params & p) : model(&m), params(p), id(g_next_context_id++) {
    if (params.n_ctx <= 0) params.n_ctx = m.hp.n_ctx_train;
    if (params.n_batch <= 0) fail("n_batch must be positive, got %d", params.n_batch);
    params.n_batch = std::min(params.n_batch, params.n_ctx);
    if (params.n_threads <= 0) params.n_threads = std::min(dm_physical_cores(), DM_MAX_THREADS);
    if (params.n_threads > DM_MAX_THREADS) fail("n_threads must be at most %d, got %d", DM_MAX_THREADS, params.n_threads);
    if (params.kv_type != DM_KV_F16 && params.kv_type != DM_KV_F32) fail("unknown KV cache type %d", params.kv_type);
    if (params.poll < 0 || params.poll > 100) fail("poll must be in 0..100, got %d", params.poll);

    init_backends();
    kv.init(m, params.n_ctx, params.kv_type == DM_KV_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16);
    if (m.adapter) memory.init(*m.adapter, m.placement);

    // Reserve compute memory for the largest pass up front, so passes never reallocate.
    const dm_graph_shape worst{params.n_batch, params.n_ctx, 1};   // all-logits passes grow it on demand
    const size_t max_nodes = dm_graph_max_nodes(m);
    const ggml_context_ptr ctx(new_graph_context(max_nodes));
    ggml_cgraph * gf = ggml_new_graph_custom(ctx.get(), max_nodes, false);
    const dm_dmem_plan plan;
    std::optional<dm_dmem_builder> dmem;
    if (m.adapter) {
        dmem.emplace(dm_dmem_builder{ctx.get(), gf, *m.adapter, memory, plan, worst.n_tokens, params.dmem_fused, {}, {}, {}});
    }
    dm_graph g = dm_build_forward(ctx.get(), gf, m, kv, worst, dmem ? &*dmem : nullptr);
    if (!ggml_backend_sched_reserve(sched.get(), g.gf)) {
        fail("cannot allocate compute memory for n_ctx=%d, n_batch=%d", params.n_ctx, params.n_batch);
    }
}

void dm_sched_deleter::operator()(ggml_backend_sched_t s) const noexcept {
    try {
        dm::device_call_scope scope;
        ggml_backend_sched_free(s);
    } catch (...) {
        // a remote device is gone: its compute buffers went with it
    }
}

// The devices of the model's layers first (the scheduler prefers backends in this order), the CPU
// last: it computes the token lookup, whatever stayed on the host, and any op a device lacks.
void dm_context::init_backends() {
    // One pool of worker threads for the life of the context: spawning threads per pass costs
    // more than a single-token mat-vec on small models.
    ggml_threadpool_params tpp = ggml_threadpool_params_default(params.n_threads);
    tpp.poll = static_cast<uint32_t>(params.poll);
    threadpool.reset(ggml_threadpool_new(&tpp));
    if (!threadpool) fail("cannot create a thread pool of %d threads", params.n_threads);
    cpu.reset(ggml_backend_cpu_init());
    if (!cpu) fail("cannot initialise the CPU backend");
    ggml_backend_cpu_set_n_threads(cpu.get(), params.n_threads);
    ggml_backend_cpu_set_threadpool(cpu.get(), threadpool.get());

    for (ggml_backend_dev_t dev : model->placement.devices) {
        devices.emplace_back(ggml_backend_dev_init(dev, nullptr));
        if (!devices.back()) fail("cannot initialise device %s (%s)", ggml_backend_dev_name(dev), ggml_backend_dev_description(dev));
    }
    sched = new_scheduler(2 * dm_graph_max_nodes(*model));
}

dm_sched_ptr dm_context::new_scheduler(size_t graph_size) const {
    std::vector<ggml_backend_t> all;
    for (const ggml_backend_ptr & d : devices) all.push_back(d.get());
    all.push_back(cpu.get());
    // op_offload off: a weight on the host stays there (copying it to a device per pass, over RPC
    // at that, costs more than computing it where it is).
    dm_sched_ptr s(ggml_backend_sched_new(all.data(), nullptr, static_cast<int>(all.size()), graph_size,
                                          /*parallel =*/ false, /*op_offload =*/ false));
    if (!s) fail("cannot create the backend scheduler");
    return s;
}

dm_context::~dm_context() { drop_cached_graph(); }

ggml_status dm_context::compute(ggml_backend_sched_t s, ggml_cgraph * gf) const {
    dm_pool_turn turn(threadpool.get());
    return ggml_backend_sched_graph_compute(s, gf);
}

void dm_context::set_abort_callback(dm_abort_callback callback, void * data) {
    abort_callback = callback;
    abort_data = data;
    // ggml asks it after every CPU graph node, so a long pass stops soon too (device splits are
    // asked between passes).
    ggml_backend_cpu_set_abort_callback(cpu.get(), callback, data);
}

ggml_context * dm_context::new_graph_context(size_t max_nodes) {
    const size_t need = ggml_tensor_overhead() * max_nodes + ggml_graph_overhead_custom(max_nodes, false);
    if (graph_meta.size() < need) graph_meta.resize(need);
    ggml_init_params ip = {graph_meta.size(), graph_meta.data(), /*no_alloc =*/ true};
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) fail("cannot create a graph context");
    return ctx;
}

void dm_context::validate(const dm_token * toks, int32_t n_tokens) const {
    if (n_tokens <= 0 || !toks) fail("decode: empty input (no tokens)");
    const int32_t n_vocab = model->hp.n_vocab;
    for (int32_t i = 0; i < n_tokens; ++i) {
        if (toks[i] < 0 || toks[i] >= n_vocab) {
            fail("decode: token id %d at position %d is out of range [0, %d)", toks[i], i, n_vocab);
        }
    }
    if (static_cast<int64_t>(n_past()) + n_tokens > params.n_ctx) {
        fail("decode: context overflow: %d tokens in the context + %d new > n_ctx = %d", n_past(), n_tokens, params.n_ctx);
    }
}

void dm_fill_pass_inputs(int32_t n_past, int32_t n_tokens, int32_t n_kv, int32_t * pos, int64_t * idx, ggml_fp16_t * mask) {
    // Causal mask: token i (at position n_past + i) sees cache cells 0 ..= n_past + i; the padding
    // cells after them hold nothing yet (or stale rows) and are masked too.
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f);
    const ggml_fp16_t minus_inf = ggml_fp32_to_fp16(-INFINITY);
    for (int32_t i = 0; i < n_tokens; ++i) {
        pos[i] = n_past + i;
        idx[i] = n_past + i;
        ggml_fp16_t * row = mask + static_cast<size_t>(i) * n_kv;
        const int32_t visible = n_past + i + 1;
        std::fill(row, row + visible, zero);
        std::fill(row + visible, row + n_kv, minus_inf);
    }
}

void dm_context::set_inputs(const dm_graph & g, const dm_token * toks, const dm_graph_shape & shape) {
    pos_buf.resize(shape.n_tokens);
    idx_buf.resize(shape.n_tokens);
    mask_buf.resize(static_cast<size_t>(shape.n_kv) * shape.n_tokens);
    dm_fill_pass_inputs(n_past(), shape.n_tokens, shape.n_kv, pos_buf.data(), idx_buf.data(), mask_buf.data());
    ggml_backend_tensor_set(g.in.tokens, toks, 0, ggml_nbytes(g.in.tokens));
    ggml_backend_tensor_set(g.in.pos, pos_buf.data(), 0, ggml_nbytes(g.in.pos));
    // Inputs no node reads get no memory: the mask and cells of ggml's attention, the lengths of
    // the CPU attention op, as the pass's layers use one or the other.
    if (g.in.mask->buffer) ggml_backend_tensor_set(g.in.mask, mask_buf.data(), 0, ggml_nbytes(g.in.mask));
    if (g.in.kv_idx->buffer) ggml_backend_tensor_set(g.in.kv_idx, idx_buf.data(), 0, ggml_nbytes(g.in.kv_idx));
    const int32_t seqs[2] = {shape.n_tokens, n_past()};
    if (g.in.seqs->buffer) ggml_backend_tensor_set(g.in.seqs, seqs, 0, sizeof(seqs));
}

void dm_context::drop_cached_graph() {
    cached.dmem.reset();
    if (cached.ctx) ggml_free(cached.ctx);
    cached.ctx = nullptr;
}

const dm_context::cached_graph & dm_context::graph_for(const dm_graph_shape & shape, const dm_dmem_plan & plan) {
    if (cached.matches(shape, plan)) return cached;
    drop_cached_graph();
    const size_t max_nodes = dm_graph_max_nodes(*model);
    cached.ctx = new_graph_context(max_nodes);
    cached.shape = shape;
    cached.plan = plan;
    ggml_cgraph * gf = ggml_new_graph_custom(cached.ctx, max_nodes, false);
    const dm_adapter * adapter = model->adapter.get();
    if (adapter) {
        cached.dmem.emplace(dm_dmem_builder{cached.ctx, gf, *adapter, memory, cached.plan, shape.n_tokens,
                                            params.dmem_fused, {}, {}, {}});
    }
    cached.graph = dm_build_forward(cached.ctx, gf, *model, kv, shape, cached.dmem ? &*cached.dmem : nullptr);
    ggml_backend_sched_reset(sched.get());
    if (!ggml_backend_sched_alloc_graph(sched.get(), gf)) {
        drop_cached_graph();
        fail("cannot allocate the compute graph");
    }
    n_splits = ggml_backend_sched_get_n_splits(sched.get());
    return cached;
}

void dm_context::run_pass(const dm_token * toks, const int32_t * seg_ids, int32_t n_tokens, int32_t n_outputs,
                          float * logits_out, bool write) {
    const dm_graph_shape shape{n_tokens, dm_padded_n_kv(n_past() + n_tokens, params.n_ctx), n_outputs};
    const dm_adapter * adapter = model->adapter.get();
    const dm_dmem_plan plan = adapter ? dm_dmem_plan::make(adapter->cfg, seg_ids, n_tokens, write) : dm_dmem_plan{};
    const cached_graph & c = graph_for(shape, plan);
    const dm_graph & g = c.graph;
    set_inputs(g, toks, shape);
    if (c.dmem) c.dmem->set_inputs(plan);
    const ggml_status status = compute(sched.get(), g.gf);
    if (status == GGML_STATUS_ABORTED) fail("decode: aborted");
    if (status != GGML_STATUS_SUCCESS) fail("graph computation failed");
    if (g.logits && logits_out) ggml_backend_tensor_get(g.logits, logits_out, 0, ggml_nbytes(g.logits));
    tokens.insert(tokens.end(), toks, toks + n_tokens);
}

// Segment-mean writes average over the whole call, so such a call runs as one pass.
int32_t dm_context::chunk_size(int32_t n_tokens, const int32_t * seg_ids, bool write) const {
    const dm_adapter * a = model->adapter.get();
    const bool whole_call = a && seg_ids && write && a->cfg.granularity != dm_write_granularity::token;
    return whole_call ? n_tokens : params.n_batch;
}

void dm_context::decode(const dm_token * toks, int32_t n_tokens, dm_logits which, float * logits_out,
                        const int32_t * seg_ids, bool write) {
    validate(toks, n_tokens);
    if (which != DM_LOGITS_NONE && which != DM_LOGITS_LAST && which != DM_LOGITS_ALL) fail("decode: unknown logits mode %d", which);
    if (which != DM_LOGITS_NONE && !logits_out) fail("decode: no output buffer for logits");
    const size_t n_vocab = static_cast<size_t>(model->hp.n_vocab);
    const size_t n_before = tokens.size();
    try {
        const int32_t chunk = chunk_size(n_tokens, seg_ids, write);
        for (int32_t done = 0; done < n_tokens;) {
            const int32_t n = std::min(chunk, n_tokens - done);
            const bool last_chunk = done + n == n_tokens;
            int32_t n_outputs = 0;
            float * out = nullptr;
            if (which == DM_LOGITS_ALL) {
                n_outputs = n;
                out = logits_out + static_cast<size_t>(done) * n_vocab;
            } else if (which == DM_LOGITS_LAST && last_chunk) {
                n_outputs = 1;
                out = logits_out;
            }
            if (abort_requested()) fail("decode: aborted");
            run_pass(toks + done, seg_ids ? seg_ids + done : nullptr, n, n_outputs, out, write);
            done += n;
        }
    } catch (...) {
        tokens.resize(n_before);   // cells past n_past are ignored, so this restores the context
        throw;
    }
}

void dm_context::truncate(int32_t n) {
    if (n < 0 || n > n_past()) fail("truncate: %d is outside [0, %d]", n, n_past());
    tokens.resize(static_cast<size_t>(n));
}

size_t dm_context::kv_bytes() const { return kv.bytes_per_token() * tokens.size(); }

void dm_context::kv_get(void * out) const {
    auto * dst = static_cast<uint8_t *>(out);
    for (size_t il = 0; il < kv.k.size(); ++il) {
        for (const ggml_tensor * t : {kv.k[il], kv.v[il]}) {
            const size_t n = t->nb[1] * tokens.size();   // the first n_past rows are contiguous
            ggml_backend_tensor_get(t, dst, 0, n);
            dst += n;
        }
    }
}

void dm_context::kv_set(const dm_token * toks, int32_t n_tokens, const void * data, size_t size) {
    if (n_tokens < 0 || n_tokens > params.n_ctx) fail("state has %d tokens, more than n_ctx = %d", n_tokens, params.n_ctx);
    for (int32_t i = 0; i < n_tokens; ++i) {
        if (toks[i] < 0 || toks[i] >= model->hp.n_vocab) fail("state holds token id %d, out of range", toks[i]);
    }
    const size_t per_token = kv.bytes_per_token();
    if (size != per_token * static_cast<size_t>(n_tokens)) {
        fail("state KV data has %zu bytes, expected %zu for %d tokens (another model or KV type?)", size,
             per_token * static_cast<size_t>(n_tokens), n_tokens);
    }
    const auto * src = static_cast<const uint8_t *>(data);
    for (size_t il = 0; il < kv.k.size(); ++il) {
        for (ggml_tensor * t : {kv.k[il], kv.v[il]}) {
            const size_t n = t->nb[1] * static_cast<size_t>(n_tokens);
            ggml_backend_tensor_set(t, src, 0, n);
            src += n;
        }
    }
    tokens.assign(toks, toks + n_tokens);
}
