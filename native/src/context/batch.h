// Batched decoding: one forward pass over the new tokens of several contexts of one model, each
// keeping its own KV cache, positions and δ-mem memory.
#pragma once

#include "context/context.h"

#include <vector>

struct dm_batch_item {
    dm_context *     ctx = nullptr;
    const dm_token * tokens = nullptr;
    int32_t          n_tokens = 0;
    const int32_t *  seg_ids = nullptr;   // the segment-mean ids of its tokens, or null
    bool             write = true;        // false: reads the memory only
    dm_logits        which = DM_LOGITS_LAST;   // the logits this item wants
    float *          logits = nullptr;    // n_vocab floats (LAST), n_tokens * n_vocab (ALL), null (NONE)
};

// Decodes every item's tokens into its context, as dm_context::decode of each alone would. Checks
// everything first and throws dm::Error naming the item at fault ("context 2: ..."); when a pass
// fails later (aborted, a device lost), every context is put back as it was, its memory included.
void dm_decode_batch(const std::vector<dm_batch_item> & items);
