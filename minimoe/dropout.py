"""Dropout on CPU without ``bernoulli_``: the keep mask drawn two entries per generator call.

PyTorch's CPU dropout draws its mask with ``bernoulli_``, one generator call per entry: 32 ms for a
[32, 12, 128, 128] attention map on 2 cores, as much as the layer's matmuls. ``keep_mask`` reads each
uniform 32-bit integer as two 16-bit ones: 13 ms (``benchmarks/kernels.py``, results/kernels.json). The
drop probability is quantised to 1/65536 (p = 0.1 drops 6554 / 65536 = 0.1000061 of the entries), and the
mask comes from the default CPU generator as ``bernoulli_``'s does, so runs stay reproducible from the seed.
On other devices ``Dropout`` is PyTorch's (fused kernels there).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_HALF = 1 << 15


def keep_mask(shape: tuple, p: float, device: torch.device) -> torch.Tensor:
    """Bool tensor of ``shape``, each entry True with probability ``1 - p`` (to 1/65536), from the default
    generator: uniform 32-bit integers read as pairs of 16-bit ones, each kept where >= a threshold."""
    n = math.prod(shape)
    words = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_(-(1 << 31), (1 << 31) - 1)
    halves = words.view(torch.int16)[:n].view(shape)
    return halves >= round(p * 2 * _HALF) - _HALF


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``, with ``keep_mask`` on CPU."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return x * keep_mask(x.shape, p, x.device).to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same attributes, same state dict), with ``keep_mask`` on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
