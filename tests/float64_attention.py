"""A float64 attention for the float64 references: transformers' eager attention takes its softmax in
float32 whatever the model's dtype, which limits a float64 model to ~1e-7 and makes one long call and
the same tokens split over two calls disagree at that level. Registered under its own name, so that
a reference model opts in with `config._attn_implementation = FLOAT64_ATTENTION`."""
from __future__ import annotations

import torch

FLOAT64_ATTENTION = "float64_eager"


def _float64_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # query: [batch, n_head, T, head_dim]; key/value: [batch, n_head_kv, S, head_dim]
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling          # [batch, n_head, T, S]
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1)                               # in the query's dtype
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(FLOAT64_ATTENTION, _float64_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FLOAT64_ATTENTION, eager_mask)
