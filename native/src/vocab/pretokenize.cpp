#include "vocab/pretokenize.h"

#include "vocab/unicode.h"

#include <algorithm>

using dm::unicode::char_class;
using dm::unicode::CHAR_LETTER;
using dm::unicode::CHAR_NUMBER;
using dm::unicode::CHAR_OTHER;
using dm::unicode::CHAR_SPACE;

namespace {

// The text being split, with the class of every code point computed once. Matchers see a
// window [begin, end): lookaheads such as (?!\S) stop at end, as they do when Hugging Face runs a
// pattern on each piece an earlier pre-tokenizer produced.
struct pre_text {
    const std::vector<uint32_t> & cps;
    std::vector<char_class> cls;

    explicit pre_text(const std::vector<uint32_t> & cps_) : cps(cps_), cls(cps_.size()) {
        for (size_t i = 0; i < cps.size(); ++i) {
            cls[i] = dm::unicode::class_of(cps[i]);
        }
    }

    // First index in [i, end) whose class differs from c (end when none).
    size_t run_end(size_t i, size_t end, char_class c) const {
        while (i < end && cls[i] == c) {
            ++i;
        }
        return i;
    }

    bool is(size_t i, size_t end, uint32_t cp) const { return i < end && cps[i] == cp; }
    bool is_newline(size_t i) const { return cps[i] == '\r' || cps[i] == '\n'; }
};

// Lower-cases the letters the contraction alternatives use, the way a case-insensitive regex
// compares them: ASCII, plus U+017F LATIN SMALL LETTER LONG S, whose case folding is 's'.
uint32_t fold_contraction_letter(uint32_t cp) {
    if (cp >= 'A' && cp <= 'Z') {
        return cp + ('a' - 'A');
    }
    if (cp == 0x017F) {
        return 's';
    }
    return cp;
}

// 's|'t|'re|'ve|'m|'ll|'d at i: returns the match end, or i when none.
size_t match_contraction(const pre_text & t, size_t i, size_t end, bool ignore_case) {
    if (!t.is(i, end, '\'') || i + 1 >= end) {
        return i;
    }
    auto letter = [&](size_t k) -> uint32_t {
        if (k >= end) {
            return 0;
        }
        return ignore_case ? fold_contraction_letter(t.cps[k]) : t.cps[k];
    };
    const uint32_t a = letter(i + 1);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        return i + 2;
    }
    const uint32_t b = letter(i + 2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
        return i + 3;
    }
    return i;
}

// \s+(?!\S)|\s+ at i (cls[i] is whitespace): the whole run when it ends the window, else the run
// minus its last character (which then leads the next piece), but at least one character.
size_t match_trailing_space(const pre_text & t, size_t i, size_t end) {
    const size_t run = t.run_end(i, end, CHAR_SPACE);
    if (run == end) {
        return end;
    }
    return run - i >= 2 ? run - 1 : i + 1;
}

// One match of the GPT-2 pattern at i; returns its end (> i).
size_t match_gpt2(const pre_text & t, size_t i, size_t end) {
    const size_t contraction = match_contraction(t, i, end, /*ignore_case =*/ false);
    if (contraction > i) {
        return contraction;
    }
    // " ?\p{L}+", " ?\p{N}+" and " ?[^\s\p{L}\p{N}]+": an optional space joins the run that follows.
    size_t start = i;
    if (t.cps[i] == ' ' && i + 1 < end && t.cls[i + 1] != CHAR_SPACE) {
        start = i + 1;
    }
    const char_class c = t.cls[start];
    if (c != CHAR_SPACE) {
        return t.run_end(start, end, c);
    }
    return match_trailing_space(t, i, end);
}

// One match of the Llama-3 pattern at i (max_digits 3), or of Qwen2's (max_digits 1).
size_t match_llama3(const pre_text & t, size_t i, size_t end, size_t max_digits) {
    const size_t contraction = match_contraction(t, i, end, /*ignore_case =*/ true);
    if (contraction > i) {
        return contraction;
    }
    const char_class c = t.cls[i];
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (c == CHAR_LETTER) {
        return t.run_end(i, end, CHAR_LETTER);
    }
    if (c != CHAR_NUMBER && !t.is_newline(i) && i + 1 < end && t.cls[i + 1] == CHAR_LETTER) {
        return t.run_end(i + 1, end, CHAR_LETTER);
    }
    // \p{N}{1,max}
    if (c == CHAR_NUMBER) {
        return std::min(t.run_end(i, end, CHAR_NUMBER), i + max_digits);
    }
    // " ?[^\s\p{L}\p{N}]+[\r\n]*"
    const size_t start = (t.cps[i] == ' ' && i + 1 < end && t.cls[i + 1] == CHAR_OTHER) ? i + 1 : i;
    if (t.cls[start] == CHAR_OTHER) {
        size_t j = t.run_end(start, end, CHAR_OTHER);
        while (j < end && t.is_newline(j)) {
            ++j;
        }
        return j;
    }
    // \s*[\r\n]+ : through the last line break of the whitespace run.
    const size_t run = t.run_end(i, end, CHAR_SPACE);
    for (size_t k = run; k > i; --k) {
        if (t.is_newline(k - 1)) {
            return k;
        }
    }
    return match_trailing_space(t, i, end);
}

template <typename Matcher>
void split_window(const pre_text & t, size_t begin, size_t end, Matcher match, std::vector<size_t> & ends) {
    size_t i = begin;
    while (i < end) {
        const size_t next = match(t, i, end);
        // Every matcher consumes at least one code point; guard anyway so bad tables cannot hang.
        i = next > i ? next : i + 1;
        ends.push_back(i);
    }
}

// SmolLM's Digits(individual_digits) step: each \p{N} is a piece; GPT-2 splits the text between.
void split_smollm(const pre_text & t, std::vector<size_t> & ends) {
    const size_t n = t.cps.size();
    size_t i = 0;
    while (i < n) {
        if (t.cls[i] == CHAR_NUMBER) {
            ends.push_back(++i);
            continue;
        }
        size_t j = i;
        while (j < n && t.cls[j] != CHAR_NUMBER) {
            ++j;
        }
        split_window(t, i, j, match_gpt2, ends);
        i = j;
    }
}

} // namespace

std::vector<size_t> dm_pretokenize(dm_pre_type type, const std::vector<uint32_t> & cps) {
    const pre_text t(cps);
    std::vector<size_t> ends;
    ends.reserve(cps.size() / 3 + 1);
    switch (type) {
        case dm_pre_type::gpt2:
            split_window(t, 0, cps.size(), match_gpt2, ends);
            break;
        case dm_pre_type::smollm:
            split_smollm(t, ends);
            break;
        case dm_pre_type::llama3:
            split_window(t, 0, cps.size(),
                [](const pre_text & tt, size_t i, size_t end) { return match_llama3(tt, i, end, 3); }, ends);
            break;
        case dm_pre_type::qwen2:
            split_window(t, 0, cps.size(),
                [](const pre_text & tt, size_t i, size_t end) { return match_llama3(tt, i, end, 1); }, ends);
            break;
    }
    return ends;
}
