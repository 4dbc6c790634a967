"""Fine-tune several models on several tasks and seeds, then print the paper-style table.

    python launchers/sweep.py --models runs/demo/student,packaged:all-MiniLM-L6-v2 --tasks sentiment,wnut16
    python launchers/sweep.py --models runs/bert-4L/student --tasks sst2,mrpc,stsb,qqp,mnli,qnli,rte,cola \
        --seeds 1,2,3 --launcher "deepspeed --num_gpus 8" --extra="--num_epochs 5 --lr 1e-4"

    python launchers/sweep.py --students students.yaml --distill_extra='--teacher bert-base-uncased \
        --max_steps 20000' --tasks sst2,mrpc --launcher "deepspeed --num_gpus 8"

Each run is one launchers/finetune.py process in <output_dir>/<model>/<task>/seed<S>/ (a run whose
results.json exists is not run again, and an interrupted one continues from its checkpoint with --resume
auto, so a sweep can be resumed). With --students, one launchers/distill.py
run first distils every listed student from one teacher pass into <output_dir>/distill/ (continued with
--resume auto when the sweep is run again), and each student is then fine-tuned under its name.
Writes sweep.json and sweep.md.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimoe.cli import main  # noqa: E402
from minimoe.config import DEMO_RUN, ConfigError, SweepConfig, check_output_dir  # noqa: E402
from minimoe.errors import ChildFailed  # noqa: E402
from minimoe.flags import from_flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = f"{DEMO_RUN}/student"


def _items(v) -> list[str]:
    return [str(x).strip() for x in (v if isinstance(v, (tuple, list)) else str(v).split(","))
            if str(x).strip()]


def _name(model: str) -> str:
    return model.rstrip("/").replace("packaged:", "").replace("/", "_").replace(":", "_")


def _check(cfg: SweepConfig) -> tuple[list, list, list, list, list, list]:
    """Every part of the sweep that can be wrong, before its first run: names, seeds, the launcher, the
    students to distil and both launchers' extra flags."""
    from minimoe.config import DistillConfig, FinetuneConfig
    from minimoe.data.tasks import get_task
    models, tasks, seeds = _items(cfg.models), _items(cfg.tasks), _items(cfg.seeds)
    if not str(cfg.models).strip() and not cfg.students:
        models = [DEFAULT_MODEL]
    for name, items in (("models", models), ("tasks", tasks), ("seeds", seeds)):
        if not items and (name != "models" or not cfg.students):
            raise ConfigError(f"--{name} {getattr(cfg, name)!r} names nothing: give a comma-separated list")
    for t in tasks:
        get_task(t)  # unknown task names fail before any run
    bad = [s for s in seeds if not s.isdigit()]
    if bad:
        raise ConfigError(f"--seeds {cfg.seeds!r}: {bad[0]!r} is not a non-negative integer")
    for m in models:
        looks_local = os.sep in m or m.startswith(".")
        if looks_local and not os.path.isdir(m):
            raise ConfigError(f"--models: {m!r} is not a folder (a student folder, or a hub name)")
    try:
        launcher, extra = shlex.split(cfg.launcher), shlex.split(cfg.extra)
        distill_extra = shlex.split(cfg.distill_extra)
    except ValueError as e:
        raise ConfigError(f"--launcher / --extra / --distill_extra cannot be split into arguments: {e}")
    launcher = _this_python(launcher)
    if not launcher or not shutil.which(launcher[0]):
        raise ConfigError(f"--launcher {cfg.launcher!r}: {launcher[:1]} is not a command on PATH")
    _check_extra(extra, FinetuneConfig, "--extra", ("model", "task", "seed", "output_dir", "resume"))
    students = []
    if cfg.students:
        from minimoe.students import expand
        flags = _check_extra(distill_extra, DistillConfig, "--distill_extra",
                             ("students", "output_dir", "resume"))
        planned = from_flags(DistillConfig, {**flags, "students": cfg.students})
        students = [name for name, _ in expand(planned)]
    check_output_dir(cfg.output_dir)
    return models, tasks, seeds, launcher, extra, students


def _this_python(launcher: list[str]) -> list[str]:
    """``python`` (the default) is the interpreter running the sweep, and ``deepspeed`` / ``torchrun`` the
    ones installed next to it: the first on PATH may belong to another Python, without minimoe's packages
    (its child failed with "No module named 'fire'")."""
    if launcher and launcher[0] in ("python", "python3"):
        return [sys.executable, *launcher[1:]]
    if launcher and launcher[0] in ("deepspeed", "torchrun"):
        beside = os.path.join(os.path.dirname(sys.executable), launcher[0])
        if os.access(beside, os.X_OK):
            return [beside, *launcher[1:]]
    return launcher


def _check_extra(extra: list[str], config_cls, what: str, taken_by_sweep: tuple) -> dict:
    """Extra flags, read as the launcher they go to will read them, so that a typo stops the sweep before
    its first run; the flags the sweep sets itself are refused."""
    import fire.parser
    flags, key = {}, None
    for token in extra:
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            flags[key] = fire.parser.DefaultParseValue(value) if eq else True
            key = None if eq else key
        elif key is not None:
            flags[key], key = fire.parser.DefaultParseValue(token), None
        else:
            raise ConfigError(f"{what}: {token!r} belongs to no flag")
    taken = sorted(set(flags) & set(taken_by_sweep))
    if taken:
        raise ConfigError(f"{what} sets --{taken[0]}, which the sweep sets itself; use the sweep's own flags "
                          "(--models, --students, --tasks, --seeds, --output_dir)")
    try:
        from_flags(config_cls, flags)  # unknown names and bad values: the launcher's own line
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    return flags


def _run(cmd: list[str], what: str) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0:  # the run said why in its own line, just above
        raise ChildFailed(f"{what} failed (exit code {code}; its error is the line above); fix it and "
                          "run the sweep again: finished runs are kept", code)


def _distil(cfg: SweepConfig, launcher: list[str], students: list[str]) -> dict:
    """The students distilled together (once: a finished run is kept, an interrupted one continued)."""
    out = os.path.join(cfg.output_dir, "distill")
    if not os.path.isfile(os.path.join(out, "summary.json")):
        _run([*launcher, os.path.join(HERE, "distill.py"), "--students", cfg.students, "--output_dir", out,
              "--resume", "auto", *shlex.split(cfg.distill_extra)], "the distillation of --students")
    return {name: os.path.join(out, "students", name, "student") for name in students}


def run(cfg: SweepConfig) -> None:
    models, tasks, seeds, launcher, extra, students = _check(cfg)
    paths = {m: m for m in models}  # the table's name of a model -> what fine-tuning loads
    if students:
        paths.update(_distil(cfg, launcher, students))
    models = list(paths)
    scores = {}
    for m in models:
        for t in tasks:
            for s in seeds:
                out = os.path.join(cfg.output_dir, _name(m), t, f"seed{s}")
                res = os.path.join(out, "results.json")
                if not os.path.isfile(res):
                    # --resume auto: a run interrupted (or failed after a checkpoint) continues when the
                    # sweep does
                    _run([*launcher, os.path.join(HERE, "finetune.py"), "--model", paths[m], "--task", t,
                          "--seed", s, "--output_dir", out, "--resume", "auto", *extra],
                         f"the run for model {m}, task {t}, seed {s}")
                with open(res) as fh:
                    r = json.load(fh)
                scores.setdefault(m, {}).setdefault(t, []).append(r["best"]["main"])
    table = ["| model | " + " | ".join(tasks) + " | avg |", "|---|" + "---|" * (len(tasks) + 1)]
    summary = {}
    for m in models:
        means = {t: sum(v) / len(v) for t, v in scores[m].items()}
        summary[m] = {"per_task": means, "average": sum(means.values()) / len(means), "runs": scores[m]}
        table.append(f"| {m} | " + " | ".join(f"{100 * means[t]:.2f}" for t in tasks)
                     + f" | {100 * summary[m]['average']:.2f} |")
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "sweep.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    with open(os.path.join(cfg.output_dir, "sweep.md"), "w") as fh:
        fh.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    sys.exit(main(SweepConfig, run, "launchers/sweep.py"))
