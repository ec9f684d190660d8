/* c_api_misuse.c: every entry point of deltamem.h called with NULL handles and buffers, absurd
 * sizes and enum values, and an aborting callback. Each call must fail (NULL, -1, false, ...) with
 * a message in dm_last_error(); the process must never crash. Built and run by tests/test_c_api.py:
 *
 *   ./c_api_misuse MODEL.gguf      prints "checks: N" and exits 0, or names the first failed check
 */
#include <deltamem.h>

#include <limits.h>
#include <stdio.h>
#include <string.h>

static int n_checks = 0;
static int n_failed = 0;

/* The call failed as it should: its result says so and dm_last_error() contains `needle`. */
static void expect_error(const char * what, int failed, const char * needle) {
    ++n_checks;
    const char * err = dm_last_error();
    if (!failed || err == NULL || strstr(err, needle) == NULL) {
        ++n_failed;
        fprintf(stderr, "FAILED: %s (result %s, dm_last_error \"%s\", expected \"%s\")\n", what,
                failed ? "failure" : "success", err ? err : "(null)", needle);
    }
}

static void expect_ok(const char * what, int ok) {
    ++n_checks;
    if (!ok) {
        ++n_failed;
        fprintf(stderr, "FAILED: %s (%s)\n", what, dm_last_error());
    }
}

#define NULL_CALL(call, failed) expect_error(#call, (call) failed, "NULL")

static void null_handles(void) {
    dm_model * m = NULL;
    dm_context * c = NULL;
    dm_sampler * s = NULL;
    dm_generator * g = NULL;
    dm_token tok = 1;
    float f[4] = {0};
    char buf[8];
    int32_t n = 7;
    size_t len = 7;

    NULL_CALL(dm_model_load(NULL, dm_model_default_params()), == NULL);
    NULL_CALL(dm_model_arch(m), == NULL);
    NULL_CALL(dm_model_n_vocab(m), == -1);
    NULL_CALL(dm_model_n_ctx_train(m), == -1);
    NULL_CALL(dm_model_n_layer(m), == -1);
    NULL_CALL(dm_model_n_embd(m), == -1);
    NULL_CALL(dm_model_n_repacked(m), == -1);
    NULL_CALL(dm_model_meta_count(m), == -1);
    NULL_CALL(dm_model_meta_key(m, 0), == NULL);
    NULL_CALL(dm_model_meta_type(m, 0), == NULL);
    NULL_CALL(dm_model_meta_value(m, 0, buf, sizeof buf), == -1);
    NULL_CALL(dm_model_adapter_info(m), == NULL);
    NULL_CALL(dm_model_layer_device(m, 0), == NULL);
    NULL_CALL(dm_device_get(0, NULL), == -1);
    NULL_CALL(dm_rpc_add_servers(NULL), == -1);
    NULL_CALL(dm_rpc_serve(NULL, 1), == -1);

    NULL_CALL(dm_context_new(m, dm_context_default_params()), == NULL);
    NULL_CALL(dm_context_set_abort_callback(c, NULL, NULL), == -1);
    NULL_CALL(dm_context_n_ctx(c), == -1);
    NULL_CALL(dm_context_n_past(c), == -1);
    NULL_CALL(dm_context_n_splits(c), == -1);
    dm_context_reset(c);
    expect_error("dm_context_reset(NULL)", 1, "NULL");
    NULL_CALL(dm_decode(c, &tok, 1, DM_LOGITS_LAST, f), == -1);
    NULL_CALL(dm_decode_ext(c, &tok, 1, DM_LOGITS_LAST, f, NULL, true), == -1);
    NULL_CALL(dm_context_model(c), == NULL);
    NULL_CALL(dm_memory_size(c), == -1);
    NULL_CALL(dm_memory_get(c, f, 4), == -1);
    NULL_CALL(dm_memory_set(c, f, 4), == -1);
    dm_memory_reset(c);
    expect_error("dm_memory_reset(NULL)", 1, "NULL");
    NULL_CALL(dm_context_kv_size(c), == -1);
    NULL_CALL(dm_context_kv_get(c, buf, 0), == -1);
    NULL_CALL(dm_context_kv_set(c, &tok, 1, buf, 0), == -1);
    NULL_CALL(dm_context_tokens(c, &tok, 1), == -1);
    NULL_CALL(dm_context_truncate(c, 0), == -1);

    struct dm_generate_params gp = dm_generate_default_params();
    NULL_CALL(dm_generator_new(c, s, gp), == NULL);
    NULL_CALL(dm_generator_run(g, &tok, 1, NULL, NULL, NULL), == -1);
    NULL_CALL(dm_generator_tokens(g, &n), == NULL);
    expect_ok("dm_generator_tokens(NULL) sets *n_tokens = 0", n == 0);
    NULL_CALL(dm_generator_text(g, &len), == NULL);
    expect_ok("dm_generator_text(NULL) sets *len = 0", len == 0);
    NULL_CALL(dm_generator_finish(g), == DM_FINISH_LENGTH);
    NULL_CALL(dm_generator_start(g, &tok, 1, NULL), == -1);
    NULL_CALL(dm_generator_take_text(g, &len), == NULL);
    bool running = true;
    NULL_CALL(dm_generators_step(NULL, 1, &running), == -1);
    dm_generator * no_gens[1] = {NULL};
    NULL_CALL(dm_generators_step(no_gens, 1, &running), == -1);
    NULL_CALL(dm_decode_batch(NULL, 1, DM_LOGITS_LAST), == -1);
    struct dm_batch_entry no_ctx = {NULL, &tok, 1, NULL, true, f};
    NULL_CALL(dm_decode_batch(&no_ctx, 1, DM_LOGITS_LAST), == -1);

    NULL_CALL(dm_tokenize(m, "x", 1, &tok, 1, false, false), == INT32_MIN);
    NULL_CALL(dm_token_to_piece(m, 1, buf, sizeof buf, false), == INT32_MIN);
    NULL_CALL(dm_detokenize(m, &tok, 1, buf, sizeof buf, false), == INT32_MIN);
    NULL_CALL(dm_token_bos(m), == -1);
    NULL_CALL(dm_token_eos(m), == -1);
    NULL_CALL(dm_token_eot(m), == -1);
    NULL_CALL(dm_token_is_eog(m, 1), == false);
    NULL_CALL(dm_token_is_control(m, 1), == false);
    NULL_CALL(dm_token_get_text(m, 1), == NULL);
    NULL_CALL(dm_utf8_decoder_feed(NULL, "x", 1, buf, sizeof buf), == INT32_MIN);
    NULL_CALL(dm_utf8_decoder_flush(NULL, buf, sizeof buf), == INT32_MIN);

    NULL_CALL(dm_sampler_set_logit_bias(s, &tok, f, 1), == -1);
    dm_sampler_accept(s, 1);
    expect_error("dm_sampler_accept(NULL)", 1, "NULL");
    NULL_CALL(dm_sampler_accept_tokens(s, &tok, 1), == -1);
    dm_sampler_reset(s);
    expect_error("dm_sampler_reset(NULL)", 1, "NULL");
    NULL_CALL(dm_sampler_sample(s, f, 4), == -1);
    NULL_CALL(dm_sampler_probs(s, f, 4, f), == -1);
    char rows[64];
    expect_error("dm_quantize_rows(NULL source)", dm_quantize_rows(8 /* Q8_0 */, NULL, 1, 32, rows, sizeof rows, 1) == -1,
                 "null source");

    /* Freeing NULL is a no-op, as free() is. */
    dm_model_free(m);
    dm_context_free(c);
    dm_generator_free(g);
    dm_sampler_free(s);
    dm_utf8_decoder_free(NULL);
}

static bool always_abort(void * user_data) {
    ++*(int *) user_data;
    return true;
}

/* Misuse of valid handles: NULL buffers, bad enums and counts, absurd thread counts, an abort. */
static void bad_arguments(const char * model_path) {
    dm_model * m = dm_model_load(model_path, dm_model_default_params());
    expect_ok("load the model", m != NULL);
    if (!m) return;

    struct dm_context_params cp = dm_context_default_params();
    cp.n_ctx = 64;
    const int32_t absurd_threads[] = {DM_MAX_THREADS + 1, 600, INT32_MAX};
    for (size_t i = 0; i < sizeof absurd_threads / sizeof absurd_threads[0]; ++i) {
        cp.n_threads = absurd_threads[i];
        expect_error("dm_context_new with too many threads", dm_context_new(m, cp) == NULL, "n_threads must be at most");
    }
    cp.n_threads = 1;
    cp.n_ctx = INT32_MAX;   /* the KV cache cannot be allocated: an error, and no leak */
    expect_error("dm_context_new with n_ctx = INT32_MAX", dm_context_new(m, cp) == NULL, "cannot allocate");
    cp.n_ctx = 64;
    dm_context * c = dm_context_new(m, cp);
    expect_ok("create a context", c != NULL);
    if (!c) {
        dm_model_free(m);
        return;
    }

    const int32_t n_vocab = dm_model_n_vocab(m);
    float logits[1 << 16];
    const dm_token tokens[3] = {1, 2, 3};
    expect_ok("the logits buffer fits the model", n_vocab > 0 && n_vocab <= (int32_t) (sizeof logits / sizeof logits[0]));
    expect_error("dm_decode of NULL tokens", dm_decode(c, NULL, 3, DM_LOGITS_LAST, logits) == -1, "no tokens");
    expect_error("dm_decode into a NULL buffer", dm_decode(c, tokens, 3, DM_LOGITS_LAST, NULL) == -1, "no output buffer");
    expect_error("dm_decode with an unknown logits mode", dm_decode(c, tokens, 3, (enum dm_logits) 7, logits) == -1,
                 "unknown logits mode");
    expect_error("dm_context_kv_set of NULL tokens", dm_context_kv_set(c, NULL, 2, NULL, 0) == -1, "NULL");
    expect_error("dm_memory_get into NULL", dm_memory_get(c, NULL, 1) == -1, "memory");
    expect_error("dm_model_meta_key out of range", dm_model_meta_key(m, -1) == NULL, "outside");
    expect_error("dm_model_layer_device out of range", dm_model_layer_device(m, dm_model_n_layer(m) + 1) == NULL, "outside");
    expect_ok("every layer of a default model is on the CPU", strcmp(dm_model_layer_device(m, 0), "CPU") == 0);
    expect_ok("the CPU is a device", dm_device_count() >= 1 && strlen(dm_backends()) > 0);
    struct dm_device_info info;
    expect_error("dm_device_get out of range", dm_device_get(dm_device_count(), &info) == -1, "outside");
    expect_error("dm_rpc_add_servers of a malformed endpoint", dm_rpc_add_servers("no-port") == -1, "host:port");
    struct dm_model_params mp = dm_model_default_params();
    mp.n_gpu_layers = -2;
    expect_error("dm_model_load with n_gpu_layers = -2", dm_model_load(model_path, mp) == NULL, "n_gpu_layers");
    mp.n_gpu_layers = 0;
    mp.n_tensor_split = 2;   /* with tensor_split == NULL */
    expect_error("dm_model_load with a NULL tensor_split", dm_model_load(model_path, mp) == NULL, "tensor_split");

    int asked = 0;
    expect_ok("set an abort callback", dm_context_set_abort_callback(c, always_abort, &asked) == 0);
    expect_error("an aborted decode fails", dm_decode(c, tokens, 3, DM_LOGITS_LAST, logits) == -1, "aborted");
    expect_ok("the abort callback was asked", asked > 0);
    expect_ok("an aborted decode leaves the sequence as it was", dm_context_n_past(c) == 0);
    expect_ok("remove the abort callback", dm_context_set_abort_callback(c, NULL, NULL) == 0);
    expect_ok("decoding works again", dm_decode(c, tokens, 3, DM_LOGITS_LAST, logits) == 0 && dm_context_n_past(c) == 3);

    struct dm_sampler_params sp = dm_sampler_default_params();
    sp.temperature = 0.0f;
    dm_sampler * s = dm_sampler_new(sp);
    expect_error("dm_sampler_accept_tokens with a negative count", dm_sampler_accept_tokens(s, tokens, -1) == -1, "n >= 0");
    expect_error("dm_sampler_accept_tokens with NULL tokens", dm_sampler_accept_tokens(s, NULL, 2) == -1, "n >= 0");
    expect_ok("dm_sampler_accept_tokens", dm_sampler_accept_tokens(s, tokens, 3) == 0);
    struct dm_generate_params gp = dm_generate_default_params();
    gp.max_tokens = 4;
    gp.n_stop = 2;   /* with stop == NULL */
    expect_error("dm_generator_new with NULL stop strings", dm_generator_new(c, s, gp) == NULL, "NULL");
    gp.n_stop = 0;
    gp.n_stop_tokens = -1;
    expect_error("dm_generator_new with a negative count", dm_generator_new(c, s, gp) == NULL, "negative");
    gp.n_stop_tokens = 0;
    dm_generator * g = dm_generator_new(c, s, gp);
    expect_ok("create a generator", g != NULL);
    expect_error("dm_generator_run with a NULL prompt", dm_generator_run(g, NULL, 0, NULL, NULL, NULL) == -1, "no tokens");
    expect_error("dm_generator_start with a NULL prompt", dm_generator_start(g, NULL, 0, NULL) == -1, "empty prompt");
    bool running = true;
    dm_generator * gens[2] = {g, g};
    expect_error("dm_generators_step of a generator not started", dm_generators_step(gens, 1, &running) == -1, "not running");
    expect_ok("dm_generator_start", dm_generator_start(g, tokens, 3, NULL) == 0);
    expect_error("dm_generators_step with one context twice", dm_generators_step(gens, 2, &running) == -1, "twice");
    expect_error("dm_generators_step with n = 0", dm_generators_step(gens, 0, &running) == -1, "no generators");
    struct dm_batch_entry entries[2] = {{c, tokens, 3, NULL, true, logits}, {c, tokens, 3, NULL, true, logits}};
    expect_error("dm_decode_batch with one context twice", dm_decode_batch(entries, 2, DM_LOGITS_LAST) == -1, "context 1");
    expect_error("dm_decode_batch with an unknown logits mode", dm_decode_batch(entries, 1, (enum dm_logits) 9) == -1,
                 "unknown logits mode");
    entries[0].logits = NULL;
    expect_error("dm_decode_batch into a NULL buffer", dm_decode_batch(entries, 1, DM_LOGITS_LAST) == -1, "no output buffer");
    entries[0].n_tokens = -4;
    expect_error("dm_decode_batch with a negative count", dm_decode_batch(entries, 1, DM_LOGITS_NONE) == -1, "context 0");
    expect_ok("dm_generators_step", dm_generators_step(gens, 1, &running) == 0);
    size_t n_text = 0;
    expect_ok("dm_generator_take_text", dm_generator_take_text(g, &n_text) != NULL);

    dm_generator_free(g);
    dm_sampler_free(s);
    dm_context_free(c);
    dm_model_free(m);
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }
    null_handles();
    bad_arguments(argv[1]);
    printf("checks: %d\n", n_checks);
    return n_failed == 0 ? 0 : 1;
}
