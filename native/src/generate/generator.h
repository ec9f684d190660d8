// The generation loop: decode → sample → next, in C++ so that Python is touched at most once per
// emitted piece of text (and not at all without streaming).
#pragma once

#include <deltamem.h>

#include <string>
#include <vector>

struct dm_generator {
    dm_context * ctx = nullptr;
    dm_sampler * sampler = nullptr;
    int32_t      max_tokens = 16;
    std::vector<std::string> stop_strings;   // generation ends before the first occurrence of any
    std::vector<dm_token>    stop_tokens;    // extra end tokens besides the model's end-of-generation ones
    bool                     write = true;   // false: read the δ-mem memory without writing it
    int32_t                  seg_id = -1;    // δ-mem segment id of each generated token (-1: token writes)

    // Results of the last run.
    std::vector<dm_token> tokens;   // sampled tokens, the stopping end token excluded
    std::string           text;     // their text, cut before a stop string
    dm_finish_reason      finish = DM_FINISH_LENGTH;

    // Decodes the prompt (at least one token) and generates; emit receives each piece of text
    // that can no longer turn into a stop string, always ending on a whole UTF-8 character.
    void run(const dm_token * prompt, int32_t n_prompt, const int32_t * prompt_seg_ids, dm_text_callback emit,
             void * user_data);

    // The same loop a step at a time, for loops that decode several generators together
    // (dm_generators_step): start() takes the prompt; each step decodes to_decode() (the prompt,
    // then the last sampled token) and gives the logits to accept(), which samples and says whether
    // the generator goes on. The text that became final is kept for take_text().
    void start(const dm_token * prompt, int32_t n_prompt, const int32_t * prompt_seg_ids);
    bool running() const { return !finished; }
    const std::vector<dm_token> & to_decode() const { return next; }
    const int32_t * to_decode_seg_ids() const;
    // Whether the next accept() samples (and so needs logits); false: it ends the generator.
    bool will_sample() const { return static_cast<int32_t>(tokens.size()) < max_tokens; }
    // Room for the logits of a step (n_vocab floats), kept from step to step.
    float * step_logits();
    bool accept(const float * logits);
    // The text that became final since the last call (valid until the next call).
    const std::string & take_text();

private:
    size_t emitted = 0;   // bytes of text already given to the callback
    // The step loop's state.
    std::vector<dm_token> next;          // what the next step decodes
    std::vector<int32_t>  next_seg_ids;  // the prompt's ids (the first step only)
    bool                  finished = true;
    std::string           ready;         // final text not yet taken
    std::string           taken;         // what take_text() returned last
    std::vector<float>    logits_buf;    // step_logits()

    void reset_results();
    // Samples from the logits after the last decoded token; true with the token in next when
    // generation goes on. Emits as run() does.
    bool sample_next(const float * logits, dm_text_callback emit, void * user_data);

    bool is_end_token(dm_token t) const;
    // Appends the token's bytes; true when a stop string now occurs (text is then cut before it).
    bool append_piece(dm_token t);
    // Length of text that is safe to emit: no partial stop string or UTF-8 sequence at its end.
    size_t safe_length() const;
    bool emit_upto(size_t end, dm_text_callback emit, void * user_data);
};
