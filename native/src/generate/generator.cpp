#include "generate/generator.h"

#include "common/error.h"
#include "context/context.h"
#include "sampling/sampling.h"

#include <algorithm>

using dm::fail;

bool dm_generator::is_end_token(dm_token t) const {
    return ctx->model->vocab.is_eog(t) || std::find(stop_tokens.begin(), stop_tokens.end(), t) != stop_tokens.end();
}

bool dm_generator::append_piece(dm_token t) {
    const dm_vocab & vocab = ctx->model->vocab;
    if (t >= vocab.n_tokens()) {
        // The output layer has more rows than the tokenizer has tokens: this id has no text.
        fail("generated token %d has no text: the tokenizer has %d tokens for %d output rows", t, vocab.n_tokens(),
             ctx->model->hp.n_vocab);
    }
    const std::string & piece = vocab.token_to_piece(t, false);
    text += piece;
    // A stop string can only start where it could overlap the new bytes.
    size_t longest = 0;
    for (const std::string & s : stop_strings) longest = std::max(longest, s.size());
    const size_t n = piece.size();
    const size_t from = text.size() > n + longest ? text.size() - n - longest : 0;
    size_t cut = std::string::npos;
    for (const std::string & s : stop_strings) {
        if (s.empty()) continue;
        const size_t at = text.find(s, from);
        if (at != std::string::npos) cut = std::min(cut, at);
    }
    if (cut == std::string::npos) return false;
    text.resize(cut);
    return true;
}

static size_t utf8_complete_length(const std::string & s, size_t end) {
    // Walk back over at most 3 continuation bytes to the lead byte of the last character.
    size_t i = end;
    int back = 0;
    while (i > 0 && back < 4 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) {
        --i;
        ++back;
    }
    if (i == 0) return end;
    const unsigned char lead = static_cast<unsigned char>(s[i - 1]);
    const int need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    return back >= need ? end : i - 1;
}

size_t dm_generator::safe_length() const {
    size_t hold = 0;   // longest suffix of text that is a proper prefix of a stop string
    for (const std::string & s : stop_strings) {
        for (size_t k = std::min(s.size() - (s.empty() ? 0 : 1), text.size()); k > hold; --k) {
            if (text.compare(text.size() - k, k, s, 0, k) == 0) {
                hold = k;
                break;
            }
        }
    }
    return utf8_complete_length(text, text.size() - hold);
}

bool dm_generator::emit_upto(size_t end, dm_text_callback emit, void * user_data) {
    if (!emit || end <= emitted) return true;
    const bool go_on = emit(text.data() + emitted, end - emitted, user_data);
    emitted = end;
    return go_on;
}

void dm_generator::run(const dm_token * prompt, int32_t n_prompt, const int32_t * prompt_seg_ids, dm_text_callback emit,
                       void * user_data) {
    tokens.clear();
    text.clear();
    emitted = 0;
    finish = DM_FINISH_LENGTH;
    const int32_t n_vocab = ctx->model->hp.n_vocab;
    std::vector<float> logits(static_cast<size_t>(n_vocab));

    ctx->decode(prompt, n_prompt, DM_LOGITS_LAST, logits.data(), prompt_seg_ids, write);
    const int32_t * token_seg_ids = seg_id >= 0 ? &seg_id : nullptr;
    for (int32_t i = 0; i < max_tokens; ++i) {
        const dm_token t = sampler->sample(logits.data(), n_vocab);
        if (is_end_token(t)) {
            finish = DM_FINISH_STOP;
            break;
        }
        tokens.push_back(t);
        if (append_piece(t)) {
            finish = DM_FINISH_STOP;
            break;
        }
        if (!emit_upto(safe_length(), emit, user_data)) {
            finish = DM_FINISH_STOP;
            return;   // the listener asked to stop (or failed): it wants no more text
        }
        if (i + 1 == max_tokens) break;   // the last token needs no forward pass
        if (ctx->n_past() >= ctx->params.n_ctx) break;   // the context is full: a "length" finish
        ctx->decode(&t, 1, DM_LOGITS_LAST, logits.data(), token_seg_ids, write);
    }
    emit_upto(text.size(), emit, user_data);
}
