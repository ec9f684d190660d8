#include "sampling/sampling.h"

#include "common/error.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace dm {

static constexpr float k_neg_inf = -std::numeric_limits<float>::infinity();
static constexpr float k_pos_inf =  std::numeric_limits<float>::infinity();

static bool in_unit_interval(float x) {
    return x >= 0.0f && x <= 1.0f;   // false for NaN
}

void validate_sampler_params(const dm_sampler_params & p) {
    if (!std::isfinite(p.temperature)) {
        fail("sampler: temperature must be finite (got %g)", static_cast<double>(p.temperature));
    }
    if (!in_unit_interval(p.top_p)) {
        fail("sampler: top_p must be in [0, 1] (got %g)", static_cast<double>(p.top_p));
    }
    if (!in_unit_interval(p.min_p)) {
        fail("sampler: min_p must be in [0, 1] (got %g)", static_cast<double>(p.min_p));
    }
    if (!in_unit_interval(p.typical_p)) {
        fail("sampler: typical_p must be in [0, 1] (got %g)", static_cast<double>(p.typical_p));
    }
    if (!(std::isfinite(p.repeat_penalty) && p.repeat_penalty > 0.0f)) {
        fail("sampler: repeat_penalty must be finite and > 0 (got %g)", static_cast<double>(p.repeat_penalty));
    }
    if (!std::isfinite(p.frequency_penalty)) {
        fail("sampler: frequency_penalty must be finite (got %g)", static_cast<double>(p.frequency_penalty));
    }
    if (!std::isfinite(p.presence_penalty)) {
        fail("sampler: presence_penalty must be finite (got %g)", static_cast<double>(p.presence_penalty));
    }
    if (p.penalty_last_n < 0) {
        fail("sampler: penalty_last_n must be >= 0 (got %d)", p.penalty_last_n);
    }
}

static bool by_logit_desc(const token_candidate & a, const token_candidate & b) {
    return a.logit > b.logit;
}

void softmax(candidate_array & cur) {
    float max_logit = k_neg_inf;
    for (const token_candidate & c : cur.data) {
        max_logit = std::max(max_logit, c.logit);
    }
    if (max_logit == k_neg_inf) {
        fail("sampler: every candidate token has logit -inf (all banned)");
    }
    if (max_logit == k_pos_inf) {
        // Only float overflow in extreme penalties or a tiny temperature gets here: share the
        // mass among the infinite logits instead of producing NaN.
        size_t n_inf = 0;
        for (const token_candidate & c : cur.data) {
            n_inf += c.logit == k_pos_inf;
        }
        for (token_candidate & c : cur.data) {
            c.p = c.logit == k_pos_inf ? 1.0f / static_cast<float>(n_inf) : 0.0f;
        }
        return;
    }
    double sum = 0.0;
    for (token_candidate & c : cur.data) {
        c.p = std::exp(c.logit - max_logit);
        sum += c.p;
    }
    // sum >= 1: the maximum contributes exp(0).
    for (token_candidate & c : cur.data) {
        c.p = static_cast<float>(c.p / sum);
    }
}

size_t argmax(const candidate_array & cur) {
    size_t best = 0;
    for (size_t i = 1; i < cur.data.size(); ++i) {
        if (cur.data[i].logit > cur.data[best].logit) {
            best = i;
        }
    }
    return best;
}

void apply_top_k(candidate_array & cur, int32_t k, std::vector<token_candidate> & scratch_cands) {
    if (k <= 0 || static_cast<size_t>(k) >= cur.data.size()) {
        return;
    }
    // One pass with a min-heap of the best k so far: for the usual k = 40 almost every token
    // costs a single comparison with the heap's weakest member, which beats nth_element over
    // a 50k-150k vocabulary several times over.
    const size_t n_keep = static_cast<size_t>(k);
    std::vector<token_candidate> & heap = scratch_cands;   // front(): the smallest logit kept
    heap.assign(cur.data.begin(), cur.data.begin() + k);
    std::make_heap(heap.begin(), heap.end(), by_logit_desc);
    for (size_t i = n_keep; i < cur.data.size(); ++i) {
        if (cur.data[i].logit > heap.front().logit) {
            std::pop_heap(heap.begin(), heap.end(), by_logit_desc);
            heap.back() = cur.data[i];
            std::push_heap(heap.begin(), heap.end(), by_logit_desc);
        }
    }
    std::sort_heap(heap.begin(), heap.end(), by_logit_desc);   // leaves descending logits
    std::copy(heap.begin(), heap.end(), cur.data.begin());
    cur.data.resize(n_keep);   // shrinking keeps the capacity for the next call
    cur.sorted = true;
}

void apply_typical_p(candidate_array & cur, float p, std::vector<float> & scratch_scores,
                     std::vector<int32_t> & scratch_order, std::vector<token_candidate> & scratch_cands) {
    if (p >= 1.0f || cur.data.size() <= 1) {
        return;
    }
    softmax(cur);
    const size_t n = cur.data.size();

    double entropy = 0.0;
    for (const token_candidate & c : cur.data) {
        if (c.p > 0.0f) {
            entropy -= static_cast<double>(c.p) * std::log(static_cast<double>(c.p));
        }
    }
    // Typicality: how far a token's surprisal is from the expected surprisal (the entropy).
    // Banned tokens (p = 0) get +inf and go last.
    scratch_scores.resize(n);
    scratch_order.resize(n);
    for (size_t i = 0; i < n; ++i) {
        const double surprisal = -std::log(static_cast<double>(cur.data[i].p));
        scratch_scores[i] = static_cast<float>(std::fabs(surprisal - entropy));
        scratch_order[i]  = static_cast<int32_t>(i);
    }
    // Ties broken by position keep the result deterministic without a stable sort's buffer.
    std::sort(scratch_order.begin(), scratch_order.end(), [&](int32_t a, int32_t b) {
        const float sa = scratch_scores[static_cast<size_t>(a)];
        const float sb = scratch_scores[static_cast<size_t>(b)];
        return sa < sb || (sa == sb && a < b);
    });

    size_t n_keep = n;
    double mass = 0.0;
    for (size_t i = 0; i < n; ++i) {
        mass += cur.data[static_cast<size_t>(scratch_order[i])].p;
        if (mass > static_cast<double>(p)) {
            n_keep = i + 1;
            break;
        }
    }
    scratch_cands.resize(n_keep);
    for (size_t i = 0; i < n_keep; ++i) {
        scratch_cands[i] = cur.data[static_cast<size_t>(scratch_order[i])];
    }
    std::copy(scratch_cands.begin(), scratch_cands.end(), cur.data.begin());
    cur.data.resize(n_keep);
    cur.sorted = false;
}

void apply_top_p(candidate_array & cur, float p) {
    if (p >= 1.0f || cur.data.size() <= 1) {
        return;
    }
    softmax(cur);
    const size_t n     = cur.data.size();
    const auto   begin = cur.data.begin();
    // Without top-k in front the array is the whole vocabulary, yet the nucleus of a real model
    // is usually a few hundred tokens: sort growing chunks of the best remaining candidates
    // until the mass is reached instead of sorting everything.
    size_t n_sorted = cur.sorted ? n : 0;   // [0, n_sorted) is sorted and holds the best
    size_t chunk    = 256;
    double mass     = 0.0;
    for (size_t i = 0; i < n; ++i) {
        if (i == n_sorted) {
            const size_t end = std::min(n, n_sorted + chunk);
            if (end < n) {
                std::nth_element(begin + n_sorted, begin + end, cur.data.end(), by_logit_desc);
            }
            std::sort(begin + n_sorted, begin + end, by_logit_desc);
            n_sorted = end;
            chunk   *= 4;
        }
        mass += cur.data[i].p;
        if (mass >= static_cast<double>(p)) {
            cur.data.resize(i + 1);
            break;
        }
    }
    cur.sorted = true;
}

void apply_min_p(candidate_array & cur, float min_p) {
    if (min_p <= 0.0f || cur.data.size() <= 1) {
        return;
    }
    float max_logit = k_neg_inf;
    for (const token_candidate & c : cur.data) {
        max_logit = std::max(max_logit, c.logit);
    }
    if (max_logit == k_neg_inf) {
        return;   // all banned: the final softmax reports it
    }
    // p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p); no softmax needed, and the
    // maximum always passes because log(min_p) <= 0.
    const float threshold = max_logit + std::log(min_p);
    const auto  removed   = std::remove_if(cur.data.begin(), cur.data.end(),
        [threshold](const token_candidate & c) { return !(c.logit >= threshold); });
    cur.data.erase(removed, cur.data.end());   // order-preserving, so `sorted` still holds
}

void apply_temperature(candidate_array & cur, float temperature) {
    if (temperature == 1.0f) {
        return;
    }
    for (token_candidate & c : cur.data) {
        c.logit /= temperature;
    }
}

} // namespace dm

// ---- dm_sampler ------------------------------------------------------------------------------

static std::mt19937::result_type resolve_seed(uint32_t seed) {
    if (seed == DM_SEED_RANDOM) {
        return std::random_device{}();
    }
    return seed;
}

dm_sampler::dm_sampler(const dm_sampler_params & p) : params(p) {
    dm::validate_sampler_params(p);
    rng.seed(resolve_seed(p.seed));
    history.reserve(static_cast<size_t>(std::min<int32_t>(p.penalty_last_n, 4096)));
}

void dm_sampler::set_logit_bias(const dm_token * tokens, const float * biases, int32_t n) {
    if (n < 0) {
        dm::fail("sampler: logit bias count must be >= 0 (got %d)", n);
    }
    if (n > 0 && (tokens == nullptr || biases == nullptr)) {
        dm::fail("sampler: logit bias arrays are NULL");
    }
    std::vector<std::pair<dm_token, float>> next;
    next.reserve(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) {
        if (tokens[i] < 0) {
            dm::fail("sampler: logit bias token id %d is negative", tokens[i]);
        }
        if (std::isnan(biases[i]) || biases[i] == dm::k_pos_inf) {
            dm::fail("sampler: logit bias for token %d must be finite or -inf (got %g)",
                     tokens[i], static_cast<double>(biases[i]));
        }
        next.emplace_back(tokens[i], biases[i]);
    }
    // Stable, so of duplicate tokens the last one given ends each run and wins.
    std::stable_sort(next.begin(), next.end(),
        [](const auto & a, const auto & b) { return a.first < b.first; });
    size_t n_unique = 0;
    for (size_t i = 0; i < next.size(); ++i) {
        if (n_unique > 0 && next[n_unique - 1].first == next[i].first) {
            next[n_unique - 1] = next[i];
        } else {
            next[n_unique++] = next[i];
        }
    }
    next.resize(n_unique);
    logit_bias.swap(next);
}

void dm_sampler::accept(dm_token token) {
    if (token < 0 || params.penalty_last_n == 0) {
        return;
    }
    const size_t window = static_cast<size_t>(params.penalty_last_n);
    if (history.size() < window) {
        history.push_back(token);   // grows only with real history, not with the window size
        return;
    }
    history[history_head] = token;
    history_head = (history_head + 1) % window;
}

void dm_sampler::reset() {
    history.clear();
    history_head = 0;
}

bool dm_sampler::penalties_enabled() const {
    return params.penalty_last_n > 0 &&
           (params.repeat_penalty != 1.0f || params.frequency_penalty != 0.0f || params.presence_penalty != 0.0f);
}

void dm_sampler::load_logits(const float * logits, int32_t n_vocab) {
    if (n_vocab <= 0) {
        dm::fail("sampler: n_vocab must be > 0 (got %d)", n_vocab);
    }
    if (logits == nullptr) {
        dm::fail("sampler: logits are NULL");
    }
    cur.data.resize(static_cast<size_t>(n_vocab));
    cur.sorted = false;
    for (int32_t i = 0; i < n_vocab; ++i) {
        const float x = logits[i];
        // NaN would break the strict weak ordering the sorts rely on; -inf is a legitimate mask.
        if (std::isnan(x) || x == dm::k_pos_inf) {
            dm::fail("sampler: logit of token %d is %g", i, static_cast<double>(x));
        }
        cur.data[static_cast<size_t>(i)] = { i, x, 0.0f };
    }
}

// Both bias and penalties run while cur.data[i].id == i, so a token's candidate is found by index.
void dm_sampler::apply_logit_bias(int32_t n_vocab) {
    if (logit_bias.empty()) {
        return;
    }
    if (logit_bias.back().first >= n_vocab) {
        dm::fail("sampler: logit bias token %d is outside the vocabulary (%d tokens)",
                 logit_bias.back().first, n_vocab);
    }
    for (const auto & [token, bias] : logit_bias) {
        cur.data[static_cast<size_t>(token)].logit += bias;
    }
}

void dm_sampler::apply_penalties(int32_t n_vocab) {
    if (!penalties_enabled() || history.empty()) {
        return;
    }
    // Counting by sorting a copy of the window keeps this allocation-free and cheap for the
    // usual window of 64 tokens.
    scratch_tokens.assign(history.begin(), history.end());
    std::sort(scratch_tokens.begin(), scratch_tokens.end());

    const float rp = params.repeat_penalty;
    for (size_t i = 0; i < scratch_tokens.size();) {
        const dm_token token = scratch_tokens[i];
        size_t count = 0;
        while (i < scratch_tokens.size() && scratch_tokens[i] == token) {
            ++count;
            ++i;
        }
        if (token >= n_vocab) {
            continue;   // accepted from elsewhere; not a token of these logits
        }
        float & logit = cur.data[static_cast<size_t>(token)].logit;
        if (logit == dm::k_neg_inf) {
            continue;   // banned stays banned (and -inf - -inf would be NaN)
        }
        logit = logit > 0.0f ? logit / rp : logit * rp;
        logit -= static_cast<float>(count) * params.frequency_penalty + params.presence_penalty;
        if (std::isnan(logit)) {
            logit = dm::k_neg_inf;   // inf - inf after float overflow with absurd penalties
        }
    }
}

void dm_sampler::run_chain(const float * logits, int32_t n_vocab) {
    load_logits(logits, n_vocab);
    apply_logit_bias(n_vocab);
    apply_penalties(n_vocab);

    if (params.temperature <= 0.0f) {
        const size_t best = dm::argmax(cur);
        if (cur.data[best].logit == dm::k_neg_inf) {
            dm::fail("sampler: every candidate token has logit -inf (all banned)");
        }
        cur.data[0]   = cur.data[best];
        cur.data[0].p = 1.0f;
        cur.data.resize(1);
        cur.sorted = true;
        return;
    }

    dm::apply_top_k(cur, params.top_k, scratch_cands);
    dm::apply_typical_p(cur, params.typical_p, scratch_scores, scratch_order, scratch_cands);
    dm::apply_top_p(cur, params.top_p);
    dm::apply_min_p(cur, params.min_p);
    dm::apply_temperature(cur, params.temperature);
    dm::softmax(cur);
}

dm_token dm_sampler::sample(const float * logits, int32_t n_vocab) {
    run_chain(logits, n_vocab);
    const dm_token token = draw();
    accept(token);
    return token;
}

dm_token dm_sampler::draw() {
    // u in [0, 1) from 32 raw bits: mt19937's output is specified by the standard, while
    // std::uniform_real_distribution is not, so the same seed gives the same tokens everywhere.
    const double u = static_cast<double>(rng()) * (1.0 / 4294967296.0);
    double mass = 0.0;
    dm_token last_possible = cur.data.front().id;
    for (const dm::token_candidate & c : cur.data) {
        if (c.p <= 0.0f) {
            continue;
        }
        mass += c.p;
        last_possible = c.id;
        if (u < mass) {
            return c.id;
        }
    }
    return last_possible;   // rounding left the total mass a hair under u
}
