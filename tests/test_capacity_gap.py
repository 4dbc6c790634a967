"""experiments/capacity_gap: the grid it builds and the recipe its report prints (from the runs themselves)."""
import importlib.util
import json
import os

import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "capacity_gap")


def _module(name):
    """The experiment's script under its own name (not on sys.path: 'run' and 'report' are common names)."""
    spec = importlib.util.spec_from_file_location(f"capacity_gap_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run, report = _module("run"), _module("report")


def test_the_grid_is_dense_and_moe4_per_size_plus_the_ablations_at_size_s():
    names = [s["name"] for s in run.students(["s", "m"], ablations=True)]
    assert names == ["dense-s", "moe4-s", "dense-m", "moe4-m", *run.ABLATIONS]
    assert [s["name"] for s in run.students(["m"], ablations=True)] == ["dense-m", "moe4-m"]
    assert all(s["num_experts"] == 1 for s in run.students(["s"], False) if s["name"].startswith("dense"))


def test_the_report_prints_the_recipes_the_runs_used_not_the_current_one(tmp_path):
    for student, lr in (("dense-s", 1e-3), ("moe4-s", 1e-4)):
        folder = tmp_path / "minilm" / "seed776" / student / "wnut16" / "seed1"
        folder.mkdir(parents=True)
        (folder / "run_config.json").write_text(json.dumps({"lr": lr, "num_epochs": 5.0, "patience": 0}))
    assert report.recipes(str(tmp_path)) == ["lr 0.0001, 5 epochs, patience 0", "lr 0.001, 5 epochs, patience 0"]


def test_an_unknown_teacher_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="unknown teacher 'bert'; allowed minilm, mpnet"):
        run.main(quick=True, out=str(tmp_path), teachers="bert")
