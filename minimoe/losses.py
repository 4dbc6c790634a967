"""Distillation losses: pure functions of tensors (no engines, no I/O).

MiniLMv2 self-attention relation distillation: for X in {Q, K, V}, split the hidden states into R
relation heads and form per head the relation ``softmax(X X^T / sqrt(d_r))``; the loss is
KL(teacher || student) averaged over (query token, relation head) rows and over Q, K, V.

The [B, R, L, L] relation tensors, not the matmuls, dominate this loss's cost and memory: at
32 x 512 tokens and 32 relation heads each one is 1 GiB in fp32, and autograd would keep two per
relation for the backward (9.6 GB in all). So the loss is fused: it walks the (sample, head) rows in
chunks of at most ``chunk_elements`` relation entries and, for each chunk, computes the KL and at
once its gradient with respect to the student's hidden states, ``(G + G^T) X / sqrt(d)`` with
``G = w * (softmax(s) - p_teacher)``. Only that [B, L, H] gradient is kept for the backward, so memory
no longer grows as L^2 and every relation entry is read while it is in cache.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# Relation entries per chunk: 4 Mi fp32 (16 MiB a tensor), so a few live tensors stay cache-sized.
CHUNK_ELEMENTS = 1 << 22
# With relation dropout a dropped student probability is 0: the authors take log(p + 1e-7), so the teacher's
# mass on it costs a large but finite penalty.
DROPOUT_EPS = 1e-7


# Log-probabilities are floored at -80 (e^-80 = 1.8e-35, still a normal float): exp of anything lower (a
# padded key's -3.4e38, or a real one past -87) leaves the vectorised fast path: 10 ms against 1.3 for a
# 256 x 128^2 chunk with half its keys padded (benchmarks/kernels.py). Teacher and student entries below it
# both become -80, so they add nothing to the loss (t (log t - log s) = e^-80 x 0) or to its gradient
# (s - t = 0); what changes is below 128 x e^-80 a row.
LOG_FLOOR = -80.0


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, H] -> [B * R, L, d] in fp32."""
    b, l, h = x.shape
    if h % num_heads:
        raise ValueError(f"relation heads {num_heads} must divide hidden size {h}")
    heads = x.detach().float().view(b, l, num_heads, h // num_heads).transpose(1, 2)
    return heads.reshape(b * num_heads, l, -1)


def _log_relations(xs: torch.Tensor, bias: torch.Tensor, padded: bool) -> torch.Tensor:
    """``log_softmax(X X^T / sqrt(d) + bias)``, floored at ``LOG_FLOOR``; the scale and the padding mask fused
    into one baddbmm, whose bias is not read at all without padding (beta 0: about half the time of a chunk,
    ``benchmarks/kernels.py``)."""
    scores = torch.baddbmm(bias, xs, xs.transpose(1, 2), beta=1.0 if padded else 0.0,
                           alpha=1.0 / math.sqrt(xs.shape[-1]))
    return torch.log_softmax(scores, -1).clamp_(min=LOG_FLOOR)


class _RelationKL(torch.autograd.Function):
    """The loss in ``forward``, its gradient too (see the module docstring); ``backward`` only scales it."""

    @staticmethod
    def forward(ctx, attention_mask, num_heads, chunk_elements, dropout, *qkv):
        teacher, student = qkv[:len(qkv) // 2], qkv[len(qkv) // 2:]
        valid = attention_mask.bool()
        b, l = valid.shape
        # 0 for real keys, the most negative float for padded ones (probability exactly 0)
        bias = torch.zeros(b, 1, 1, l, device=valid.device).masked_fill(~valid[:, None, None, :],
                                                                          torch.finfo(torch.float32).min)
        bias = bias.expand(b, num_heads, 1, l).reshape(b * num_heads, 1, l)
        # Each row's share of the mean: rows of padded query tokens count 0.
        weight = valid[:, None, :].expand(b, num_heads, l).reshape(b * num_heads, l, 1).float()
        weight = weight / (valid.sum() * num_heads * len(student))
        rows = max(1, chunk_elements // (l * l))
        padded = not bool(valid.all())
        total = torch.zeros((), dtype=torch.float64, device=valid.device)
        grads = []
        for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
            ts, ss = _heads(t, num_heads), _heads(s, num_heads)
            grad = torch.empty_like(ss) if ctx.needs_input_grad[4 + len(teacher) + i] else None
            for r in range(0, ss.shape[0], rows):
                part = slice(r, r + rows)
                t_logp = _log_relations(ts[part], bias[part], padded)
                s_logp = _log_relations(ss[part], bias[part], padded)
                t_p = t_logp.exp()
                if dropout:
                    s_logp, g = _dropped(s_logp, t_p, dropout)
                total += ((t_p * (t_logp - s_logp)).sum(-1, keepdim=True) * weight[part]).sum().double()
                if grad is not None:
                    # d loss / d student scores
                    g = g.mul_(weight[part]) if dropout else s_logp.exp_().sub_(t_p).mul_(weight[part])
                    x, scale = ss[part], 1.0 / math.sqrt(ss.shape[-1])
                    grad[part] = torch.baddbmm(torch.bmm(g, x), g.transpose(1, 2), x, alpha=scale, beta=scale)
            grads.append(None if grad is None else
                         grad.view(b, num_heads, l, -1).transpose(1, 2).reshape(s.shape).to(s.dtype))
        ctx.grads = grads
        return total.float()

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        return (None, None, None, None, *(None for _ in grads),
                *(None if g is None else g * grad_output for g in grads))


def _dropped(s_logp: torch.Tensor, t_p: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Relation dropout: the student's probabilities ``s`` through dropout (``d = s * m``, ``m`` 0 or
    ``1 / (1 - p)``), then ``log(d + eps)`` as the authors take it. Returns that log and the loss's gradient
    with respect to the student's scores (before the row weights): with ``a = -t m / (d + eps)`` (the
    gradient with respect to ``s``), the softmax's Jacobian gives ``s * (a - sum(s * a))``."""
    s = s_logp.exp()
    m = torch.empty_like(s).bernoulli_(1.0 - p).div_(1.0 - p)
    d = s * m
    a = -t_p * m / (d + DROPOUT_EPS)
    return torch.log(d + DROPOUT_EPS), s * (a - (s * a).sum(-1, keepdim=True))


def relation_kl(teacher_qkv: Sequence[torch.Tensor], student_qkv: Sequence[torch.Tensor],
                attention_mask: torch.Tensor, num_heads: int, chunk_elements: int = CHUNK_ELEMENTS,
                dropout: float = 0.0) -> torch.Tensor:
    """Mean over Q-Q, K-K, V-V of KL(teacher || student) per (query token, relation head) row.

    The teacher and student hidden sizes may differ; both are split into ``num_heads`` relations, so
    their [L, L] relation maps compare one to one. Padded keys get probability 0; rows of padded
    query positions are dropped. Differentiable with respect to the student's tensors only.

    ``dropout`` > 0 applies dropout to the student's relation probabilities first (the authors' training:
    0.1), drawing its masks from the default generator; 0 is the plain loss (and draws nothing).
    """
    if len(teacher_qkv) != len(student_qkv):
        raise ValueError(f"{len(teacher_qkv)} teacher and {len(student_qkv)} student relation inputs")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"relation dropout {dropout} must be in [0, 1)")
    return _RelationKL.apply(attention_mask, num_heads, chunk_elements, float(dropout), *teacher_qkv,
                             *student_qkv)


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
