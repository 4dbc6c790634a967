"""The student's attention core: ``softmax(Q K^T / sqrt(d) + key mask) V`` with dropout on the probabilities.

PyTorch's ``scaled_dot_product_attention`` is the path everywhere but one: training with attention dropout
on CPU. There it has no fused kernel (the CPU flash kernel takes no dropout) and falls back to a generic
path that draws the [B, heads, L, L] keep mask with ``bernoulli_`` and applies the key mask with ``where``
over [B, heads, L, L]: 74 ms for a layer's forward + backward at 32 x 12 heads x 128^2 (fp32 and bf16).
``dropped_attention`` is the same arithmetic written out, dropped by ``dropout.dropout`` (its cheaper mask),
the [B, 1, 1, L] key mask added as a bias: fp32 49 ms, bf16 36 ms (2 cores, ``benchmarks/kernels.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dropout import dropout


def dropped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                      p: float) -> torch.Tensor:
    """Attention of ``q, k, v`` [B, heads, L, d] over the keys where ``key_mask`` [B, 1, 1, L] is True, with
    dropout ``p`` on the probabilities (kept ones scaled by 1 / (1 - p)); what SDPA computes in training."""
    bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
    scores = torch.baddbmm(bias.expand(*q.shape[:2], 1, k.shape[2]).flatten(0, 1), q.flatten(0, 1),
                           k.flatten(0, 1).transpose(1, 2), alpha=1.0 / math.sqrt(q.shape[-1]))
    dropped = dropout(torch.softmax(scores, dim=-1), p, training=True)
    return torch.bmm(dropped, v.flatten(0, 1)).view(q.shape[:3] + (v.shape[-1],))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, dropout_p: float,
              training: bool) -> torch.Tensor:
    """The student's attention core: ``dropped_attention`` in CPU training with dropout, SDPA otherwise."""
    if training and dropout_p > 0 and q.device.type == "cpu":
        return dropped_attention(q, k, v, key_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                          dropout_p=dropout_p if training else 0.0)
