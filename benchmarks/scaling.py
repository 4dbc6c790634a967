"""Step time and peak memory of a distillation step as the sequence grows and as experts are added.

    python benchmarks/scaling.py                 # L 64..512 (E=1, E=4) and E 1..16 (L 128); ~8 min on 2 cores
    python benchmarks/scaling.py --lengths 128,512 --experts 1,4 --steps 1

Every point is ``distill_step.py``'s measurement (the real engines, one fresh process per point). The
length sweep keeps the tokens per step fixed (``--tokens``, batch = tokens / L), so what grows with L is
what grows as L^2: attention and the [B, R, L, L] relation tensors of the loss. Peak memory is the
process's maximum RSS (teacher, engines and all). Prints a table, writes JSON and a PNG (``--out``).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fire  # noqa: E402

from distill_step import measure  # noqa: E402

from benchmarks.report import pyplot, save  # noqa: E402


def _ints(v) -> list[int]:
    return [int(x) for x in (v if isinstance(v, (tuple, list)) else str(v).split(","))]


def bench(lengths: str = "64,128,256,512", length_experts: str = "1,4", experts: str = "1,2,4,8,16",
          tokens: int = 4096, steps: int = 2, out: str = "benchmarks/results/scaling.json") -> None:
    rows = []
    for e in _ints(length_experts):
        for length in _ints(lengths):
            r = measure(str(e), micro_batch=max(1, tokens // length), seq_len=length, steps=steps)
            rows.append({"sweep": "length", **r["rows"][0], "seq_len": length,
                         "micro_batch": tokens // length})
    for e in _ints(experts):
        r = measure(str(e), micro_batch=max(1, tokens // 128), seq_len=128, steps=steps)
        rows.append({"sweep": "experts", **r["rows"][0], "seq_len": 128, "micro_batch": tokens // 128})
    print(f"{'sweep':<8} {'student':<6} {'batch x L':>10} {'step s':>7} {'tokens/s':>9} {'peak RSS MB':>11} "
          f"{'of matmul peak':>14}")
    for r in rows:
        print(f"{r['sweep']:<8} {r['student']:<6} {str(r['micro_batch']) + ' x ' + str(r['seq_len']):>10} "
              f"{r['step_s']:>7.2f} {r['tokens_per_s']:>9.0f} {r['peak_rss_mb']:>11.0f} "
              f"{r['fraction_of_matmul_peak']:>14.0%}")
    result = {"tokens_per_step": tokens, "steps": steps, "rows": rows}
    save(result, out, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(8, 6))
    for col, sweep, x_key, x_label in ((0, "length", "seq_len", "sequence length (tokens per step fixed)"),
                                       (1, "experts", "experts", "experts per FFN (32 x 128)")):
        part = [r for r in result["rows"] if r["sweep"] == sweep]
        groups = sorted({r["experts"] for r in part}) if sweep == "length" else [None]
        for e in groups:
            pts = [r for r in part if e is None or r["experts"] == e]
            label = f"E={e}" if e is not None else None
            axes[0][col].plot([r[x_key] for r in pts], [r["step_s"] for r in pts], "o-", label=label)
            axes[1][col].plot([r[x_key] for r in pts], [r["peak_rss_mb"] / 1024 for r in pts], "o-",
                              label=label)
        for row, y_label in ((0, "seconds per step"), (1, "peak RSS, GiB")):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xlabel(x_label)
            axes[row][col].set_ylabel(y_label)
            axes[row][col].set_ylim(bottom=0)
            if sweep == "length":
                axes[row][col].legend(fontsize=8)
    fig.suptitle(f"distillation step, {result['tokens_per_step']} tokens per step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    fire.Fire(bench)
