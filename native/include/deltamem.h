// deltamem.h: the plain C API of the pydeltamem engine.
//
// Conventions: functions that can fail return NULL or a negative value and leave a message for
// dm_last_error() (thread-local). Nothing here aborts the process on bad input.
#ifndef DELTAMEM_H
#define DELTAMEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t dm_token;
typedef struct dm_model   dm_model;
typedef struct dm_context dm_context;
typedef struct dm_sampler dm_sampler;

// Message of the last failed call on this thread ("" when none).
const char * dm_last_error(void);

// ---- model -------------------------------------------------------------------------------------

struct dm_model_params {
    const char * adapter_path;   // δ-mem adapter GGUF, or NULL (a packed model loads its own)
    bool         use_mmap;       // map weights from the file instead of reading them
};
struct dm_model_params dm_model_default_params(void);

dm_model * dm_model_load(const char * path, struct dm_model_params params);
void       dm_model_free(dm_model * model);

const char * dm_model_arch      (const dm_model * model);
int32_t      dm_model_n_vocab   (const dm_model * model);
int32_t      dm_model_n_ctx_train(const dm_model * model);
int32_t      dm_model_n_layer   (const dm_model * model);
int32_t      dm_model_n_embd    (const dm_model * model);

// GGUF metadata, in file order. Values are rendered as text; arrays are summarised
// ("[i32; 49152]") unless short (then JSON). Type names are gguf_type_name()s ("u32", "str", "f32") or "array".
int32_t      dm_model_meta_count  (const dm_model * model);
const char * dm_model_meta_key    (const dm_model * model, int32_t i);
const char * dm_model_meta_type   (const dm_model * model, int32_t i);
// Writes the value of key i into buf (NUL-terminated, truncated to size); returns its full length.
int32_t      dm_model_meta_value  (const dm_model * model, int32_t i, char * buf, size_t size);

// ---- context: one sequence, its KV cache (and δ-mem state) --------------------------------------

enum dm_kv_type { DM_KV_F16 = 0, DM_KV_F32 = 1 };

struct dm_context_params {
    int32_t         n_ctx;       // KV cache length in tokens (0: the model's training context)
    int32_t         n_batch;     // prefill chunk size
    int32_t         n_threads;   // <= 0: physical cores
    enum dm_kv_type kv_type;
};
struct dm_context_params dm_context_default_params(void);

dm_context * dm_context_new (dm_model * model, struct dm_context_params params);
void         dm_context_free(dm_context * ctx);

int32_t dm_context_n_ctx  (const dm_context * ctx);
int32_t dm_context_n_past (const dm_context * ctx);
void    dm_context_reset  (dm_context * ctx);   // forget every token (KV cache and history)

enum dm_logits { DM_LOGITS_NONE = 0, DM_LOGITS_LAST = 1, DM_LOGITS_ALL = 2 };

// Appends tokens to the sequence. logits_out receives n_vocab floats (LAST) or
// n_tokens * n_vocab floats (ALL); it may be NULL for NONE. Returns 0, or -1 on error
// (bad token id, empty input, context overflow), in which case the context is unchanged.
int32_t dm_decode(dm_context * ctx, const dm_token * tokens, int32_t n_tokens,
                  enum dm_logits which, float * logits_out);

// ---- vocab (tokenizer; native/src/vocab) ---------------------------------------------------------

// ---- sampling (sampler chain; native/src/sampling) -----------------------------------------------

//
// One sampler per generated sequence. Stages, in llama-cpp-python's order:
//   logit bias -> penalties -> top-k -> typical-p -> top-p -> min-p -> temperature -> draw.
// top-k, typical-p, top-p and min-p see the logits at temperature 1; every stage keeps at
// least one candidate. A sampler is not thread-safe: use one per thread (or lock it).

#define DM_SEED_RANDOM 0xFFFFFFFFu   // seed value that asks for a random seed

struct dm_sampler_params {
    float    temperature;        // <= 0: greedy (argmax after bias and penalties); must be finite
    int32_t  top_k;              // keep the k most likely tokens; <= 0: off
    float    top_p;              // nucleus: smallest prefix with mass >= top_p; in [0, 1], 1: off
    float    min_p;              // keep p_i >= min_p * p_max; in [0, 1], 0: off
    float    typical_p;          // locally typical sampling mass; in [0, 1], 1: off
    float    repeat_penalty;     // logit > 0 ? logit / rp : logit * rp; > 0, 1: off
    float    frequency_penalty;  // logit -= count * frequency_penalty; finite, 0: off
    float    presence_penalty;   // logit -= presence_penalty if count > 0; finite, 0: off
    int32_t  penalty_last_n;     // penalty window in accepted tokens; >= 0, 0: no penalties
    uint32_t seed;               // RNG seed (std::mt19937); DM_SEED_RANDOM: random
};

// llama-cpp-python's create_completion defaults: temperature 0.8, top_k 40, top_p 0.95,
// min_p 0.05, typical_p 1, repeat_penalty 1, frequency/presence 0, last_n 64, random seed.
struct dm_sampler_params dm_sampler_default_params(void);

// NULL (and dm_last_error()) on invalid params: NaN or out-of-range values.
dm_sampler * dm_sampler_new (struct dm_sampler_params params);
void         dm_sampler_free(dm_sampler * s);   // NULL is fine

// Replaces the logit biases (added to the logits before anything else) with n pairs; n = 0
// clears them. -INFINITY bans a token; +inf and NaN are errors; a token listed twice keeps its
// last bias. Tokens must be >= 0; ids beyond the vocabulary fail at sampling time.
// Returns 0, or -1 on error (the previous biases are kept).
int32_t dm_sampler_set_logit_bias(dm_sampler * s, const dm_token * tokens, const float * biases, int32_t n);

// Appends a token to the penalty history: feed the prompt tokens here; dm_sampler_sample
// accepts its own choices. Negative ids are ignored.
void dm_sampler_accept(dm_sampler * s, dm_token token);

// Clears the penalty history; params, biases and the RNG state are kept.
void dm_sampler_reset(dm_sampler * s);

// Runs the chain on n_vocab logits (NaN and +inf are errors, -inf is a banned token), draws a
// token, accepts it and returns it. -1 on error: n_vocab <= 0, a bad logit, a biased token
// outside the vocabulary, or every candidate at -inf.
dm_token dm_sampler_sample(dm_sampler * s, const float * logits, int32_t n_vocab);

// For tests and inspection: runs the chain up to, not including, the draw and writes each
// token's final probability to probs_out[n_vocab] (0 for removed tokens; one-hot when greedy).
// Neither accepts a token nor touches the RNG. Returns 0, or -1 on the errors of _sample.
int32_t dm_sampler_probs(dm_sampler * s, const float * logits, int32_t n_vocab, float * probs_out);

#ifdef __cplusplus
}
#endif

#endif // DELTAMEM_H
