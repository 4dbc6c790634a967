"""The CPU kernels behind this round's speed-ups, each against what it replaced, at the step's shapes.

    python benchmarks/kernels.py                      # writes benchmarks/results/kernels.json

One process, the machine's threads; each line the best of ``--reps`` timings in ms (best, not median: these
are short kernels, and the machine is shared). What each row shows:

- ``matmul``: a bf16 expert matmul [M, 1536] x [1536, 384] at M it has not seen (oneDNN compiles a kernel per
  shape), at M it has, and at M bucketed as ``minimoe.moe.bucketed_rows`` does; fp32 (MKL) for scale.
- ``keep mask``: dropout's keep mask for a [32, 12, 128, 128] attention map by ``bernoulli_`` (PyTorch's CPU
  dropout) and by ``minimoe.dropout.keep_mask``.
- ``attention``: a layer's attention core, forward + backward, 32 x 12 heads x 128^2 x 32, with dropout 0.1:
  PyTorch's SDPA (its generic path: the CPU flash kernel takes no dropout) and ``minimoe.attention``'s, in
  fp32 and bf16; SDPA without dropout (the flash kernel) for scale.
- ``exp``: a relation-loss chunk's exp (256 x 128^2) of ordinary log-probabilities, of a padded key's
  (-3.4e38) and of ones floored at ``minimoe.losses.LOG_FLOOR``.
- ``relation bias``: the chunk's scores with the padding bias read by baddbmm, and not read at all (no
  padding: beta 0).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.report import save  # noqa: E402


def _best_ms(fn, reps: int, warm: bool = True) -> float:
    if warm:
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _matmul_rows(reps: int) -> list[dict]:
    from minimoe.moe import bucketed_rows
    w = torch.randn(384, 1536, dtype=torch.bfloat16)
    counts = list(range(701, 701 + 7 * reps, 7))  # each M once: a shape oneDNN has not compiled yet
    per_new = []
    for m in counts:
        x = torch.randn(m, 1536, dtype=torch.bfloat16)
        per_new.append(_best_ms(lambda: F.linear(x, w), 1, warm=False))
    x = torch.randn(counts[0], 1536, dtype=torch.bfloat16)
    seen = _best_ms(lambda: F.linear(x, w), reps)
    buckets = sorted({bucketed_rows(m) for m in counts})
    for m in buckets:  # compile each bucket once, as the first steps of a run do
        F.linear(torch.randn(m, 1536, dtype=torch.bfloat16), w)
    bucketed = []
    for m in counts:
        x = torch.randn(bucketed_rows(m), 1536, dtype=torch.bfloat16)
        bucketed.append(_best_ms(lambda: F.linear(x, w), 1, warm=False))
    w32, x32 = w.float(), torch.randn(counts[0], 1536)
    return [{"kernel": "matmul", "case": "bf16, a new M each call", "ms": min(per_new)},
            {"kernel": "matmul", "case": "bf16, an M seen before", "ms": seen},
            {"kernel": "matmul", "case": f"bf16, M bucketed ({len(buckets)} buckets for {len(counts)} Ms)",
             "ms": min(bucketed)},
            {"kernel": "matmul", "case": "fp32 (MKL), for scale", "ms": _best_ms(lambda: F.linear(x32, w32),
                                                                                           reps)}]


def _dropout_rows(reps: int) -> list[dict]:
    from minimoe.dropout import keep_mask
    shape = (32, 12, 128, 128)
    return [{"kernel": "keep mask", "case": "bernoulli_ (PyTorch's CPU dropout)",
             "ms": _best_ms(lambda: torch.empty(shape).bernoulli_(0.9), reps)},
            {"kernel": "keep mask", "case": "minimoe.dropout.keep_mask",
             "ms": _best_ms(lambda: keep_mask(shape, 0.1, torch.device("cpu")), reps)}]


def _attention_rows(reps: int) -> list[dict]:
    from minimoe.attention import dropped_attention
    rows = []
    key_mask = torch.ones(32, 1, 1, 128, dtype=torch.bool)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(32, 12, 128, 32, dtype=dtype, requires_grad=True) for _ in range(3))
        name = str(dtype).replace("torch.", "")
        cases = {"SDPA, dropout 0.1": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                                                             dropout_p=0.1),
                 "minimoe.attention, dropout 0.1": lambda: dropped_attention(q, k, v, key_mask, 0.1),
                 "SDPA, no dropout (flash)": lambda: F.scaled_dot_product_attention(q, k, v,
                                                                                    attn_mask=key_mask)}
        for case, fn in cases.items():
            rows.append({"kernel": "attention fwd+bwd", "case": f"{name}, {case}",
                         "ms": _best_ms(lambda: fn().sum().backward(), reps)})
    return rows


def _loss_rows(reps: int) -> list[dict]:
    from minimoe.losses import LOG_FLOOR
    ordinary = torch.log_softmax(torch.randn(256, 128, 128) * 3, -1)
    padded = ordinary.clone()
    padded[..., 64:] = torch.finfo(torch.float32).min  # half the keys padded
    x, bias = torch.randn(256, 128, 12), torch.zeros(256, 1, 128)
    return [{"kernel": "exp", "case": "log-probabilities", "ms": _best_ms(lambda: ordinary.exp(), reps)},
            {"kernel": "exp", "case": "half of them padded keys (-3.4e38)",
             "ms": _best_ms(lambda: padded.exp(), reps)},
            {"kernel": "exp", "case": f"padded, floored at {LOG_FLOOR:g} first",
             "ms": _best_ms(lambda: padded.clamp_min(LOG_FLOOR).exp(), reps)},
            {"kernel": "relation bias", "case": "read (baddbmm, bias [256, 1, 128])",
             "ms": _best_ms(lambda: torch.baddbmm(bias, x, x.transpose(1, 2), alpha=0.3), reps)},
            {"kernel": "relation bias", "case": "not read (no padding: beta 0)",
             "ms": _best_ms(lambda: torch.baddbmm(bias, x, x.transpose(1, 2), beta=0.0, alpha=0.3), reps)}]


def bench(reps: int = 10, out: str = "benchmarks/results/kernels.json") -> None:
    """Time each kernel and what it replaced; print a table, write JSON."""
    rows = _matmul_rows(reps) + _dropout_rows(reps) + _attention_rows(reps) + _loss_rows(reps)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, best of {reps}")
    for r in rows:
        print(f"{r['kernel']:<18} {r['case']:<52} {r['ms']:>8.2f} ms")
    save({"threads": torch.get_num_threads(), "torch": torch.__version__, "reps": reps, "rows": rows}, out)


if __name__ == "__main__":
    fire.Fire(bench)
