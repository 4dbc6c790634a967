"""Distillation losses: pure functions of tensors (no engines, no I/O).

MiniLMv2 self-attention relation distillation: for X in {Q, K, V}, split the hidden states into R
relation heads and form per head the relation ``softmax(X X^T / sqrt(d_r))``; the loss is
KL(teacher || student) averaged over (query token, relation head) rows and over Q, K, V.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def relation_log_probs(x: torch.Tensor, num_heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    """``log softmax(X X^T / sqrt(d))`` per relation head: [B, L, H] -> [B, R, L, L], in fp32.

    Padded keys (``key_mask == 0``) get probability 0; rows of padded queries are left to the caller.
    """
    b, l, h = x.shape
    if h % num_heads:
        raise ValueError(f"relation heads {num_heads} must divide hidden size {h}")
    xs = x.float().view(b, l, num_heads, h // num_heads).transpose(1, 2)
    scores = xs @ xs.transpose(-1, -2) / math.sqrt(h // num_heads)
    scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_kl(teacher_qkv: Sequence[torch.Tensor], student_qkv: Sequence[torch.Tensor],
                attention_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Mean over Q-Q, K-K, V-V of KL(teacher || student) per (query token, relation head) row.

    The teacher and student hidden sizes may differ; both are split into ``num_heads`` relations, so
    their [L, L] relation maps compare one to one. Rows of padded query positions are dropped.
    """
    valid = attention_mask.bool()
    rows = valid.sum() * num_heads
    losses = []
    for t, s in zip(teacher_qkv, student_qkv, strict=True):
        t_logp = relation_log_probs(t.detach(), num_heads, valid)
        s_logp = relation_log_probs(s, num_heads, valid)
        # KL over keys; padded keys have teacher probability 0 and contribute nothing.
        kl = (t_logp.exp() * (t_logp - s_logp)).masked_fill(~valid[:, None, None, :], 0.0).sum(-1)  # [B, R, L]
        losses.append(kl.masked_fill(~valid[:, None, :], 0.0).sum() / rows)
    return torch.stack(losses).mean()
