// C API of the sampler chain: argument checks and exception-to-error conversion only.
#include "sampling/sampling.h"

#include "common/error.h"

static void require_sampler(const dm_sampler * s) {
    if (s == nullptr) {
        dm::fail("sampler: NULL sampler");
    }
}

struct dm_sampler_params dm_sampler_default_params(void) {
    dm_sampler_params p;
    p.temperature       = 0.8f;
    p.top_k             = 40;
    p.top_p             = 0.95f;
    p.min_p             = 0.05f;
    p.typical_p         = 1.0f;
    p.repeat_penalty    = 1.0f;
    p.frequency_penalty = 0.0f;
    p.presence_penalty  = 0.0f;
    p.penalty_last_n    = 64;
    p.seed              = DM_SEED_RANDOM;
    return p;
}

dm_sampler * dm_sampler_new(struct dm_sampler_params params) {
    return dm::guard<dm_sampler *>(nullptr, [&] { return new dm_sampler(params); });
}

void dm_sampler_free(dm_sampler * s) {
    delete s;
}

int32_t dm_sampler_set_logit_bias(dm_sampler * s, const dm_token * tokens, const float * biases, int32_t n) {
    return dm::guard<int32_t>(-1, [&] {
        require_sampler(s);
        s->set_logit_bias(tokens, biases, n);
        return 0;
    });
}

void dm_sampler_accept(dm_sampler * s, dm_token token) {
    // The history can grow here, so an allocation failure must not cross the C boundary.
    dm::guard<int32_t>(-1, [&] {
        require_sampler(s);
        s->accept(token);
        return 0;
    });
}

int32_t dm_sampler_accept_tokens(dm_sampler * s, const dm_token * tokens, int32_t n) {
    return dm::guard<int32_t>(-1, [&] {
        require_sampler(s);
        if (n < 0 || (n > 0 && tokens == nullptr)) {
            dm::fail("sampler: accept_tokens needs n >= 0 tokens");
        }
        for (int32_t i = 0; i < n; ++i) {
            s->accept(tokens[i]);
        }
        return 0;
    });
}

void dm_sampler_reset(dm_sampler * s) {
    dm::guard<int32_t>(-1, [&] {
        require_sampler(s);
        s->reset();
        return 0;
    });
}

dm_token dm_sampler_sample(dm_sampler * s, const float * logits, int32_t n_vocab) {
    return dm::guard<dm_token>(-1, [&] {
        require_sampler(s);
        return s->sample(logits, n_vocab);
    });
}

int32_t dm_sampler_probs(dm_sampler * s, const float * logits, int32_t n_vocab, float * probs_out) {
    return dm::guard<int32_t>(-1, [&] {
        require_sampler(s);
        if (probs_out == nullptr) {
            dm::fail("sampler: probs_out is NULL");
        }
        s->run_chain(logits, n_vocab);
        for (int32_t i = 0; i < n_vocab; ++i) {
            probs_out[i] = 0.0f;
        }
        for (const dm::token_candidate & c : s->cur.data) {
            probs_out[c.id] = c.p;
        }
        return 0;
    });
}
