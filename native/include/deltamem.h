// deltamem.h: the plain C API of the pydeltamem engine.
//
// Conventions: functions that can fail return NULL or a negative value and leave a message for
// dm_last_error() (thread-local). Nothing here aborts the process on bad input: every function that
// takes a handle accepts NULL and fails with "... is NULL" (the _free functions do nothing), and
// functions without a failure value (void, bool, enum returns) still set dm_last_error().
//
// Threads: a model may be used from several threads at once (tokenizing, and any number of
// contexts decoding against it). A context, a sampler and a generator are used by one thread at a
// time; freeing an object while another thread uses it, or a model before its contexts, is the
// caller's error (the Python bindings serialise calls and make closing wait for them).
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
typedef struct dm_generator dm_generator;

// Message of the last failed call on this thread ("" when none).
const char * dm_last_error(void);

// What the ggml CPU backend this engine runs on was built with, as ggml reports it
// ("AVX2 = 1 | F16C = 1 | ... | REPACK = 1"; OPENMP and LLAMAFILE appear in native builds).
const char * dm_system_info(void);

// ---- devices (native/src/device) ---------------------------------------------------------------

struct dm_device_info {
    const char * name;          // "CPU", "CUDA0", "RPC0", ...
    const char * description;   // the hardware, or the RPC server's host:port
    const char * type;          // "cpu", "gpu", "igpu", "accel"
    size_t       free;          // bytes of memory free and in all
    size_t       total;
};
// The backends this build's ggml has, comma-separated: "CPU", "CPU, RPC", "CUDA, CPU", ...
const char * dm_backends(void);
// The devices of ggml's registry (with the RPC servers added so far). Returns the count.
int32_t dm_device_count(void);
// Fills *out for device i (strings live as long as the process). Returns 0, or -1 on error.
int32_t dm_device_get(int32_t i, struct dm_device_info * out);
// Adds the devices of RPC servers ("host:port,host:port"). Returns 0, or -1 (no RPC in this
// build, a server that does not answer).
int32_t dm_rpc_add_servers(const char * servers);
// Serves this machine's devices (its GPUs, else the CPU) over ggml's RPC protocol on "host:port"
// with n_threads CPU threads. The protocol has no authentication: bind to loopback or a trusted
// network only. Blocks while serving; returns -1 when it cannot serve.
int32_t dm_rpc_serve(const char * endpoint, int32_t n_threads);

// ---- model -------------------------------------------------------------------------------------

struct dm_model_params {
    const char * adapter_path;   // δ-mem adapter GGUF, or NULL (a packed model loads its own)
    bool         use_mmap;       // map weights from the file instead of reading them
    bool         use_repack;     // move mat-mul weights to faster layouts: ggml's repack buffer, the AMX kernel's
    // Devices, as llama.cpp counts them. n_gpu_layers: how many layers go to the offload devices
    // (this machine's GPUs, then the devices of rpc_servers), the last ones first; -1 (or more
    // than the model has) offloads every layer and the output (which goes with the last layer).
    // tensor_split: n_tensor_split proportions of the offloaded layers per offload device; NULL
    // puts them all on device main_gpu. rpc_servers: "host:port,host:port" (NULL: none).
    int32_t      n_gpu_layers;
    int32_t      main_gpu;
    const float * tensor_split;
    int32_t      n_tensor_split;
    const char * rpc_servers;
};
struct dm_model_params dm_model_default_params(void);

dm_model * dm_model_load(const char * path, struct dm_model_params params);
void       dm_model_free(dm_model * model);

const char * dm_model_arch      (const dm_model * model);
int32_t      dm_model_n_vocab   (const dm_model * model);
int32_t      dm_model_n_ctx_train(const dm_model * model);
int32_t      dm_model_n_layer   (const dm_model * model);
int32_t      dm_model_n_embd    (const dm_model * model);
int32_t      dm_model_n_repacked(const dm_model * model);   // weights moved to those layouts
// Name of the device that computes layer il (0 <= il < n_layer; il == n_layer: the output layer),
// "CPU" when the host does, or NULL on error.
const char * dm_model_layer_device(const dm_model * model, int32_t il);

// GGUF metadata, in file order. Values are rendered as text; arrays are summarised
// ("[i32; 49152]") unless short (then JSON). Type names are gguf_type_name()s ("u32", "str", "f32") or "array".
int32_t      dm_model_meta_count  (const dm_model * model);
const char * dm_model_meta_key    (const dm_model * model, int32_t i);
const char * dm_model_meta_type   (const dm_model * model, int32_t i);
// Writes the value of key i into buf (NUL-terminated, truncated to size); returns its full length.
int32_t      dm_model_meta_value  (const dm_model * model, int32_t i, char * buf, size_t size);

// ---- context: one sequence, its KV cache (and δ-mem state) --------------------------------------

enum dm_kv_type { DM_KV_F16 = 0, DM_KV_F32 = 1 };

#define DM_MAX_THREADS 512   // most worker threads a context may have (ggml's GGML_MAX_N_THREADS)

struct dm_context_params {
    int32_t         n_ctx;       // KV cache length in tokens (0: the model's training context)
    int32_t         n_batch;     // prefill chunk size
    int32_t         n_threads;   // <= 0: physical cores; at most DM_MAX_THREADS
    enum dm_kv_type kv_type;
    bool            dmem_fused;  // δ-mem of CPU layers as fused CPU ops (true), or as the device ops
                                 // (ggml_gated_delta_net) that offloaded layers always use
    int32_t         poll;        // 0..100: how long idle worker threads poll for the next pass before they
                                 // sleep (ggml's threadpool poll; 50 default, 0 sleeps at once: a host that
                                 // wants idle cores). A pass pauses the idle pool of the context that ran
                                 // the one before it, so contexts taking turns do not compete.
};
struct dm_context_params dm_context_default_params(void);

dm_context * dm_context_new (dm_model * model, struct dm_context_params params);
void         dm_context_free(dm_context * ctx);

// Asked, from the thread doing the work, between the passes of a decode and after every node of a
// pass; returning true aborts the call, which then fails with "aborted". The sequence is left as it
// was before the call, but the δ-mem memory may keep the writes of the aborted call's finished passes.
// Any thread may make it return true while another decodes (e.g. to close the context soon).
typedef bool (*dm_abort_callback)(void * user_data);
// Sets (callback NULL: removes) the abort callback of ctx. Returns 0, or -1 when ctx is NULL.
int32_t      dm_context_set_abort_callback(dm_context * ctx, dm_abort_callback callback, void * user_data);

int32_t dm_context_n_ctx  (const dm_context * ctx);
// Graph splits of the context's last pass: 1 on the CPU alone, one more per change of device.
int32_t dm_context_n_splits(const dm_context * ctx);
int32_t dm_context_n_past (const dm_context * ctx);
void    dm_context_reset  (dm_context * ctx);   // forget every token (KV cache and history)

enum dm_logits { DM_LOGITS_NONE = 0, DM_LOGITS_LAST = 1, DM_LOGITS_ALL = 2 };

// Appends tokens to the sequence. logits_out receives n_vocab floats (LAST) or
// n_tokens * n_vocab floats (ALL); it may be NULL for NONE. Returns 0, or -1 on error
// (bad token id, empty input, context overflow, aborted), in which case the sequence is unchanged.
int32_t dm_decode(dm_context * ctx, const dm_token * tokens, int32_t n_tokens,
                  enum dm_logits which, float * logits_out);

// dm_decode with δ-mem controls: seg_ids (NULL, or one id per token) are the message or sentence
// ids that a segment-mean adapter averages its writes over (-1: never writes); write = false only
// reads the memory. Without an adapter they are ignored.
int32_t dm_decode_ext(dm_context * ctx, const dm_token * tokens, int32_t n_tokens, enum dm_logits which,
                      float * logits_out, const int32_t * seg_ids, bool write);

// One context's part of a batched decode.
struct dm_batch_entry {
    dm_context *     ctx;
    const dm_token * tokens;
    int32_t          n_tokens;
    const int32_t *  seg_ids;   // NULL, or one id per token (as dm_decode_ext)
    bool             write;     // false: reads the memory only
    float *          logits;    // as dm_decode's logits_out (n_vocab floats, or n_tokens * n_vocab)
};
// Decodes every entry's tokens into its context (all of one model, each once) in shared forward
// passes: every weight is read once for all the tokens, attention and δ-mem run per context over
// its own cache and memory. Each context ends as dm_decode_ext of its tokens alone would leave it.
// Returns 0, or -1 with every context as it was before the call, its memory included (the error
// names the entry at fault: "context 2: ...").
int32_t dm_decode_batch(const struct dm_batch_entry * entries, int32_t n_entries, enum dm_logits which);

dm_model * dm_context_model(const dm_context * ctx);

// ---- δ-mem memory and context state ---------------------------------------------------------------

// The adapter of a model as JSON (rank, heads, modes, layers, fingerprint), or NULL without one.
const char * dm_model_adapter_info(const dm_model * model);
// Floats of the memory: n_target_layers * H * r * r (0 without an adapter).
int64_t dm_memory_size (const dm_context * ctx);
// Copies the memory out/in, as [layer][head][row][col] float32. Return 0, or -1 on error.
int32_t dm_memory_get  (const dm_context * ctx, float * out, int64_t n);
int32_t dm_memory_set  (dm_context * ctx, const float * in, int64_t n);
void    dm_memory_reset(dm_context * ctx);

// KV cache rows of the current sequence, per layer keys then values: bytes needed, then a copy.
int64_t dm_context_kv_size(const dm_context * ctx);
int32_t dm_context_kv_get (const dm_context * ctx, void * out, int64_t size);
// Replaces the sequence with tokens[n_tokens] and their KV rows (from dm_context_kv_get of a
// context of the same model and KV type). Returns 0, or -1 on error.
int32_t dm_context_kv_set (dm_context * ctx, const dm_token * tokens, int32_t n_tokens, const void * data, int64_t size);
// Copies up to n_max tokens of the sequence into out; returns the sequence length.
int32_t dm_context_tokens(const dm_context * ctx, dm_token * out, int32_t n_max);
// Keeps the first n tokens of the sequence (0 <= n <= n_past). Returns 0, or -1 on error.
int32_t dm_context_truncate(dm_context * ctx, int32_t n);

// ---- generation: decode → sample → next, in C++ -----------------------------------------------

enum dm_finish_reason { DM_FINISH_LENGTH = 0, DM_FINISH_STOP = 1 };

// Receives generated text as it becomes final; return false to stop generating.
typedef bool (*dm_text_callback)(const char * text, size_t len, void * user_data);

struct dm_generate_params {
    int32_t              max_tokens;     // tokens to sample at most
    const char * const * stop;           // stop strings: text ends before the first occurrence
    int32_t              n_stop;
    const dm_token *     stop_tokens;    // extra end tokens (the model's end-of-generation tokens always stop)
    int32_t              n_stop_tokens;
    bool                 write;          // false: the prompt and the generated tokens read the δ-mem memory only
    int32_t              seg_id;         // δ-mem segment id of each generated token (a segment-mean adapter's
                                         // message or sentence id of the reply); -1: none, token writes
};
// 16 tokens, no stop strings or extra end tokens, write = true, seg_id = -1.
struct dm_generate_params dm_generate_default_params(void);

// The generator borrows ctx and sampler; free it before them.
dm_generator * dm_generator_new (dm_context * ctx, dm_sampler * sampler, struct dm_generate_params params);
void           dm_generator_free(dm_generator * gen);
// Decodes prompt (n_prompt >= 1; prompt_seg_ids: NULL or its δ-mem segment ids, see dm_decode_ext)
// and generates; each generated token is decoded as its own call (see params.write, params.seg_id). emit may be
// NULL. Returns 0, or -1 on error. The last sampled token is not decoded: the context holds prompt + all
// generated tokens but the last.
int32_t        dm_generator_run (dm_generator * gen, const dm_token * prompt, int32_t n_prompt,
                                 const int32_t * prompt_seg_ids, dm_text_callback emit, void * user_data);
// Results of the last run (NULL with *n_tokens / *len = 0, or DM_FINISH_LENGTH, for a NULL gen).
const dm_token *      dm_generator_tokens(const dm_generator * gen, int32_t * n_tokens);
const char *          dm_generator_text  (const dm_generator * gen, size_t * len);
enum dm_finish_reason dm_generator_finish(const dm_generator * gen);

// Continuous batching, a step at a time: several generators (each with its own context, all of
// one model) advance together, one batched decode a step (dm_decode_batch), so that a generator
// may join between any two steps (dm_generator_start) and leave when it finishes.
// dm_generator_start takes the prompt (at least one token; seg_ids as dm_generator_run's) and
// clears the last results; the generator's next step decodes it.
int32_t dm_generator_start(dm_generator * gen, const dm_token * prompt, int32_t n_prompt, const int32_t * prompt_seg_ids);
// Decodes every generator's next tokens (a started one's prompt, a running one's last token) in
// one batch, then samples each: running[i] says whether generator i goes on (false: finished;
// dm_generator_finish says why). Its tokens and text grow as dm_generator_run's would. Returns 0,
// or -1 with every context and generator as before the step.
int32_t dm_generators_step(dm_generator * const * gens, int32_t n, bool * running);
// The text of gen that became final since the last call (no partial stop string or UTF-8
// character at its end; everything once it finished); valid until the next call on gen.
const char * dm_generator_take_text(dm_generator * gen, size_t * len);

// ---- vocab (tokenizer; native/src/vocab) ---------------------------------------------------------

// Byte-level BPE from the GGUF's tokenizer.ggml.* metadata (tokenizer.ggml.model = "gpt2"). A model
// without tokenizer metadata loads, but tokenizing with it fails.

// Tokenizes text (UTF-8, len bytes; invalid UTF-8 bytes are kept as raw bytes). add_special adds
// BOS/EOS where the GGUF asks for them (tokenizer.ggml.add_bos_token / add_eos_token). With
// parse_special, the text of control tokens (e.g. "<|im_start|>") becomes those tokens; otherwise it
// is plain text. User-defined added tokens are always recognised, as Hugging Face does.
// Returns the token count, or -(count needed) when n_max is too small (out is then unspecified),
// or INT32_MIN on error (message in dm_last_error()).
int32_t  dm_tokenize(const dm_model * model, const char * text, int32_t len, dm_token * out, int32_t n_max,
                     bool add_special, bool parse_special);
// Bytes of one token; special tokens render as their text only when special is true (else empty).
// Returns the length, -(length needed) when size is too small, or INT32_MIN on error (bad token id).
int32_t  dm_token_to_piece(const dm_model * model, dm_token token, char * buf, int32_t size, bool special);
// Concatenated bytes of tokens (no NUL appended); same return convention as dm_token_to_piece.
int32_t  dm_detokenize(const dm_model * model, const dm_token * tokens, int32_t n_tokens, char * buf,
                       int32_t size, bool special);
dm_token dm_token_bos(const dm_model * model);   // -1 when the model has none
dm_token dm_token_eos(const dm_model * model);
dm_token dm_token_eot(const dm_model * model);   // end of turn (e.g. <|im_end|>), -1 when none
bool     dm_token_is_eog(const dm_model * model, dm_token token);   // eos, eot and other end-of-generation tokens
bool     dm_token_is_control(const dm_model * model, dm_token token);
// Text of a token exactly as stored in the GGUF (byte-level form for ordinary tokens), or NULL.
const char * dm_token_get_text(const dm_model * model, dm_token token);

// Incremental UTF-8 decoder for streaming: releases complete characters only, keeps an incomplete
// trailing sequence for the next call, and replaces ill-formed bytes with U+FFFD exactly as
// Python's bytes.decode("utf-8", errors="replace") does.
typedef struct dm_utf8_decoder dm_utf8_decoder;
dm_utf8_decoder * dm_utf8_decoder_new(void);
void              dm_utf8_decoder_free(dm_utf8_decoder * dec);
// Feeds len bytes and writes the released text to out. Returns its length, or -(length needed)
// when size is too small, in which case nothing is consumed (size >= 3 * (len + 3) always suffices).
int32_t dm_utf8_decoder_feed(dm_utf8_decoder * dec, const char * bytes, int32_t len, char * out, int32_t size);
// Releases the pending bytes (an incomplete sequence becomes U+FFFD) and resets; same returns
// (size >= 3 always suffices).
int32_t dm_utf8_decoder_flush(dm_utf8_decoder * dec, char * out, int32_t size);

// ---- sampling (sampler chain; native/src/sampling) -----------------------------------------------
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
// The same for n tokens in order (a prompt's, in one call); 0, or -1 with dm_last_error() set.
int32_t dm_sampler_accept_tokens(dm_sampler * s, const dm_token * tokens, int32_t n);

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

// ---- quantization (native/src/quantize) ---------------------------------------------------------
// Thin wrappers over ggml's quantizers and type traits, so that callers (the Python `deltamem
// quantize` command, other languages) need not link ggml themselves. `type` is a ggml_type number
// (GGUF's tensor type ids). Which tensor gets which type is the caller's business.

bool         dm_quant_type_known(int32_t type);        // a ggml type this build knows
bool         dm_quant_type_is_target(int32_t type);    // dm_quantize_rows can produce it (no imatrix needed)
const char * dm_quant_type_name(int32_t type);         // ggml's name ("q4_K"), NULL when unknown
int64_t      dm_quant_block_size(int32_t type);        // values per block, -1 when unknown
// Bytes of one row of n_per_row values; -1 when the type is unknown or n_per_row is not a
// multiple of its block size.
int64_t      dm_quant_row_size(int32_t type, int64_t n_per_row);
bool         dm_quant_requires_imatrix(int32_t type);  // ggml refuses to quantize it without one

// Quantizes n_rows rows of n_per_row float32 values (row-major, src) to `type` into dst
// (dst_size bytes, at least n_rows * dm_quant_row_size), spreading the rows over n_threads
// threads (< 1: one). Every value must be finite. Returns the bytes written, or -1 with
// dm_last_error() on bad arguments (unknown or non-target type, a row length that does not
// fit the block size, a short buffer, a non-finite value).
int64_t dm_quantize_rows(int32_t type, const float * src, int64_t n_rows, int64_t n_per_row, void * dst,
                         size_t dst_size, int32_t n_threads);

// ---- quantised mat-mul (native/src/matmul) -----------------------------------------------------
// The CPU kernel the engine runs for q4_0, q4_1 and q8_0 weights, for tests and other languages.

// "amx-int8", "avx512-vnni", "avx2", or NULL where this CPU (or DELTAMEM_NO_QMATMUL / DELTAMEM_NO_AVX2
// in the environment) leaves those weights to ggml's mul_mat. DELTAMEM_NO_AMX=1 keeps to "avx512-vnni",
// DELTAMEM_NO_AVX512=1 to "avx2". With AMX, a model's weights of those types whose rows are a multiple
// of 16 and hold an even number of blocks are stored in the kernel's own layout when it loads.
const char * dm_quant_matmul_kernel(void);

// y [n, rows] = x [n, n_per_row] · Wᵀ (row-major) for W [rows, n_per_row] of `type` as
// dm_quantize_rows writes it (w_size bytes), computed as the engine's kernel computes it: each
// column of x quantised to 8-bit blocks of 32, integer block products. Returns 0, or -1 with
// dm_last_error(): no kernel (above) or a type it does not take, a shape that does not fit the
// blocks, a short buffer.
int32_t dm_quant_matmul(int32_t type, const void * w, size_t w_size, int64_t rows, int64_t n_per_row, const float * x,
                        int64_t n, float * y);

#ifdef __cplusplus
}
#endif

#endif // DELTAMEM_H
