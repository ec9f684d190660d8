// Sampler chain: turns one row of logits into a token id.
//
// The chain works on an array of candidates (id, logit, p) that lives in the sampler and is
// reused from call to call, so sampling allocates nothing once the buffers have grown to the
// vocabulary size.
#pragma once

#include <deltamem.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace dm {

struct token_candidate {
    dm_token id;
    float    logit;
    float    p;
};

// The candidates still in play. `sorted` says they are in descending logit order, which lets
// top-p skip its sort after top-k.
struct candidate_array {
    std::vector<token_candidate> data;
    bool sorted = false;
};

// Throws dm::Error when a parameter is NaN or out of range.
void validate_sampler_params(const dm_sampler_params & params);

// Chain stages. Each keeps at least one candidate; each expects a non-empty array.
void apply_top_k    (candidate_array & cur, int32_t k, std::vector<token_candidate> & scratch_cands);
void apply_typical_p(candidate_array & cur, float p, std::vector<float> & scratch_scores,
                     std::vector<int32_t> & scratch_order, std::vector<token_candidate> & scratch_cands);
void apply_top_p    (candidate_array & cur, float p);
void apply_min_p    (candidate_array & cur, float min_p);
void apply_temperature(candidate_array & cur, float temperature);

// Fills p with the softmax of the logits; throws when every logit is -inf.
void softmax(candidate_array & cur);

// Index of the largest logit (the first one on ties).
size_t argmax(const candidate_array & cur);

} // namespace dm

struct dm_sampler {
    dm_sampler_params params;
    std::mt19937      rng;

    // The last params.penalty_last_n accepted tokens. It grows up to the window size, then
    // works as a ring in which history_head is the oldest token, the next to be overwritten.
    std::vector<dm_token> history;
    size_t                history_head = 0;

    std::vector<std::pair<dm_token, float>> logit_bias;   // sorted by token, unique

    // Reused working memory.
    dm::candidate_array                cur;
    std::vector<dm_token>              scratch_tokens;
    std::vector<float>                 scratch_scores;
    std::vector<int32_t>               scratch_order;
    std::vector<dm::token_candidate>   scratch_cands;

    explicit dm_sampler(const dm_sampler_params & p);

    void set_logit_bias(const dm_token * tokens, const float * biases, int32_t n);
    void accept(dm_token token);
    void reset();

    // Runs the chain up to the draw; afterwards cur holds the survivors with p filled in.
    void run_chain(const float * logits, int32_t n_vocab);
    dm_token draw();
    // The whole step: runs the chain, draws a token and accepts it.
    dm_token sample(const float * logits, int32_t n_vocab);

private:
    void load_logits(const float * logits, int32_t n_vocab);
    void apply_logit_bias(int32_t n_vocab);
    void apply_penalties(int32_t n_vocab);
    bool penalties_enabled() const;
};
