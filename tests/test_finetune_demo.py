"""The table that ends `make finetune-demo` (experiments/finetune_demo/view.py), from fake run folders, and
the Makefile's recipe against the one its committed reference measured."""
import json
import os
import re
import sys

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "experiments", "finetune_demo"))
import reference  # noqa: E402
import view  # noqa: E402

COLUMNS = [{"key": "demo", "label": "reference: demo student"}, {"key": "dense_twin", "label": "dense twin"},
           {"key": "teacher", "label": "teacher MiniLM-L6"}]
REF = {"command": "python experiments/finetune_demo/reference.py", "date": "2026-12-01",
       "machine": {"cpu_count": 2, "torch": "2.13.0+cpu"}, "columns": COLUMNS,
       "recipe": {"sentiment": {"lr": 1e-4, "num_epochs": 3}, "wnut16": {"lr": 3e-4, "num_epochs": 5}},
       "scores": {"sentiment": {"demo": 0.61, "dense_twin": 0.5925, "teacher": 0.8},
                  "wnut16": {"demo": 0.2, "dense_twin": 0.15, "teacher": 0.3}}}


def run_folder(path, task, metric, score, lr, epochs):
    path.mkdir(parents=True)
    results = {"task": task, "main_metric": metric, "best": {"main": score}}
    (path / "results.json").write_text(json.dumps(results))
    (path / "run_config.json").write_text(json.dumps({"lr": lr, "num_epochs": epochs}))
    return str(path)


def test_table_puts_this_run_beside_the_reference_and_names_a_zero_f1(tmp_path):
    runs = [view.load_run(run_folder(tmp_path / "s", "sentiment", "accuracy", 0.6125, 1e-4, 3.0)),
            view.load_run(run_folder(tmp_path / "w", "wnut16", "entity_f1", 0.0, 3e-4, 5.0))]
    lines = view.table(runs, REF).splitlines()
    assert lines[0] == ("| task (dev metric) | this run: demo student | reference: demo student | "
                        "dense twin | teacher MiniLM-L6 |")
    assert lines[2] == "| sentiment (accuracy) | 61.25 | 61.00 | 59.25 | 80.00 |"
    assert lines[3] == "| wnut16 (entity F1) | 0.00 | 20.00 | 15.00 | 30.00 |"
    assert lines[5].startswith(f"reference: {os.path.relpath(view.REFERENCE)}, `{REF['command']}` on "
                               "2026-12-01 (2 CPUs, torch 2.13.0+cpu)")
    assert lines[6].startswith("wnut16: entity F1 0.0, every token tagged O")
    assert lines[6].endswith("the reference's demo student reached 20.00 by the same recipe")
    assert len(lines) == 7  # the recipes match: nothing more to say


def test_table_says_when_this_run_used_another_recipe(tmp_path):
    runs = [view.load_run(run_folder(tmp_path / "w", "wnut16", "entity_f1", 0.0, 1e-3, 5.0))]
    notes = view.table(runs, REF).splitlines()[-2:]
    assert notes[0] == "wnut16: this run used --lr 0.001 (reference 0.0003): its column is not comparable"
    assert notes[1].endswith("the reference's demo student reached 20.00 by its recipe")


def test_an_unfinished_run_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "ft").mkdir()
    assert view.main([str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {str(tmp_path / 'ft')!r} has no results.json: the fine-tuning run did not finish\n"


def test_the_makefile_fine_tunes_with_the_recipe_the_reference_measured():
    with open(os.path.join(REPO, "Makefile")) as fh:
        recipe = fh.read().split("\nfinetune-demo:")[1].split("\n\n")[0]
    for task, values in reference.RECIPE.items():
        line = next(x for x in recipe.splitlines() if f"--task {task} " in x)
        got = dict(re.findall(r"--(lr|num_epochs) (\S+)", line))
        assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in values.items()}, line


def test_the_committed_reference_has_every_task_and_column():
    with open(view.REFERENCE) as fh:
        ref = json.load(fh)
    assert set(ref["scores"]) == set(reference.RECIPE) and ref["recipe"] == reference.RECIPE
    for scores in ref["scores"].values():
        assert all(0.0 <= scores[c["key"]] <= 1.0 for c in ref["columns"])
