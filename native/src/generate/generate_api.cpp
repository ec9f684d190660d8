// C API for the generation loop.
#include <deltamem.h>

#include "common/error.h"
#include "context/batch.h"
#include "generate/generator.h"

dm_generate_params dm_generate_default_params() {
    dm_generate_params p{};
    p.max_tokens = 16;
    p.write = true;
    p.seg_id = -1;
    return p;
}

// Checks a (pointer, count) pair of the caller.
static void check_array(const void * items, int32_t n, const char * what) {
    if (n < 0) dm::fail("generator: %s count is negative (%d)", what, n);
    if (n > 0 && !items) dm::fail("generator: %s are NULL", what);
}

dm_generator * dm_generator_new(dm_context * ctx, dm_sampler * sampler, dm_generate_params params) {
    return dm::guard<dm_generator *>(nullptr, [&] {
        if (!ctx || !sampler) dm::fail("generator: the context or the sampler is NULL");
        if (params.max_tokens < 0) dm::fail("max_tokens must be >= 0, got %d", params.max_tokens);
        check_array(params.stop, params.n_stop, "stop strings");
        check_array(params.stop_tokens, params.n_stop_tokens, "stop tokens");
        auto * gen = new dm_generator();
        gen->ctx = ctx;
        gen->sampler = sampler;
        gen->max_tokens = params.max_tokens;
        for (int32_t i = 0; i < params.n_stop; ++i) {
            if (params.stop[i] && params.stop[i][0]) gen->stop_strings.emplace_back(params.stop[i]);
        }
        gen->stop_tokens.assign(params.stop_tokens, params.stop_tokens + params.n_stop_tokens);
        gen->write = params.write;
        gen->seg_id = params.seg_id;
        return gen;
    });
}

void dm_generator_free(dm_generator * gen) { delete gen; }

int32_t dm_generator_run(dm_generator * gen, const dm_token * prompt, int32_t n_prompt, const int32_t * prompt_seg_ids,
                         dm_text_callback emit, void * user_data) {
    return dm::guard<int32_t>(-1, [&] {
        dm::deref(gen, "generator").run(prompt, n_prompt, prompt_seg_ids, emit, user_data);
        return 0;
    });
}

const dm_token * dm_generator_tokens(const dm_generator * gen, int32_t * n_tokens) {
    if (n_tokens) *n_tokens = 0;
    return dm::guard<const dm_token *>(nullptr, [&] {
        const dm_generator & g = dm::deref(gen, "generator");
        if (n_tokens) *n_tokens = static_cast<int32_t>(g.tokens.size());
        return g.tokens.data();
    });
}

const char * dm_generator_text(const dm_generator * gen, size_t * len) {
    if (len) *len = 0;
    return dm::guard<const char *>(nullptr, [&] {
        const dm_generator & g = dm::deref(gen, "generator");
        if (len) *len = g.text.size();
        return g.text.c_str();
    });
}

dm_finish_reason dm_generator_finish(const dm_generator * gen) {
    return dm::guard<dm_finish_reason>(DM_FINISH_LENGTH, [&] { return dm::deref(gen, "generator").finish; });
}

int32_t dm_generator_start(dm_generator * gen, const dm_token * prompt, int32_t n_prompt, const int32_t * prompt_seg_ids) {
    return dm::guard<int32_t>(-1, [&] {
        dm::deref(gen, "generator").start(prompt, n_prompt, prompt_seg_ids);
        return 0;
    });
}

int32_t dm_generators_step(dm_generator * const * gens, int32_t n, bool * running) {
    return dm::guard<int32_t>(-1, [&] {
        if (!gens || n <= 0 || !running) dm::fail("generators_step: no generators (NULL or n <= 0) or no output");
        std::vector<dm_batch_item> items;
        for (int32_t i = 0; i < n; ++i) {
            dm_generator & g = dm::deref(gens[i], "generator");
            if (!g.running()) dm::fail("generators_step: generator %d is not running (start it first)", i);
            // One that samples nothing (max_tokens 0: a prompt to decode only) skips the output layer.
            float * logits = g.will_sample() ? g.step_logits() : nullptr;
            items.push_back({g.ctx, g.to_decode().data(), static_cast<int32_t>(g.to_decode().size()), g.to_decode_seg_ids(),
                             g.write, logits ? DM_LOGITS_LAST : DM_LOGITS_NONE, logits});
        }
        dm_decode_batch(items);
        for (int32_t i = 0; i < n; ++i) running[i] = gens[i]->accept(items[static_cast<size_t>(i)].logits);
        return 0;
    });
}

const char * dm_generator_take_text(dm_generator * gen, size_t * len) {
    if (len) *len = 0;
    return dm::guard<const char *>(nullptr, [&] {
        const std::string & t = dm::deref(gen, "generator").take_text();
        if (len) *len = t.size();
        return t.c_str();
    });
}
