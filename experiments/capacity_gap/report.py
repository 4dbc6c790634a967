"""The capacity-gap experiment's tables and plot, from the runs in its output folder (see run.py).

Held-out relation loss: each student's last held-out score (dropout and gate noise off), mean and spread over
distillation seeds; comparable between students of one teacher, not across teachers (each teacher sets its
own target). Downstream: the best dev score of each fine-tuning run (sentiment accuracy, WNUT-16 entity F1),
mean and spread over every distillation x fine-tuning seed; comparable across teachers.
"""
from __future__ import annotations

import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("sentiment", "wnut16")


def _mean_sd(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _fmt(ms: tuple, scale: float = 1.0, digits: int = 4, sign: str = "") -> str:
    m, sd, n = ms
    if n == 0:
        return "-"
    return f"{m * scale:{sign}.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if n > 1 else "")


def teacher_parameters(folder: str) -> dict:
    """Total parameters of a teacher checkpoint, and those outside its embedding tables."""
    from minimoe.data.assets import resolve_model
    from minimoe.weights import LazyCheckpoint
    total = embedding = 0
    with LazyCheckpoint(resolve_model(folder)) as ckpt:
        for key in ckpt.keys():
            n = 1
            for d in ckpt.shape(key):
                n *= d
            if key.endswith(("position_ids", "token_type_ids")):  # buffers saved with some checkpoints
                continue
            total += n
            embedding += n if "embeddings." in key and "LayerNorm" not in key else 0
    return {"total": total, "without_embeddings": total - embedding}


def student_facts(student_folder: str, seq_len: int = 128) -> dict:
    from minimoe.student import count_parameters, flops_per_sequence, student_config_of
    cfg = student_config_of(student_folder)
    c, f = count_parameters(cfg), flops_per_sequence(cfg, seq_len)
    return {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "experts": cfg.num_experts,
            "router": cfg.router, "params": c["total"], "params_no_emb": c["total"] - c["embedding"],
            "active_no_emb": c["active"] - c["embedding"], "gflops": f["forward_flops"] / 1e9}


def collect(out: str, teachers: list[str], dseeds: list[str]) -> dict:
    """{teacher: {student: {facts, heldout: [per distill seed], routing, scores: {task: [runs]}}}}"""
    from run import TEACHERS
    result = {}
    for t in teachers:
        rows = result.setdefault(t, {})
        for seed in dseeds:
            folder = os.path.join(out, t, f"seed{seed}")
            summary_path = os.path.join(folder, "distill", "summary.json")
            if not os.path.isfile(summary_path):
                continue
            with open(summary_path) as fh:
                summaries = json.load(fh)["students"]
            for name, s in summaries.items():
                row = rows.setdefault(name, {"heldout": [], "qq": [], "kk": [], "vv": [], "entropy": [],
                                             "max_load": [], "tokens": [], "steps": [], "curves": [],
                                             "scores": {task: [] for task in TASKS}})
                if "facts" not in row:
                    row["facts"] = student_facts(os.path.join(folder, "distill", "students", name, "student"))
                held = s.get("heldout") or {}
                row["heldout"].append(held.get("relation"))
                for kind in ("qq", "kk", "vv"):
                    row[kind].append(held.get(kind))
                row["entropy"].append(held.get("routing_entropy"))
                row["max_load"].append(held.get("max_load"))
                row["tokens"].append(s.get("tokens_seen"))
                row["steps"].append(s.get("total_steps"))
                metrics = os.path.join(folder, "distill", "students", name, "metrics.jsonl")
                row["curves"].append(heldout_curve(metrics) if os.path.isfile(metrics) else ([], []))
                for task in TASKS:
                    row["scores"][task] += fine_tuned(folder, name, task)
        result[t] = {"label": TEACHERS[t][1], "teacher": teacher_parameters(TEACHERS[t][0]), "students": rows}
    return result


def fine_tuned(folder: str, student: str, task: str) -> list[float]:
    """The best dev score of each finished fine-tuning run of ``student`` on ``task``, by seed: read from the
    runs themselves, so a sweep still under way (its sweep.json not yet written) reports what it has."""
    found = []
    for path in glob.glob(os.path.join(folder, student, task, "seed*", "results.json")):
        with open(path) as fh:
            found.append((int(os.path.basename(os.path.dirname(path))[4:]), json.load(fh)["best"]["main"]))
    return [score for _, score in sorted(found)]


def recipes(out: str) -> list[str]:
    """The fine-tuning recipes the runs under ``out`` used, read from their own configs."""
    found = set()
    for path in glob.glob(os.path.join(out, "*", "seed*", "*", "*", "seed*", "run_config.json")):
        with open(path) as fh:
            cfg = json.load(fh)
        found.add(f"lr {cfg['lr']:g}, {cfg['num_epochs']:g} epochs, patience {cfg['patience']}")
    return sorted(found)


# What must match for an earlier report's rows to stand beside new runs (the budget and the seeds).
SAME_BUDGET = ("steps", "eval_pairs", "seeds", "distill_seeds")


def reusable(path: str, mode: dict) -> dict:
    """The teachers of an earlier ``results.json`` (``run.py --reuse``), refused in one line unless it was run
    with the same budget and seeds as ``mode``."""
    try:
        with open(path) as fh:
            earlier = json.load(fh)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --reuse: cannot read {path!r} as an earlier results.json ({e})") from None
    for key in SAME_BUDGET:
        if str(earlier["mode"].get(key)) != str(mode[key]):
            raise SystemExit(f"error: --reuse: {path} was run with {key} {earlier['mode'].get(key)}, "
                             f"this run with {mode[key]}; rows of another budget cannot stand in one table")
    for t in earlier["teachers"].values():
        t.setdefault("recipes", [])  # a results.json from before the recipe was recorded per teacher
    return earlier["teachers"]


def from_runs(out: str, teachers: list[str], reused: dict) -> list[str]:
    """The teachers read from (and run into) ``out``: those no earlier report stands in for, and reused ones
    whose runs are already there (the earlier report then fills in only the students they lack)."""
    return [t for t in teachers if t not in reused or os.path.isdir(os.path.join(out, t))]


def report(out: str, teachers: list[str], dseeds: list[str], mode: dict, reused: dict | None = None) -> str:
    """Write results.md, results.json, curse.png and heldout.png into ``out`` from its runs. ``reused``
    (``reusable``: an earlier report of the same budget) fills in what the runs under ``out`` lack: a teacher
    with no runs there is taken whole, and a teacher's students missing from its runs are taken beside them
    (a student with runs under ``out`` is always read from them)."""
    reused = reused or {}
    data = collect(out, from_runs(out, teachers, reused), dseeds)
    here, taken = recipes(out), {}
    for t, d in data.items():
        d["recipes"] = here
        if t in reused:
            earlier = reused[t]["students"]
            taken[t] = [n for n in earlier if n not in d["students"]]
            order = list(earlier) + [n for n in d["students"] if n not in earlier]
            d["students"] = {n: d["students"].get(n) or earlier[n] for n in order}
            if taken[t]:
                d["recipes"] = sorted(set(here) | set(reused[t]["recipes"]))
    taken.update({t: list(reused[t]["students"]) for t in teachers if t in reused and t not in data})
    data = {t: data[t] if t in data else reused[t] for t in teachers}
    # the runs' own step counts (a report over earlier runs must not print the mode's current one)
    steps = sorted({n for d in data.values() for r in d["students"].values() for n in r["steps"] if n})
    recipe = "; ".join(sorted({r for d in data.values() for r in d["recipes"]})) or "none run yet"
    lines = [f"Budget: {', '.join(map(str, steps)) or mode['steps']} steps x 32 sequences of up to 128 "
             f"tokens per student (the same for all), distillation seeds {','.join(dseeds)}. Fine-tuning: "
             f"{recipe}; {_seeds_note(data, mode)}.", ""]
    for t, d in data.items():
        tp = d["teacher"]
        lines += [f"### Teacher {d['label']} ({tp['total'] / 1e6:.1f}M parameters, "
                  f"{tp['without_embeddings'] / 1e6:.1f}M without embeddings)", "",
                  "| student | params (w/o emb.) | active w/o emb. | GFLOPs | held-out relation | "
                  "sentiment acc | WNUT-16 F1 | routing entropy |", "|---|---|---|---|---|---|---|---|"]
        for name, row in d["students"].items():
            f = row["facts"]
            lines.append(
                f"| {name} | {f['params'] / 1e6:.1f}M ({f['params_no_emb'] / 1e6:.2f}M) | "
                f"{f['active_no_emb'] / 1e6:.2f}M | {f['gflops']:.2f} | {_fmt(_mean_sd(row['heldout']))} | "
                f"{_fmt(_mean_sd(row['scores']['sentiment']), 100, 1)} | "
                f"{_fmt(_mean_sd(row['scores']['wnut16']), 100, 1)} | "
                f"{_fmt(_mean_sd(row['entropy']), 1, 3)} |")
        lines.append("")
    lines += _against_twin(data)
    lines += _curse_table(data)
    text = "\n".join(lines)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"mode": mode, "distill_seeds": dseeds, "reused": {t: n for t, n in taken.items() if n},
                   "teachers": data}, fh,
                  indent=1)
    _plot(data, os.path.join(out, "curse.png"))
    _plot_heldout(data, os.path.join(out, "heldout.png"))
    return text


def _seeds_note(data: dict, mode: dict) -> str:
    """The fine-tuning seeds: the mode's, and the students run on more or fewer (``run.py --only --seeds``),
    counted from their runs (a student's count is its task with the fewest)."""
    usual, counts = len(str(mode["seeds"]).split(",")), {}
    for d in data.values():
        for name, row in d["students"].items():
            n = min(len(row["scores"][t]) for t in TASKS)
            if n and n != usual:
                counts.setdefault(n, {}).setdefault(d["label"], []).append(name)
    others = [f"{n} run{'s' * (n != 1)} a task for " + "; ".join(f"{label} {', '.join(names)}"
                                                  for label, names in who.items())
              for n, who in sorted(counts.items())]
    return f"seeds {mode['seeds']}" + (f" ({'; '.join(others)})" if others else "")


def _twin(name: str) -> str:
    """The dense student of the same size (``moe4-s`` -> ``dense-s``)."""
    return "dense-" + name.rsplit("-", 1)[-1]


def _paired(a: list, b: list) -> tuple:
    """Mean and spread of ``a[i] - b[i]``: two students' runs of one fine-tuning seed each, paired."""
    n = min(len(a), len(b))
    return _mean_sd([a[i] - b[i] for i in range(n)])


def _against_twin(data: dict) -> list[str]:
    """Every non-dense student against its dense twin: held-out relation loss in % of the twin's (lower is
    better), downstream differences paired by fine-tuning seed (mean ± spread over the pairs, in points)."""
    lines = []
    for d in data.values():
        rows = d["students"]
        pairs = [(n, _twin(n)) for n in rows if not n.startswith("dense-") and _twin(n) in rows]
        if not pairs:
            continue
        lines += [f"### Against the dense twin, teacher {d['label']}", "",
                  "| student | held-out relation vs twin | sentiment acc diff | WNUT-16 F1 diff | "
                  "average diff |",
                  "|---|---|---|---|---|"]
        for name, twin in pairs:
            mine, theirs = _mean_sd(rows[name]["heldout"]), _mean_sd(rows[twin]["heldout"])
            held = f"{100 * (mine[0] / theirs[0] - 1):+.1f}%" if mine[2] and theirs[2] else "-"
            diffs = [_fmt(_paired(rows[name]["scores"][t], rows[twin]["scores"][t]), 100, 1, "+")
                     for t in TASKS]
            both = [[sum(v) / len(TASKS) for v in zip(*(rows[n]["scores"][t] for t in TASKS))]
                    for n in (name, twin)]
            lines.append(f"| {name} vs {twin} | {held} | {' | '.join(diffs)} | "
                         f"{_fmt(_paired(*both), 100, 1, '+')} |")
        lines.append("")
    return lines


def _curse_table(data: dict) -> list[str]:
    """Each student's downstream average (sentiment and WNUT-16) by teacher: the curse is a small dense
    student that does worse with the larger teacher."""
    teachers = list(data)
    names = [n for n in next(iter(data.values()))["students"]] if data else []
    lines = ["### Downstream average by teacher (mean of sentiment accuracy and WNUT-16 F1)", "",
             "| student | " + " | ".join(data[t]["label"] for t in teachers) + " |",
             "|---|" + "---|" * len(teachers)]
    for name in names:
        cells = []
        for t in teachers:
            row = data[t]["students"].get(name)
            cells.append(_fmt(_average(row), 100, 1) if row else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _average(row: dict) -> tuple:
    """Mean and spread of the per-run average over the tasks (runs paired by position)."""
    runs = [row["scores"][t] for t in TASKS]
    n = min(len(r) for r in runs)
    return _mean_sd([sum(r[i] for r in runs) / len(runs) for i in range(n)])


def _plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    names = sorted({n for d in data.values() for n in d["students"] if n.startswith(("dense-", "moe4-"))})
    for name in names:
        xs, ys, es = [], [], []
        for d in data.values():
            row = d["students"].get(name)
            if row is None:
                continue
            m, sd, n = _average(row)
            if n:
                xs.append(d["teacher"]["without_embeddings"] / 1e6)
                ys.append(100 * m)
                es.append(100 * sd)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o" if name.startswith("moe") else "s", capsize=3,
                        linestyle="-" if name.startswith("moe") else "--", label=name)
    ax.set_xscale("log")
    ax.minorticks_off()  # a tick at each teacher, named, instead of log-axis marks like 2x10^1
    sizes = {d["label"]: d["teacher"]["without_embeddings"] / 1e6 for d in data.values()}
    ax.set_xticks(list(sizes.values()), [f"{label}\n{m:.1f}M" for label, m in sizes.items()])
    ax.margins(x=0.15)
    _label(ax, "student score against teacher size", "teacher parameters without embeddings (M)",
           "downstream average (%)", legend_size=8)
    _save(fig, path)


def _label(ax, title: str, xlabel: str, ylabel: str, legend_size: int) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heldout_curve(metrics_path: str) -> tuple[list[int], list[float]]:
    """The held-out relation loss at each step it was scored, from a student's ``metrics.jsonl``."""
    steps, values = [], []
    with open(metrics_path) as fh:
        for line in fh:
            row = json.loads(line)
            if "heldout_relation" in row:
                steps.append(row["step"])
                values.append(row["heldout_relation"])
    return steps, values


def _plot_heldout(data: dict, path: str) -> None:
    """Held-out relation loss against step, a panel per teacher (first distillation seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not data:
        return
    fig, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 4), squeeze=False)
    for ax, d in zip(axes[0], data.values()):
        for name, row in d["students"].items():
            steps, values = (row.get("curves") or [([], [])])[0]
            if steps:
                ax.plot(steps, values, marker=".", linestyle="--" if name.startswith("dense-") else "-",
                        label=name)
        _label(ax, f"teacher {d['label']}", "step", "held-out relation loss (lower is better)", legend_size=7)
    _save(fig, path)
