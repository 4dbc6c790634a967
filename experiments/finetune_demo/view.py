"""The table that ends ``make finetune-demo``: this run's fine-tuned demo student beside the committed
reference (the demo student, its dense twin and the packaged teacher, fine-tuned by the same commands).

    python experiments/finetune_demo/view.py runs/finetune-sentiment runs/finetune-wnut16

Reads each run folder's ``results.json`` (and ``run_config.json``, to name a recipe that differs from the
reference's) and ``reference.json`` in ``results/``, which ``reference.py`` wrote. Prints the table and one
line of provenance; exits 2, in one line, when a run folder has no results.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "results", "reference.json")
METRIC = {"accuracy": "accuracy", "entity_f1": "entity F1"}  # a task's main metric as the table names it
RECIPE = ("lr", "num_epochs")  # the fine-tuning flags the reference fixes; a run with others is named


class Unfinished(Exception):
    pass


def load_run(folder: str) -> tuple[dict, dict]:
    """A fine-tuning run's results.json and its run_config.json ({} when absent)."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise Unfinished(f"{folder!r} has no results.json: the fine-tuning run did not finish")
    with open(path) as fh:
        results = json.load(fh)
    config_path = os.path.join(folder, "run_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path) as fh:
            config = json.load(fh)
    return results, config


def table(runs: list[tuple[dict, dict]], reference: dict) -> str:
    """The markdown table, the reference's provenance, and a line for each thing a reader would misread."""
    cols = reference["columns"]
    lines = ["| task (dev metric) | this run: demo student | " + " | ".join(c["label"] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    notes = []
    for results, config in runs:
        task = results["task"]
        ref = reference["scores"].get(task, {})
        cells = [_pct(results["best"]["main"])] + [_pct(ref.get(c["key"])) for c in cols]
        lines.append(f"| {task} ({METRIC.get(results['main_metric'], results['main_metric'])}) | "
                     + " | ".join(cells) + " |")
        recipe = reference["recipe"].get(task, {})
        differs = [f"--{k} {config[k]:g} (reference {recipe[k]:g})" for k in RECIPE
                   if k in config and k in recipe and config[k] != recipe[k]]
        if differs:
            notes.append(f"{task}: this run used " + ", ".join(differs) + ": its column is not comparable")
        if results["main_metric"] == "entity_f1" and results["best"]["main"] == 0.0:
            demo, recipe_of = _pct(ref.get("demo")), "its" if differs else "the same"
            notes.append(f"{task}: entity F1 0.0, every token tagged O (the fine-tuning's last lines say "
                         f"why); the reference's demo student reached {demo} by {recipe_of} recipe")
    m = reference["machine"]
    lines.append(f"\nreference: {os.path.relpath(REFERENCE)}, `{reference['command']}` on "
                 f"{reference['date']} ({m['cpu_count']} CPUs, torch {m['torch']}): make demo's distillation "
                 "(the twin: --num_experts 1) and this fine-tuning recipe for every model")
    return "\n".join(lines + notes) + "\n"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def main(argv: list[str]) -> int:
    if not argv:
        print("error: name the fine-tuning run folders, e.g. runs/finetune-sentiment runs/finetune-wnut16",
              file=sys.stderr)
        return 2
    try:
        runs = [load_run(folder) for folder in argv]
    except Unfinished as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(REFERENCE) as fh:
        reference = json.load(fh)
    print(table(runs, reference), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
