"""The reference printed beside ``make finetune-demo``'s scores: the demo student, its dense twin and the
packaged teacher, each fine-tuned on the offline tasks by the Makefile's recipe; writes
``results/reference.json`` (scores, commands, wall times, the machine), which ``view.py`` reads.

    make tasks && python experiments/finetune_demo/reference.py          # ~40 minutes on 2 CPU cores

The demo student is distilled by ``make demo``'s command, the dense twin by the same command with
``--num_experts 1 --ep_size 1`` (one expert cannot be split over ranks: the two ranks are data-parallel);
the teacher (``packaged:all-MiniLM-L6-v2``) is fine-tuned as a dense Hugging Face encoder. A run whose
output is there is not run again, so an interrupted reference continues; the commands recorded are the
ones each run's ``run_config.json`` holds.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "results", "reference.json")
PROBES = os.path.join(HERE, "results", "probes.json")

# make demo's distillation (Makefile, NPROC 2); the twin's has TWIN in place of --ep_size 2. The fine-tuning
# recipe per task is the Makefile's finetune-demo one: tests/test_finetune_demo.py checks that they agree.
DEMO = {"ep_size": "2", "teacher_placement": "zero3", "micro_batch_size": "16"}
TWIN = {"ep_size": "1", "num_experts": "1"}
RECIPE = {"sentiment": {"lr": 1e-4, "num_epochs": 3}, "wnut16": {"lr": 3e-4, "num_epochs": 5}}
TEACHER = "packaged:all-MiniLM-L6-v2"
COLUMNS = [  # the reference's models, in the table's order: key, label
    {"key": "demo", "label": "reference: demo student"},
    {"key": "dense_twin", "label": "dense twin"},
    {"key": "teacher", "label": "teacher MiniLM-L6"},
]


def flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k}", v if isinstance(v, str) else f"{v:g}")]


def main(out: str = "runs/finetune-demo-reference", jobs: int = 1, probes: str = ""):
    """Distil the demo student and its twin, fine-tune the three models on both tasks, write the JSON.

    out: folder of the runs (distillations and fine-tunings; large, not committed).
    jobs: fine-tuning runs at a time, each with cpu_count / jobs threads (on a shared 2-core machine two
        1-thread runs finish sooner than the same two with 2 threads each, one after the other).
    probes: instead, a glob of finished fine-tuning runs (the probes that chose the recipe): write each one's
        command, best and per-epoch dev scores into results/probes.json.
    """
    if probes:
        return _write_probes(probes)
    os.makedirs(out, exist_ok=True)
    students = {"demo": os.path.join(out, "demo"), "dense_twin": os.path.join(out, "dense_twin")}
    walls = {}
    for key, folder in students.items():
        if not os.path.isfile(os.path.join(folder, "student", "model.safetensors")):
            student = {**DEMO, **TWIN} if key == "dense_twin" else DEMO
            cmd = [_deepspeed(), "--num_gpus", "2", "launchers/distill.py", *flags(student),
                   "--output_dir", folder]
            walls[f"distill/{key}"] = _run(cmd)
    models = {"demo": os.path.join(students["demo"], "student"),
              "dense_twin": os.path.join(students["dense_twin"], "student"), "teacher": TEACHER}
    runs = {(m, t): os.path.join(out, "finetune", f"{m}-{t}") for m in models for t in RECIPE}
    todo = [(m, t) for (m, t), d in runs.items() if not os.path.isfile(os.path.join(d, "results.json"))]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    for i in range(0, len(todo), jobs):
        batch = todo[i:i + jobs]
        cmds = [[sys.executable, "launchers/finetune.py", "--model", models[m], "--task", t,
                 *flags(RECIPE[t]), "--output_dir", runs[m, t]] for m, t in batch]
        for (m, t), wall in zip(batch, _run_together(cmds, threads)):
            walls[f"finetune/{m}-{t}"] = wall
    reference = {
        "command": "python experiments/finetune_demo/reference.py" + (f" --jobs {jobs}" if jobs != 1 else ""),
        "date": datetime.date.today().isoformat(),
        "machine": _machine(threads),
        "recipe": RECIPE,
        "columns": COLUMNS,
        "distill": {k: _read(os.path.join(f, "run_config.json"))["command"] for k, f in students.items()},
        "scores": {t: {m: _read(os.path.join(runs[m, t], "results.json"))["best"]["main"] for m in models}
                   for t in RECIPE},
        "runs": {f"{m}-{t}": _summary(runs[m, t]) for m, t in runs},
        "wall_s_this_invocation": walls,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump(reference, fh, indent=1)
        fh.write("\n")
    sys.path.insert(0, HERE)
    from view import load_run, table
    print(table([load_run(runs["demo", t]) for t in RECIPE], reference), end="")
    print(f"wrote {os.path.relpath(OUT)}")


def _write_probes(pattern: str) -> None:
    folders = sorted(glob.glob(pattern))
    done = [f for f in folders if os.path.isfile(os.path.join(f, "results.json"))]
    if not done:
        raise SystemExit(f"error: --probes {pattern!r} matches no finished fine-tuning run (results.json)")
    rows = {os.path.basename(f): _summary(f) for f in done}
    for f, row in zip(done, rows.values()):  # the student's distillation, when its run folder is beside it
        student_run = os.path.dirname(_read(os.path.join(f, "run_config.json"))["model"].rstrip("/"))
        if os.path.isfile(os.path.join(student_run, "run_config.json")):
            row["distill"] = _read(os.path.join(student_run, "run_config.json"))["command"]
    probes = {"command": f"python experiments/finetune_demo/reference.py --probes '{pattern}'",
              "date": datetime.date.today().isoformat(), "machine": _machine(None), "runs": rows}
    os.makedirs(os.path.dirname(PROBES), exist_ok=True)
    with open(PROBES, "w") as fh:
        json.dump(probes, fh, indent=1)
        fh.write("\n")
    for name, r in rows.items():
        print(f"{name}: best {r['main_metric']} {100 * r['best']:.2f} (by epoch: "
              f"{', '.join(f'{100 * v:.1f}' for v in r['dev_by_epoch'])}), {r['wall_s']:.0f} s")
    print(f"wrote {os.path.relpath(PROBES)}")


def _deepspeed() -> str:
    """This Python's deepspeed launcher (the venv's, as the Makefile's), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return beside if os.path.isfile(beside) else "deepspeed"


def _run(cmd: list[str]) -> float:
    print("$ " + shlex.join(cmd), flush=True)
    t = time.perf_counter()
    code = subprocess.run(cmd, cwd=REPO).returncode
    if code:
        raise SystemExit(f"error: {shlex.join(cmd[:4])} ... failed with exit code {code} (its error is "
                         "above); run the reference again to continue")
    return time.perf_counter() - t


def _run_together(cmds: list[list[str]], threads: int) -> list[float]:
    """Start every command, wait for all; each one's wall time (a failure stops the reference)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t, procs, walls = time.perf_counter(), [], {}
    for cmd in cmds:
        print("$ " + shlex.join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env))
    while len(walls) < len(procs):
        for i, p in enumerate(procs):
            if i not in walls and p.poll() is not None:
                walls[i] = time.perf_counter() - t
        time.sleep(1)
    for cmd, p in zip(cmds, procs):
        if p.returncode:
            raise SystemExit(f"error: {shlex.join(cmd[1:6])} ... failed with exit code {p.returncode} (its "
                             "error is above); run the reference again to continue")
    return [walls[i] for i in range(len(procs))]


def _read(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _summary(folder: str) -> dict:
    r, c = _read(os.path.join(folder, "results.json")), _read(os.path.join(folder, "run_config.json"))
    return {"command": c["command"], "main_metric": r["main_metric"], "best": r["best"]["main"],
            "best_step": r["best"]["step"], "steps": r["steps"], "wall_s": round(r["wall_s"], 1),
            "dev_by_epoch": [round(h["dev"]["dev"][r["main_metric"]], 4) for h in r["history"]]}


def _machine(threads) -> dict:
    """The machine; threads: each fine-tuning run's (None: not set by this script)."""
    import deepspeed
    import torch
    import transformers
    model = ""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    return {"cpu": model, "cpu_count": os.cpu_count(), "threads_per_finetune": threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    import fire
    fire.Fire(main)
