"""Distillation losses: pure functions of tensors (no engines, no I/O).

MiniLMv2 self-attention relation distillation: for X in {Q, K, V}, split the hidden states into R
relation heads and form per head the relation ``softmax(X X^T / sqrt(d_r))``; the loss is
KL(teacher || student) averaged over (query token, relation head) rows and over Q, K, V.

The [B, R, L, L] relation tensors, not the matmuls, dominate this loss's cost, so every pass over
them counts: scaling and the padding mask are fused into one ``baddbmm``, and the student's side of
the KL is a soft-target cross-entropy (one fused log-softmax forward, ``softmax - target`` backward).
KL(t || s) = CE(t, s) - H(t), and the teacher entropy H(t) needs no gradient.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def relation_scores(x: torch.Tensor, num_heads: int, key_bias: torch.Tensor) -> torch.Tensor:
    """``X X^T / sqrt(d) + key_bias`` per relation head: [B, L, H] -> [B * R, L, L] in fp32.

    ``key_bias`` is [B, 1, L]: 0 for real keys, a large negative number for padded ones.
    """
    b, l, h = x.shape
    if h % num_heads:
        raise ValueError(f"relation heads {num_heads} must divide hidden size {h}")
    d = h // num_heads
    xs = x.float().view(b, l, num_heads, d).transpose(1, 2).reshape(b * num_heads, l, d)
    bias = key_bias.unsqueeze(1).expand(b, num_heads, 1, l).reshape(b * num_heads, 1, l)
    return torch.baddbmm(bias, xs, xs.transpose(1, 2), alpha=1.0 / math.sqrt(d))


def relation_kl(teacher_qkv: Sequence[torch.Tensor], student_qkv: Sequence[torch.Tensor],
                attention_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Mean over Q-Q, K-K, V-V of KL(teacher || student) per (query token, relation head) row.

    The teacher and student hidden sizes may differ; both are split into ``num_heads`` relations, so
    their [L, L] relation maps compare one to one. Padded keys get probability 0; rows of padded
    query positions are dropped.
    """
    valid = attention_mask.bool()
    b, l = valid.shape
    key_bias = torch.zeros(b, 1, l, device=valid.device).masked_fill(~valid[:, None, :], torch.finfo(torch.float32).min)
    row_weight = (valid[:, None, :].expand(b, num_heads, l).reshape(-1).float()) / (valid.sum() * num_heads)
    losses = []
    for t, s in zip(teacher_qkv, student_qkv, strict=True):
        with torch.no_grad():
            t_logp = F.log_softmax(relation_scores(t, num_heads, key_bias), dim=-1)
            t_p = t_logp.exp()
            neg_entropy = (t_p * t_logp).sum(-1).view(-1)
        s_scores = relation_scores(s, num_heads, key_bias)
        ce = F.cross_entropy(s_scores.view(-1, l), t_p.view(-1, l), reduction="none")
        losses.append(((ce + neg_entropy) * row_weight).sum())
    return torch.stack(losses).mean()


def logits_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Task-specific distillation: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over rows
    (sequences, or the tokens where ``mask`` is true for token tasks). One logit per row (regression)
    gives the squared error to the teacher's prediction instead."""
    s, t = student_logits.float(), teacher_logits.detach().float()
    if mask is not None:
        s, t = s[mask], t[mask]
    if s.shape[-1] == 1:
        return F.mse_loss(s, t)
    t_logp = F.log_softmax(t / temperature, dim=-1)
    s_logp = F.log_softmax(s / temperature, dim=-1)
    kl = F.kl_div(s_logp.reshape(-1, s.shape[-1]), t_logp.reshape(-1, t.shape[-1]), log_target=True,
                  reduction="batchmean")
    return kl * temperature ** 2
