"""Fine-tune several models on several tasks and seeds, then print the paper-style table.

    python launchers/sweep.py --models runs/demo/student,packaged:all-MiniLM-L6-v2 --tasks sentiment,wnut16
    python launchers/sweep.py --models runs/bert-4L/student --tasks sst2,mrpc,stsb,qqp,mnli,qnli,rte,cola \
        --seeds 1,2,3 --launcher "deepspeed --num_gpus 8" --extra="--num_epochs 5 --lr 1e-4"

Each run is one launchers/finetune.py process in <output_dir>/<model>/<task>/seed<S>/ (a run whose
results.json exists is not run again, so a sweep can be resumed). Writes sweep.json and sweep.md.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimoe.cli import main  # noqa: E402
from minimoe.config import ConfigError, SweepConfig, check_output_dir  # noqa: E402
from minimoe.errors import ChildFailed  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _items(v) -> list[str]:
    return [str(x).strip() for x in (v if isinstance(v, (tuple, list)) else str(v).split(",")) if str(x).strip()]


def _name(model: str) -> str:
    return model.rstrip("/").replace("packaged:", "").replace("/", "_").replace(":", "_")


def _check(cfg: SweepConfig) -> tuple[list, list, list, list, list]:
    """Every part of the sweep that can be wrong, before its first run: names, seeds, the launcher."""
    from minimoe.data.tasks import get_task
    models, tasks, seeds = _items(cfg.models), _items(cfg.tasks), _items(cfg.seeds)
    for name, items in (("models", models), ("tasks", tasks), ("seeds", seeds)):
        if not items:
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
    except ValueError as e:
        raise ConfigError(f"--launcher / --extra cannot be split into arguments: {e}")
    if not launcher or not shutil.which(launcher[0]):
        raise ConfigError(f"--launcher {cfg.launcher!r}: {launcher[:1]} is not a command on PATH")
    _check_extra(extra)
    check_output_dir(cfg.output_dir)
    return models, tasks, seeds, launcher, extra


def _check_extra(extra: list[str]) -> None:
    """--extra's flags, read as launchers/finetune.py will read them, so that a typo stops the sweep before
    its first run; the flags the sweep sets itself per run are refused."""
    import fire.parser
    from minimoe.config import FinetuneConfig
    from minimoe.flags import from_flags
    flags, key = {}, None
    for token in extra:
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            flags[key] = fire.parser.DefaultParseValue(value) if eq else True
            key = None if eq else key
        elif key is not None:
            flags[key], key = fire.parser.DefaultParseValue(token), None
        else:
            raise ConfigError(f"--extra: {token!r} belongs to no flag")
    taken = sorted(set(flags) & {"model", "task", "seed", "output_dir"})
    if taken:
        raise ConfigError(f"--extra sets --{taken[0]}, which the sweep sets for each run; use --models, --tasks, "
                          "--seeds or --output_dir of the sweep")
    from_flags(FinetuneConfig, flags)  # unknown names and bad values: the finetune launcher's own line


def run(cfg: SweepConfig) -> None:
    models, tasks, seeds, launcher, extra = _check(cfg)
    scores = {}
    for m in models:
        for t in tasks:
            for s in seeds:
                out = os.path.join(cfg.output_dir, _name(m), t, f"seed{s}")
                res = os.path.join(out, "results.json")
                if not os.path.isfile(res):
                    cmd = [*launcher, os.path.join(HERE, "finetune.py"), "--model", m, "--task", t,
                           "--seed", s, "--output_dir", out, *extra]
                    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
                    code = subprocess.run(cmd).returncode
                    if code != 0:  # the run said why in its own line, just above
                        raise ChildFailed(f"the run for model {m}, task {t}, seed {s} failed (exit code {code}; "
                                          f"its error is the line above); fix it and run the sweep again: finished "
                                          "runs are kept", code)
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
