#include "context/batch.h"

#include "common/error.h"

#include <algorithm>
#include <memory>
#include <set>
#include <string>

using dm::fail;

// The graph of the last batched pass a context led, kept allocated while the next pass has the
// same contexts and shapes (a decode step of every sequence, until one's cache grows past its padding).
struct dm_batch_runner {
    struct seq_key {
        const dm_context * ctx;
        uint64_t           ctx_id;   // the context, by an id no later context takes
        dm_graph_shape     shape;
        dm_dmem_plan       plan;     // its shape only: ids change per pass
        bool operator==(const seq_key & o) const { return ctx_id == o.ctx_id && shape == o.shape && plan.same_shape(o.plan); }
    };

    dm_sched_ptr                                  sched;
    size_t                                        sched_size = 0;   // the largest graph it was made for
    std::vector<uint8_t>                          meta;
    ggml_context *                                ctx = nullptr;
    std::vector<seq_key>                          key;        // what the graph was built for
    std::vector<std::unique_ptr<dm_dmem_builder>> builders;   // per sequence, with an adapter
    std::vector<dm_batch_seq>                     seqs;
    dm_batch_graph                                graph;

    ~dm_batch_runner() { drop(); }

    void drop() {
        builders.clear();
        if (ctx) ggml_free(ctx);
        ctx = nullptr;
        key.clear();
    }

    void build(const dm_context & leader, std::vector<seq_key> want) {
        drop();
        const dm_model & model = *leader.model;
        const size_t max_nodes = dm_graph_max_nodes(model) * want.size();
        if (!sched || sched_size < 2 * max_nodes) {   // its hash set is sized once: a larger batch needs a new one
            sched.reset();
            sched = leader.new_scheduler(2 * max_nodes);
            sched_size = 2 * max_nodes;
        }
        const size_t need = ggml_tensor_overhead() * max_nodes + ggml_graph_overhead_custom(max_nodes, false);
        if (meta.size() < need) meta.resize(need);
        ggml_init_params ip = {meta.size(), meta.data(), /*no_alloc =*/ true};
        ctx = ggml_init(ip);
        if (!ctx) fail("cannot create a graph context");
        key = std::move(want);
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, max_nodes, false);
        seqs.assign(key.size(), dm_batch_seq{});
        for (size_t i = 0; i < key.size(); ++i) {
            const dm_context & c = *key[i].ctx;
            seqs[i].kv = &c.kv;
            seqs[i].shape = key[i].shape;
            if (model.adapter) {
                builders.push_back(std::make_unique<dm_dmem_builder>(dm_dmem_builder{
                    ctx, gf, *model.adapter, c.memory, key[i].plan, key[i].shape.n_tokens, c.params.dmem_fused, {}, {}, {}}));
                seqs[i].dmem = builders.back().get();
            }
        }
        graph = dm_build_forward_batch(ctx, gf, model, seqs);
        ggml_backend_sched_reset(sched.get());
        if (!ggml_backend_sched_alloc_graph(sched.get(), gf)) {
            drop();
            fail("cannot allocate the batched compute graph");
        }
    }
};

namespace {

// One pass's share of an item: a chunk of its tokens.
struct chunk {
    const dm_batch_item * item;
    int32_t               first, n;    // tokens [first, first + n) of the item
    int32_t               n_outputs;   // 0, 1 or n
};

void validate(const std::vector<dm_batch_item> & items) {
    if (items.empty()) fail("decode_batch: no contexts");
    std::set<const dm_context *> seen;
    for (size_t i = 0; i < items.size(); ++i) {
        const dm_batch_item & it = items[i];
        try {
            if (!it.ctx) fail("is NULL");
            if (it.ctx->model != items[0].ctx->model) fail("belongs to another model than context 0");
            if (!seen.insert(it.ctx).second) fail("is in the batch twice");
            if (it.which != DM_LOGITS_NONE && it.which != DM_LOGITS_LAST && it.which != DM_LOGITS_ALL) fail("unknown logits mode %d", it.which);
            if (it.which != DM_LOGITS_NONE && !it.logits) fail("has no output buffer for logits");
            it.ctx->validate(it.tokens, it.n_tokens);
        } catch (const dm::Error & e) {
            fail("context %zu: %s", i, e.what());
        }
    }
}

// The contexts as they were before the call: their sequence lengths and memories.
struct snapshot {
    std::vector<size_t>             n_past;
    std::vector<std::vector<float>> memory;

    explicit snapshot(const std::vector<dm_batch_item> & items) {
        for (const dm_batch_item & it : items) {
            n_past.push_back(it.ctx->tokens.size());
            memory.emplace_back(it.ctx->memory.n_floats());
            if (!memory.back().empty()) it.ctx->memory.get(memory.back().data());
        }
    }

    void restore(const std::vector<dm_batch_item> & items) const noexcept {
        for (size_t i = 0; i < items.size(); ++i) {
            items[i].ctx->tokens.resize(n_past[i]);   // cells past n_past are ignored
            try {
                if (!memory[i].empty()) items[i].ctx->memory.set(memory[i].data());
            } catch (...) {
                // the device holding it is gone; the error that brought us here says so
            }
        }
    }
};

void set_inputs(dm_batch_runner & r, const std::vector<chunk> & chunks, const std::vector<dm_dmem_plan> & plans) {
    std::vector<int32_t> toks, pos, out_idx, op_seqs, plan_codes;
    std::vector<int64_t> idx;
    std::vector<ggml_fp16_t> mask;
    int32_t first = 0;
    for (size_t s = 0; s < chunks.size(); ++s) {
        const chunk & c = chunks[s];
        const dm_batch_seq & seq = r.seqs[s];
        const int32_t n_past = c.item->ctx->n_past();
        toks.insert(toks.end(), c.item->tokens + c.first, c.item->tokens + c.first + c.n);
        pos.resize(static_cast<size_t>(c.n));
        idx.resize(static_cast<size_t>(c.n));
        mask.resize(static_cast<size_t>(c.n) * seq.shape.n_kv);
        dm_fill_pass_inputs(n_past, c.n, seq.shape.n_kv, pos.data(), idx.data(), mask.data());
        // Only device layers read the mask and cells (the CPU attention op reads op_seqs).
        if (seq.mask->buffer) ggml_backend_tensor_set(seq.mask, mask.data(), 0, ggml_nbytes(seq.mask));
        if (seq.kv_idx->buffer) ggml_backend_tensor_set(seq.kv_idx, idx.data(), 0, ggml_nbytes(seq.kv_idx));
        op_seqs.insert(op_seqs.end(), {c.n, n_past});
        ggml_backend_tensor_set(r.graph.pos, pos.data(), static_cast<size_t>(first) * sizeof(int32_t), pos.size() * sizeof(int32_t));
        for (int32_t t = c.n - c.n_outputs; t < c.n; ++t) out_idx.push_back(first + t);
        if (seq.dmem) {
            seq.dmem->set_inputs(plans[s]);
            const std::vector<int32_t> codes = plans[s].codes(c.n);
            plan_codes.insert(plan_codes.end(), codes.begin(), codes.end());
        }
        first += c.n;
    }
    ggml_backend_tensor_set(r.graph.tokens, toks.data(), 0, ggml_nbytes(r.graph.tokens));
    if (r.graph.out_idx) ggml_backend_tensor_set(r.graph.out_idx, out_idx.data(), 0, ggml_nbytes(r.graph.out_idx));
    if (r.graph.seqs->buffer) ggml_backend_tensor_set(r.graph.seqs, op_seqs.data(), 0, ggml_nbytes(r.graph.seqs));
    if (r.graph.dmem_plans && r.graph.dmem_plans->buffer) {
        ggml_backend_tensor_set(r.graph.dmem_plans, plan_codes.data(), 0, ggml_nbytes(r.graph.dmem_plans));
    }
}

// One pass over a chunk of every item that has tokens left.
void run_pass(dm_context & leader, const std::vector<chunk> & chunks, size_t n_vocab) {
    const dm_adapter * adapter = leader.model->adapter.get();
    std::vector<dm_batch_runner::seq_key> want;
    std::vector<dm_dmem_plan> plans;
    for (const chunk & c : chunks) {
        const dm_context & ctx = *c.item->ctx;
        const dm_graph_shape shape{c.n, dm_padded_n_kv(ctx.n_past() + c.n, ctx.params.n_ctx), c.n_outputs};
        const int32_t * ids = c.item->seg_ids ? c.item->seg_ids + c.first : nullptr;
        plans.push_back(adapter ? dm_dmem_plan::make(adapter->cfg, ids, c.n, c.item->write) : dm_dmem_plan{});
        want.push_back({&ctx, ctx.id, shape, plans.back()});
    }
    if (!leader.batch) leader.batch = std::make_shared<dm_batch_runner>();
    dm_batch_runner & r = *leader.batch;
    if (!(r.ctx && r.key == want)) r.build(leader, std::move(want));
    set_inputs(r, chunks, plans);
    const ggml_status status = leader.compute(r.sched.get(), r.graph.gf);
    if (status == GGML_STATUS_ABORTED) fail("decode_batch: aborted");
    if (status != GGML_STATUS_SUCCESS) fail("batched graph computation failed");
    size_t row = 0;
    for (const chunk & c : chunks) {
        if (c.n_outputs > 0) {
            float * out = c.item->logits + (c.item->which == DM_LOGITS_ALL ? static_cast<size_t>(c.first) * n_vocab : 0);
            ggml_backend_tensor_get(r.graph.logits, out, row * n_vocab * sizeof(float), c.n_outputs * n_vocab * sizeof(float));
            row += static_cast<size_t>(c.n_outputs);
        }
    }
    for (const chunk & c : chunks) {
        dm_context & ctx = *c.item->ctx;
        ctx.tokens.insert(ctx.tokens.end(), c.item->tokens + c.first, c.item->tokens + c.first + c.n);
    }
}

// The context whose backends run the batch and whose runner keeps its graph: one that has led a
// batch before, when there is one (a new runner costs a scheduler and its buffers), else the first.
dm_context & pick_leader(const std::vector<dm_batch_item> & items) {
    for (const dm_batch_item & it : items) {
        if (it.ctx->batch) return *it.ctx;
    }
    return *items[0].ctx;
}

} // namespace

void dm_decode_batch(const std::vector<dm_batch_item> & items) {
    validate(items);
    dm_context & leader = pick_leader(items);
    const size_t n_vocab = static_cast<size_t>(leader.model->hp.n_vocab);
    const snapshot before(items);
    try {
        std::vector<int32_t> done(items.size(), 0);
        for (;;) {
            std::vector<chunk> chunks;
            for (size_t i = 0; i < items.size(); ++i) {
                const dm_batch_item & it = items[i];
                if (done[i] == it.n_tokens) continue;
                const int32_t n = std::min(it.ctx->chunk_size(it.n_tokens, it.seg_ids, it.write), it.n_tokens - done[i]);
                const bool last = done[i] + n == it.n_tokens;
                const int32_t n_out = it.which == DM_LOGITS_ALL ? n : (it.which == DM_LOGITS_LAST && last ? 1 : 0);
                chunks.push_back({&it, done[i], n, n_out});
                done[i] += n;
            }
            if (chunks.empty()) break;
            if (leader.abort_requested()) fail("decode_batch: aborted");
            run_pass(leader, chunks, n_vocab);
        }
    } catch (...) {
        before.restore(items);
        throw;
    }
}
