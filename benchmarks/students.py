"""K students from one teacher pass (``--students``) against K separate runs: time per step and peak memory.

    python benchmarks/students.py                          # K = 1, 2, 4; MiniLM-L6 and MPNet-base teachers
    python benchmarks/students.py --teachers minilm --ks 1,2 --steps 6

Every point is the real launcher (``launchers/distill.py``, one process, ZeRO-2 students, the packaged
Wikipedia sample) in a fresh process. The students are 4L H384 (12 heads, FFN 1536), alternately E=4
and E=1 (dense): K=2 is one of each, K=4 two of each. K separate runs cost the sum of their students'
single-run step times (measured once per kind). A step's time is the mean ``step_s`` that the run's
metrics.jsonl logs, the first logged window (warm-up) left out. The MPNet-base teacher is assembled from
its PyPI byte parts (``make bench`` installs them; skipped if missing).

Prints a table, writes JSON and a PNG (``--out``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import fire  # noqa: E402

from benchmarks.report import pyplot  # noqa: E402

KINDS = {"moe4": "num_experts=4", "dense": "num_experts=1"}


def _teacher(name: str, cache: str):
    if name == "minilm":
        return "packaged:all-MiniLM-L6-v2", "MiniLM-L6 (22.7M)"
    if name == "mpnet":
        from teacher_scaling import mpnet_folder
        folder = mpnet_folder(cache)
        return (folder, "MPNet-base (109.5M)") if folder else (None, None)
    raise SystemExit(f"--teachers: unknown teacher {name!r}; allowed minilm, mpnet")


def _students(k: int) -> str:
    kinds = list(KINDS)
    return ";".join(f"{kinds[i % 2]}{i // 2}:{KINDS[kinds[i % 2]]}" for i in range(k))


def _run(teacher: str, students: str, steps: int, micro_batch: int, work: str) -> dict:
    """One launcher run; (seconds per step, peak RSS MiB)."""
    out = tempfile.mkdtemp(dir=work)
    cmd = [sys.executable, os.path.join(REPO, "launchers", "distill.py"), "--teacher", teacher,
           "--output_dir", out, "--max_steps", str(steps), "--log_every", "2", "--save_every", "0",
           "--micro_batch_size", str(micro_batch), "--wandb", "disabled", "--students", students]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the run failed ({p.returncode}): {(p.stdout + p.stderr)[-2000:]}")
    summary = json.load(open(os.path.join(out, "summary.json")))
    first = next(iter(summary["students"]))
    rows = [json.loads(line) for line in open(os.path.join(out, "students", first, "metrics.jsonl"))]
    times = [r["step_s"] for r in rows[1:]] or [r["step_s"] for r in rows]
    shares = {name: [json.loads(line)["student_share"] for line in
                     open(os.path.join(out, "students", name, "metrics.jsonl"))][1:]
              for name in summary["students"]}
    result = {"step_s": sum(times) / len(times), "teacher_share": rows[-1]["teacher_share"],
              "student_share": {n: sum(v) / max(1, len(v)) for n, v in shares.items()},
              "peak_rss_mib": max(summary["students"][first]["peak_rss_mib_per_rank"])}
    shutil.rmtree(out, ignore_errors=True)
    return result


def bench(teachers: str = "minilm,mpnet", ks: str = "1,2,4", steps: int = 10, micro_batch: int = 16,
          out: str = "benchmarks/results/students.json") -> None:
    work = tempfile.mkdtemp(prefix="students-bench-")
    cache = os.path.join(os.path.expanduser(os.environ.get("MINIMOE_CACHE", "~/.cache/minimoe")), "teachers")
    ks_ = [int(k) for k in str(ks).split(",")] if not isinstance(ks, (tuple, list)) else [int(k) for k in ks]
    names = teachers.split(",") if isinstance(teachers, str) else list(teachers)
    rows = []
    for name in names:
        teacher, label = _teacher(name, cache)
        if teacher is None:
            continue
        alone = {kind: _run(teacher, f"{kind}:{KINDS[kind]}", steps, micro_batch, work) for kind in KINDS}
        for k in ks_:
            together = _run(teacher, _students(k), steps, micro_batch, work)
            kinds = [list(KINDS)[i % 2] for i in range(k)]
            separate = sum(alone[kind]["step_s"] for kind in kinds)
            tokens = micro_batch * 128  # the sample's pairs fill 128 tokens but for BERT's short-pair draws
            rows.append({"teacher": label, "k": k, "students": kinds, "step_s": together["step_s"],
                         "separate_step_s": separate, "ratio": together["step_s"] / separate,
                         "sequences_per_s_per_student": micro_batch / together["step_s"],
                         "sequences_per_s_all": k * micro_batch / together["step_s"],
                         "separate_sequences_per_s_all": k * micro_batch / separate,
                         "teacher_share": together["teacher_share"], "peak_rss_mib": together["peak_rss_mib"],
                         "separate_peak_rss_mib": max(alone[kind]["peak_rss_mib"] for kind in kinds),
                         "tokens_per_step_at_most": tokens})
            r = rows[-1]
            print(f"{label:<22} K={k}: {r['step_s']:.2f} s/step vs {separate:.2f} s in {k} runs "
                  f"(x{r['ratio']:.2f}), peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    head = ["teacher", "K", "one run s/step", "K runs s/step", "one run / K runs", "seq/s per student",
            "seq/s all (one run)", "seq/s all (K runs)", "teacher share", "peak RSS one run",
            "peak RSS a run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['teacher']} | {r['k']} | {r['step_s']:.2f} | {r['separate_step_s']:.2f} | "
                     f"**{r['ratio']:.2f}** | {r['sequences_per_s_per_student']:.1f} | "
                     f"{r['sequences_per_s_all']:.1f} | "
                     f"{r['separate_sequences_per_s_all']:.1f} | {r['teacher_share']:.0%} | "
                     f"{r['peak_rss_mib'] / 1024:.1f} GiB | {r['separate_peak_rss_mib'] / 1024:.1f} GiB |")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"steps": steps, "micro_batch": micro_batch, "seq_len": 128, "rows": rows}, fh, indent=2)
    _plot(rows, out.rsplit(".", 1)[0] + ".png")


def _plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["teacher"] for r in rows):
        mine = [r for r in rows if r["teacher"] == label]
        ax.plot([r["k"] for r in mine], [r["ratio"] for r in mine], "o-", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("students K")
    ax.set_ylabel("time of one run / time of K runs")
    ax.set_title("K students from one teacher pass")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    fire.Fire(bench)
