#include "vocab/unicode.h"

#include <algorithm>
#include <array>
#include <unordered_map>

namespace dm::unicode {

namespace {

struct dm_char_class_range {
    uint32_t first;
    uint32_t last;
    char     cls;   // 'L', 'N' or 'W'
};

struct dm_ccc_range {
    uint32_t first;
    uint32_t last;
    uint8_t  ccc;
};

struct dm_decomposition {
    uint32_t cp;
    uint32_t first;
    uint32_t second;     // 0 for a singleton decomposition
    uint8_t  composes;   // 1 when first+second recompose to cp under NFC (a primary composite)
};

#include "vocab/unicode_data.inc"

// Hangul syllables decompose and compose algorithmically (Unicode §3.12).
constexpr uint32_t k_hangul_s_base  = 0xAC00;
constexpr uint32_t k_hangul_l_base  = 0x1100;
constexpr uint32_t k_hangul_v_base  = 0x1161;
constexpr uint32_t k_hangul_t_base  = 0x11A7;
constexpr uint32_t k_hangul_l_count = 19;
constexpr uint32_t k_hangul_v_count = 21;
constexpr uint32_t k_hangul_t_count = 28;
constexpr uint32_t k_hangul_n_count = k_hangul_v_count * k_hangul_t_count;
constexpr uint32_t k_hangul_s_count = k_hangul_l_count * k_hangul_n_count;

// Below U+0300 no character combines or decomposes into something that recomposes differently,
// so such text is already NFC.
constexpr uint32_t k_first_nfc_sensitive = 0x300;

template <typename Range>
const Range * find_range(const Range * begin, const Range * end, uint32_t cp) {
    const Range * it = std::upper_bound(begin, end, cp,
        [](uint32_t value, const Range & r) { return value < r.first; });
    if (it == begin) {
        return nullptr;
    }
    --it;
    return cp <= it->last ? it : nullptr;
}

char_class class_from_table(uint32_t cp) {
    const auto * r = find_range(std::begin(k_char_class_ranges), std::end(k_char_class_ranges), cp);
    if (r == nullptr) {
        return CHAR_OTHER;
    }
    switch (r->cls) {
        case 'L': return CHAR_LETTER;
        case 'N': return CHAR_NUMBER;
        case 'W': return CHAR_SPACE;
        default:  return CHAR_OTHER;
    }
}

std::array<char_class, 128> make_ascii_classes() {
    std::array<char_class, 128> table{};
    for (uint32_t cp = 0; cp < 128; ++cp) {
        table[cp] = class_from_table(cp);
    }
    return table;
}

uint8_t combining_class(uint32_t cp) {
    if (cp < k_first_nfc_sensitive) {
        return 0;
    }
    const auto * r = find_range(std::begin(k_ccc_ranges), std::end(k_ccc_ranges), cp);
    return r ? r->ccc : 0;
}

const dm_decomposition * find_decomposition(uint32_t cp) {
    const auto * begin = std::begin(k_decompositions);
    const auto * end   = std::end(k_decompositions);
    const auto * it = std::lower_bound(begin, end, cp,
        [](const dm_decomposition & d, uint32_t value) { return d.cp < value; });
    return (it != end && it->cp == cp) ? it : nullptr;
}

void decompose_into(uint32_t cp, std::vector<uint32_t> & out) {
    if (cp >= k_hangul_s_base && cp < k_hangul_s_base + k_hangul_s_count) {
        const uint32_t s = cp - k_hangul_s_base;
        out.push_back(k_hangul_l_base + s / k_hangul_n_count);
        out.push_back(k_hangul_v_base + (s % k_hangul_n_count) / k_hangul_t_count);
        if (s % k_hangul_t_count != 0) {
            out.push_back(k_hangul_t_base + s % k_hangul_t_count);
        }
        return;
    }
    const dm_decomposition * d = cp >= 0xC0 ? find_decomposition(cp) : nullptr;
    if (d == nullptr) {
        out.push_back(cp);
        return;
    }
    decompose_into(d->first, out);   // recursion depth is bounded by the data (a few levels)
    if (d->second != 0) {
        decompose_into(d->second, out);
    }
}

// Canonical ordering: a stable sort by combining class within each run of non-starters. Runs are
// sorted as a whole (not by bubbling marks one at a time), so a long run of marks stays O(n log n).
void reorder_marks(std::vector<uint32_t> & cps) {
    struct mark {
        uint8_t  ccc;
        uint32_t cp;
    };
    std::vector<mark> run;
    size_t i = 0;
    while (i < cps.size()) {
        if (combining_class(cps[i]) == 0) {
            ++i;
            continue;
        }
        const size_t begin = i;
        run.clear();
        for (; i < cps.size(); ++i) {
            const uint8_t ccc = combining_class(cps[i]);
            if (ccc == 0) {
                break;
            }
            run.push_back({ccc, cps[i]});
        }
        if (run.size() > 1) {
            std::stable_sort(run.begin(), run.end(), [](const mark & a, const mark & b) { return a.ccc < b.ccc; });
            for (size_t k = 0; k < run.size(); ++k) {
                cps[begin + k] = run[k].cp;
            }
        }
    }
}

uint64_t pair_key(uint32_t a, uint32_t b) {
    return (static_cast<uint64_t>(a) << 32) | b;
}

const std::unordered_map<uint64_t, uint32_t> & composition_table() {
    static const std::unordered_map<uint64_t, uint32_t> table = [] {
        std::unordered_map<uint64_t, uint32_t> t;
        for (const auto & d : k_decompositions) {
            if (d.composes) {
                t.emplace(pair_key(d.first, d.second), d.cp);
            }
        }
        return t;
    }();
    return table;
}

// Returns the primary composite of (starter, mark), or 0 when there is none.
uint32_t compose_pair(uint32_t starter, uint32_t mark) {
    if (starter >= k_hangul_l_base && starter < k_hangul_l_base + k_hangul_l_count &&
        mark >= k_hangul_v_base && mark < k_hangul_v_base + k_hangul_v_count) {
        return k_hangul_s_base +
               ((starter - k_hangul_l_base) * k_hangul_v_count + (mark - k_hangul_v_base)) * k_hangul_t_count;
    }
    if (starter >= k_hangul_s_base && starter < k_hangul_s_base + k_hangul_s_count &&
        (starter - k_hangul_s_base) % k_hangul_t_count == 0 &&
        mark > k_hangul_t_base && mark < k_hangul_t_base + k_hangul_t_count) {
        return starter + (mark - k_hangul_t_base);
    }
    const auto & table = composition_table();
    const auto it = table.find(pair_key(starter, mark));
    return it == table.end() ? 0 : it->second;
}

// Canonical composition (Unicode §3.11): each character joins the last starter unless blocked.
std::vector<uint32_t> compose(const std::vector<uint32_t> & cps) {
    std::vector<uint32_t> out;
    out.reserve(cps.size());
    bool have_starter = false;
    size_t starter = 0;
    int last_ccc = -1;   // class of the last character kept after the starter; -1: none yet
    for (const uint32_t cp : cps) {
        const uint8_t ccc = combining_class(cp);
        const bool blocked = last_ccc != -1 && last_ccc >= ccc;
        if (have_starter && !blocked) {
            const uint32_t composite = compose_pair(out[starter], cp);
            if (composite != 0) {
                out[starter] = composite;
                continue;
            }
        }
        if (ccc == 0) {
            have_starter = true;
            starter = out.size();
            last_ccc = -1;
        } else {
            last_ccc = ccc;
        }
        out.push_back(cp);
    }
    return out;
}

// Checks the UTF-8 sequence at s[0, avail). Returns its length when it is one complete, valid
// character. Otherwise returns 0 and sets *subpart to the length of its maximal subpart (at least 1)
// and *truncated when those bytes are a valid start that the end of input cut short.
size_t check_utf8(const unsigned char * s, size_t avail, size_t * subpart, bool * truncated) {
    const unsigned char b0 = s[0];
    *subpart = 1;
    *truncated = false;
    if (b0 < 0x80) {
        return 1;
    }
    size_t need = 0;
    unsigned char lo = 0x80;   // allowed range of the second byte (excludes overlongs, surrogates)
    unsigned char hi = 0xBF;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        need = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        need = 3;
        if (b0 == 0xE0) { lo = 0xA0; }
        if (b0 == 0xED) { hi = 0x9F; }
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        need = 4;
        if (b0 == 0xF0) { lo = 0x90; }
        if (b0 == 0xF4) { hi = 0x8F; }
    } else {
        return 0;
    }
    for (size_t k = 1; k < need; ++k) {
        if (k >= avail) {
            *subpart = k;
            *truncated = true;
            return 0;
        }
        const unsigned char b = s[k];
        const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
        if (!ok) {
            *subpart = k;
            return 0;
        }
    }
    return need;
}

uint32_t decode_valid(const unsigned char * s, size_t n) {
    switch (n) {
        case 1:  return s[0];
        case 2:  return (uint32_t(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
        case 3:  return (uint32_t(s[0] & 0x0F) << 12) | (uint32_t(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        default: return (uint32_t(s[0] & 0x07) << 18) | (uint32_t(s[1] & 0x3F) << 12) |
                        (uint32_t(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    }
}

const char k_replacement_char[] = "\xEF\xBF\xBD";   // U+FFFD

} // namespace

char_class class_of(uint32_t cp) {
    static const std::array<char_class, 128> ascii = make_ascii_classes();
    if (cp < 128) {
        return ascii[cp];
    }
    if (cp >= k_raw_byte_base) {
        return CHAR_OTHER;
    }
    return class_from_table(cp);
}

std::vector<uint32_t> decode_utf8(const char * text, size_t len, std::vector<size_t> * offsets) {
    const auto * s = reinterpret_cast<const unsigned char *>(text);
    std::vector<uint32_t> cps;
    cps.reserve(len);
    if (offsets) {
        offsets->clear();
        offsets->reserve(len + 1);
    }
    size_t i = 0;
    while (i < len) {
        size_t subpart = 0;
        bool truncated = false;
        const size_t n = check_utf8(s + i, len - i, &subpart, &truncated);
        if (offsets) {
            offsets->push_back(i);
        }
        if (n == 0) {
            cps.push_back(k_raw_byte_base + s[i]);
            i += 1;
        } else {
            cps.push_back(decode_valid(s + i, n));
            i += n;
        }
    }
    if (offsets) {
        offsets->push_back(len);
    }
    return cps;
}

void append_utf8(std::string & out, uint32_t cp) {
    if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < k_raw_byte_base) {
        out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
        out.push_back(static_cast<char>((cp - k_raw_byte_base) & 0xFF));
    }
}

std::vector<uint32_t> nfc(const std::vector<uint32_t> & cps) {
    const bool sensitive = std::any_of(cps.begin(), cps.end(),
        [](uint32_t cp) { return cp >= k_first_nfc_sensitive && cp < k_raw_byte_base; });
    if (!sensitive) {
        return cps;
    }
    std::vector<uint32_t> decomposed;
    decomposed.reserve(cps.size() + cps.size() / 2);
    for (const uint32_t cp : cps) {
        decompose_into(cp, decomposed);
    }
    reorder_marks(decomposed);
    return compose(decomposed);
}

void utf8_stream::feed(const char * bytes, size_t len, std::string & out) {
    if (len > 0) {
        pending.append(bytes, len);
    }
    const auto * s = reinterpret_cast<const unsigned char *>(pending.data());
    const size_t n = pending.size();
    size_t i = 0;
    while (i < n) {
        size_t subpart = 0;
        bool truncated = false;
        const size_t k = check_utf8(s + i, n - i, &subpart, &truncated);
        if (k > 0) {
            out.append(pending, i, k);
            i += k;
        } else if (truncated) {
            break;   // may still complete with the next bytes
        } else {
            out.append(k_replacement_char);
            i += subpart;
        }
    }
    pending.erase(0, i);
}

void utf8_stream::finish(std::string & out) {
    if (!pending.empty()) {
        out.append(k_replacement_char);   // a cut-short sequence is one maximal subpart
        pending.clear();
    }
}

} // namespace dm::unicode
