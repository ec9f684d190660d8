/* simple.c: greedy generation through the plain C API.
 *
 *   cc simple.c -I"$(python -c 'import pydeltamem; print(pydeltamem.get_include())')" \
 *      -L"$(python -c 'import pydeltamem; print(pydeltamem.get_lib_dir())')" -ldeltamem \
 *      -Wl,-rpath,"$(python -c 'import pydeltamem; print(pydeltamem.get_lib_dir())')" -o simple
 *   ./simple model.gguf "The capital of France is" 16
 */
#include <deltamem.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char * what) {
    fprintf(stderr, "%s: %s\n", what, dm_last_error());
    return 1;
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT [N_TOKENS]\n", argv[0]);
        return 2;
    }
    const int n_generate = argc > 3 ? atoi(argv[3]) : 16;

    dm_model * model = dm_model_load(argv[1], dm_model_default_params());
    if (!model) return fail("load");

    struct dm_context_params cparams = dm_context_default_params();
    cparams.n_ctx = 512;
    dm_context * ctx = dm_context_new(model, cparams);
    if (!ctx) return fail("context");

    dm_token prompt[256];
    const int32_t n_prompt = dm_tokenize(model, argv[2], (int32_t) strlen(argv[2]), prompt, 256, true, false);
    if (n_prompt <= 0) return fail("tokenize");

    struct dm_sampler_params sparams = dm_sampler_default_params();
    sparams.temperature = 0.0f;   /* greedy */
    dm_sampler * sampler = dm_sampler_new(sparams);

    struct dm_generate_params gparams = dm_generate_default_params();
    gparams.max_tokens = n_generate;
    dm_generator * gen = dm_generator_new(ctx, sampler, gparams);
    if (!gen || dm_generator_run(gen, prompt, n_prompt, NULL, NULL, NULL) != 0) return fail("generate");

    size_t len = 0;
    const char * text = dm_generator_text(gen, &len);
    int32_t n_tokens = 0;
    const dm_token * tokens = dm_generator_tokens(gen, &n_tokens);
    printf("%s%.*s\n", argv[2], (int) len, text);
    fprintf(stderr, "tokens:");
    for (int32_t i = 0; i < n_tokens; ++i) fprintf(stderr, " %d", tokens[i]);
    fprintf(stderr, "\n");

    dm_generator_free(gen);
    dm_sampler_free(sampler);
    dm_context_free(ctx);
    dm_model_free(model);
    return 0;
}
