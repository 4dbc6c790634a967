"""What bf16 costs in quality: one distillation in fp32 and in bf16, training and held-out loss side by side.

    python benchmarks/precision.py                 # the demo's job, 100 steps, fp32 / bf16 / bf16-teacher
    python benchmarks/precision.py --steps 40 --eval_every 20 --precisions fp32,bf16

Each run is the public launcher (``launchers/distill.py``: the packaged MiniLM-L6 teacher, the packaged
Wikipedia sample with 10% of its documents held out, the default 4-expert student, one process, seed 776)
in a fresh process; only the precision differs (``bf16``: student and teacher; ``bf16-teacher``: an fp32
student taught by a bf16 teacher). Reports the training relation loss at each logged step, the held-out
relation loss (dropout and gate noise off) every ``--eval_every`` steps, both relative to fp32, and the
seconds per step. Prints a table, writes JSON and a PNG (``--out``). Not a test: numbers, not asserts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import fire  # noqa: E402

from benchmarks.report import pyplot, save  # noqa: E402

# The launcher's flags for each kind (--teacher_precision auto follows --precision).
KINDS = {"fp32": ["--precision", "fp32"], "bf16": ["--precision", "bf16"],
         "bf16-teacher": ["--precision", "fp32", "--teacher_precision", "bf16"]}


def _run(kind: str, steps: int, eval_every: int, micro_batch: int, work: str) -> dict:
    out = tempfile.mkdtemp(prefix=f"{kind}-", dir=work)
    cmd = [sys.executable, os.path.join(REPO, "launchers", "distill.py"), "--output_dir", out, "--max_steps",
           str(steps), "--micro_batch_size", str(micro_batch), "--eval_fraction", "0.1", "--eval_every",
           str(eval_every), "--log_every", "5", "--save_every", "0", "--wandb", "disabled", *KINDS[kind]]
    p = subprocess.run(cmd, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"the {kind} run failed ({p.returncode}): {(p.stdout + p.stderr)[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = {r["step"]: r["relation"] for r in rows if "relation" in r}
    held = {r["step"]: r["heldout_relation"] for r in rows if "heldout_relation" in r}
    timed = [r["step_s"] for r in rows if "step_s" in r]
    timed = timed[1:] or timed  # the first logged window holds the warm-up (unless it is the only one)
    return {"precision": kind, "train_relation": train, "heldout_relation": held,
            "step_s": sum(timed) / len(timed)}


def bench(precisions: str = "fp32,bf16,bf16-teacher", steps: int = 100, eval_every: int = 25,
          micro_batch: int = 32, out: str = "benchmarks/results/precision.json") -> None:
    """Run the job at each of ``--precisions`` (fp32 first: the others are read against it)."""
    kinds = precisions if isinstance(precisions, (tuple, list)) else str(precisions).split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or kinds[0] != "fp32":
        allowed = ", ".join(list(KINDS)[1:])
        print(f"--precisions {','.join(kinds)} is invalid: fp32 first, then any of {allowed}",
              file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="minimoe-precision-") as work:
        runs = [_run(k, steps, eval_every, micro_batch, work) for k in kinds]
    base = runs[0]
    for r in runs:
        r["train_rel_diff"] = {s: v / base["train_relation"][s] - 1 for s, v in r["train_relation"].items()
                               if s in base["train_relation"]}
        held = base["heldout_relation"]
        r["heldout_rel_diff"] = {s: v / held[s] - 1 for s, v in r["heldout_relation"].items() if s in held}
    last = max(base["heldout_relation"])
    print(f"{'precision':<13} {'s/step':>7} {'train, last':>12} {'vs fp32':>8} {'held-out, last':>15} "
          f"{'vs fp32':>8} {'worst held-out vs fp32':>23}")
    for r in runs:
        t_last = max(r["train_relation"])
        worst = max(r["heldout_rel_diff"].values(), key=abs)
        print(f"{r['precision']:<13} {r['step_s']:>7.2f} {r['train_relation'][t_last]:>12.4f} "
              f"{r['train_rel_diff'][t_last]:>+8.2%} {r['heldout_relation'][last]:>15.4f} "
              f"{r['heldout_rel_diff'][last]:>+8.2%} {worst:>+23.2%}")
    result = {"steps": steps, "eval_every": eval_every, "micro_batch": micro_batch, "runs": runs}
    save(result, out, _plot)


def _plot(result: dict, path: str) -> None:
    """Training and held-out relation loss against the step, one line per precision."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for r in result["runs"]:
        for ax, key in zip(axes, ("train_relation", "heldout_relation")):
            steps = sorted(r[key])
            ax.plot(steps, [r[key][s] for s in steps], marker="." if key == "heldout_relation" else None,
                    label=r["precision"])
    axes[0].set_title("training relation loss")
    axes[1].set_title("held-out relation loss (dropout and noise off)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    fire.Fire(bench)
