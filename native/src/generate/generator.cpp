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

void dm_generator::reset_results() {
    tokens.clear();
    text.clear();
    emitted = 0;
    finish = DM_FINISH_LENGTH;
}

bool dm_generator::sample_next(const float * logits, dm_text_callback emit, void * user_data) {
    if (!will_sample()) return false;   // max_tokens 0: nothing to sample
    const dm_token t = sampler->sample(logits, ctx->model->hp.n_vocab);
    if (is_end_token(t)) {
        finish = DM_FINISH_STOP;
        emit_upto(text.size(), emit, user_data);
        return false;
    }
    tokens.push_back(t);
    if (append_piece(t)) {
        finish = DM_FINISH_STOP;
        emit_upto(text.size(), emit, user_data);
        return false;
    }
    if (!emit_upto(safe_length(), emit, user_data)) {
        finish = DM_FINISH_STOP;
        return false;   // the listener asked to stop (or failed): it wants no more text
    }
    // The last token needs no forward pass; a full context ends it too (a "length" finish).
    if (static_cast<int32_t>(tokens.size()) == max_tokens || ctx->n_past() >= ctx->params.n_ctx) {
        emit_upto(text.size(), emit, user_data);
        return false;
    }
    next.assign(1, t);
    return true;
}

void dm_generator::run(const dm_token * prompt, int32_t n_prompt, const int32_t * prompt_seg_ids, dm_text_callback emit,
                       void * user_data) {
    reset_results();
    std::vector<float> logits(static_cast<size_t>(ctx->model->hp.n_vocab));
    ctx->decode(prompt, n_prompt, DM_LOGITS_LAST, logits.data(), prompt_seg_ids, write);
    const int32_t * token_seg_ids = seg_id >= 0 ? &seg_id : nullptr;
    while (sample_next(logits.data(), emit, user_data)) {
        ctx->decode(next.data(), 1, DM_LOGITS_LAST, logits.data(), token_seg_ids, write);
    }
}

void dm_generator::start(const dm_token * prompt, int32_t n_prompt, const int32_t * prompt_seg_ids) {
    if (n_prompt <= 0 || !prompt) fail("generator: empty prompt (no tokens)");
    reset_results();
    next.assign(prompt, prompt + n_prompt);
    next_seg_ids.clear();
    if (prompt_seg_ids) next_seg_ids.assign(prompt_seg_ids, prompt_seg_ids + n_prompt);
    ready.clear();
    finished = false;
}

const int32_t * dm_generator::to_decode_seg_ids() const {
    if (!next_seg_ids.empty()) return next_seg_ids.data();
    return seg_id >= 0 ? &seg_id : nullptr;
}

static bool collect_text(const char * piece, size_t len, void * user_data) {
    static_cast<std::string *>(user_data)->append(piece, len);
    return true;
}

float * dm_generator::step_logits() {
    logits_buf.resize(static_cast<size_t>(ctx->model->hp.n_vocab));
    return logits_buf.data();
}

bool dm_generator::accept(const float * logits) {
    next_seg_ids.clear();
    finished = !sample_next(logits, collect_text, &ready);
    return !finished;
}

const std::string & dm_generator::take_text() {
    taken.swap(ready);
    ready.clear();
    return taken;
}
