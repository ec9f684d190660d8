// C API for contexts: argument checks and exception-to-error translation only.
#include <deltamem.h>

#include "common/error.h"
#include "context/batch.h"
#include "context/context.h"

#include <algorithm>

dm_context_params dm_context_default_params(void) {
    dm_context_params p{};
    p.n_ctx = 4096;
    p.n_batch = 512;
    p.n_threads = 0;
    p.kv_type = DM_KV_F16;
    p.dmem_fused = true;
    p.poll = 50;
    return p;
}

dm_context * dm_context_new(dm_model * model, dm_context_params params) {
    return dm::guard<dm_context *>(nullptr, [&] {
        if (!model) dm::fail("model is NULL");
        return new dm_context(*model, params);
    });
}

void dm_context_free(dm_context * ctx) { delete ctx; }

static dm_context & context_of(dm_context * ctx) { return dm::deref(ctx, "context"); }
static const dm_context & context_of(const dm_context * ctx) { return dm::deref(ctx, "context"); }

int32_t dm_context_set_abort_callback(dm_context * ctx, dm_abort_callback callback, void * user_data) {
    return dm::guard<int32_t>(-1, [&] {
        context_of(ctx).set_abort_callback(callback, user_data);
        return 0;
    });
}

int32_t dm_context_n_ctx(const dm_context * ctx) {
    return dm::guard<int32_t>(-1, [&] { return context_of(ctx).params.n_ctx; });
}

int32_t dm_context_n_splits(const dm_context * ctx) {
    return dm::guard<int32_t>(-1, [&] { return context_of(ctx).n_splits; });
}

int32_t dm_context_n_past(const dm_context * ctx) {
    return dm::guard<int32_t>(-1, [&] { return context_of(ctx).n_past(); });
}

void dm_context_reset(dm_context * ctx) {
    dm::guard<int32_t>(-1, [&] {
        context_of(ctx).truncate(0);
        return 0;
    });
}

int32_t dm_decode(dm_context * ctx, const dm_token * tokens, int32_t n_tokens, dm_logits which, float * logits_out) {
    return dm_decode_ext(ctx, tokens, n_tokens, which, logits_out, nullptr, true);
}

int32_t dm_decode_ext(dm_context * ctx, const dm_token * tokens, int32_t n_tokens, dm_logits which, float * logits_out,
                      const int32_t * seg_ids, bool write) {
    return dm::guard<int32_t>(-1, [&] {
        context_of(ctx).decode(tokens, n_tokens, which, logits_out, seg_ids, write);
        return 0;
    });
}

int32_t dm_decode_batch(const dm_batch_entry * entries, int32_t n_entries, dm_logits which) {
    return dm::guard<int32_t>(-1, [&] {
        if (!entries || n_entries <= 0) dm::fail("decode_batch: no entries (NULL or n_entries <= 0)");
        std::vector<dm_batch_item> items;
        for (int32_t i = 0; i < n_entries; ++i) {
            const dm_batch_entry & e = entries[i];
            items.push_back({e.ctx, e.tokens, e.n_tokens, e.seg_ids, e.write, which, e.logits});
        }
        dm_decode_batch(items);
        return 0;
    });
}

dm_model * dm_context_model(const dm_context * ctx) {
    return dm::guard<dm_model *>(nullptr, [&] { return context_of(ctx).model; });
}

int32_t dm_context_tokens(const dm_context * ctx, dm_token * out, int32_t n_max) {
    return dm::guard<int32_t>(-1, [&] {
        const dm_context & c = context_of(ctx);
        const int32_t n = c.n_past();
        if (out) std::copy_n(c.tokens.begin(), std::min(n, std::max(n_max, 0)), out);
        return n;
    });
}

int32_t dm_context_truncate(dm_context * ctx, int32_t n) {
    return dm::guard<int32_t>(-1, [&] {
        context_of(ctx).truncate(n);
        return 0;
    });
}

int64_t dm_context_kv_size(const dm_context * ctx) {
    return dm::guard<int64_t>(-1, [&] { return static_cast<int64_t>(context_of(ctx).kv_bytes()); });
}

int32_t dm_context_kv_get(const dm_context * ctx, void * out, int64_t size) {
    return dm::guard<int32_t>(-1, [&] {
        const dm_context & c = context_of(ctx);
        const auto need = static_cast<int64_t>(c.kv_bytes());
        if (size != need) dm::fail("KV state needs %lld bytes, buffer holds %lld", static_cast<long long>(need), static_cast<long long>(size));
        if (size > 0 && !out) dm::fail("KV state: buffer is NULL");
        c.kv_get(out);
        return 0;
    });
}

int32_t dm_context_kv_set(dm_context * ctx, const dm_token * tokens, int32_t n_tokens, const void * data, int64_t size) {
    return dm::guard<int32_t>(-1, [&] {
        dm_context & c = context_of(ctx);
        if (size < 0) dm::fail("negative state size");
        if (n_tokens > 0 && !tokens) dm::fail("state tokens are NULL");
        if (size > 0 && !data) dm::fail("state KV data is NULL");
        c.kv_set(tokens, n_tokens, data, static_cast<size_t>(size));
        return 0;
    });
}
