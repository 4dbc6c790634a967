"""experiments/capacity_gap: the grid it builds and the recipe its report prints (from the runs
themselves)."""
import importlib.util
import json
import os
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                    "capacity_gap")


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
    assert report.recipes(str(tmp_path)) == ["lr 0.0001, 5 epochs, patience 0",
                                             "lr 0.001, 5 epochs, patience 0"]


def test_an_unknown_teacher_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="unknown teacher 'bert'; allowed minilm, mpnet"):
        run.main(quick=True, out=str(tmp_path), teachers="bert")


def test_ablations_false_means_false_and_other_text_is_refused(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(run, "_sweep", lambda teacher, grid, *a: seen.append([s["name"] for s in grid]))
    monkeypatch.setitem(sys.modules, "report", report)
    monkeypatch.setattr(report, "report", lambda *a: "")
    run.main(out=str(tmp_path), teachers="minilm", ablations="false")
    assert seen == [["dense-s", "moe4-s", "dense-m", "moe4-m"]]
    with pytest.raises(SystemExit, match="--ablations 'no' is invalid: expected true or false"):
        run.main(out=str(tmp_path), teachers="minilm", ablations="no")


def test_only_runs_the_students_named_and_refuses_a_name_not_in_the_grid(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(run, "_sweep",
                        lambda teacher, grid, *a: seen.append((teacher, [s["name"] for s in grid])))
    monkeypatch.setitem(sys.modules, "report", report)
    monkeypatch.setattr(report, "report", lambda *a: "")
    run.main(out=str(tmp_path), only="moe4-s,hash-s", seeds="1,2,3,4,5")
    assert seen == [("minilm", ["moe4-s", "hash-s"]), ("mpnet", ["moe4-s"])]  # ablations: small teacher only
    with pytest.raises(SystemExit, match="--only: no student 'moe4-l' in this grid; allowed dense-s, moe4-s"):
        run.main(out=str(tmp_path), only="moe4-l")


def test_the_report_names_the_students_fine_tuned_on_more_seeds_than_the_rest():
    def row(runs):
        return {"scores": {"sentiment": [0.7] * runs, "wnut16": [0.3] * runs}}
    data = {"minilm": {"label": "MiniLM-L6", "students": {"dense-s": row(5), "moe4-s": row(5),
                                                          "hash-s": row(3), "moe8-s": row(0)}},
            "mpnet": {"label": "MPNet-base", "students": {"dense-s": row(3), "moe4-s": row(1)}}}
    assert report._seeds_note(data, {"seeds": "1,2,3"}) == (
        "seeds 1,2,3 (1 run a task for MPNet-base moe4-s; 5 runs a task for MiniLM-L6 dense-s, "
        "moe4-s)")
    assert report._seeds_note({"minilm": {"label": "MiniLM-L6", "students": {"dense-s": row(3)}}},
                              {"seeds": "1,2,3"}) == "seeds 1,2,3"


def test_each_student_is_compared_with_its_dense_twin_run_by_run():
    def row(heldout, sentiment, wnut16):
        return {"heldout": heldout, "scores": {"sentiment": sentiment, "wnut16": wnut16}}
    data = {"minilm": {"label": "MiniLM-L6", "students": {
        "dense-s": row([0.40], [0.70, 0.72, 0.71], [0.20, 0.30, 0.25]),
        "moe4-s": row([0.38], [0.71, 0.72, 0.73], [0.30, 0.30, 0.25]),
        "dense-m": row([0.30], [0.75], [0.40]),
        "hash-s": row([0.42], [0.70], []),
    }}}
    lines = report._against_twin(data)
    assert lines[4] == "| moe4-s vs dense-s | -5.0% | +1.0 ± 1.0 | +3.3 ± 5.8 | +2.2 ± 2.9 |"
    assert lines[5] == "| hash-s vs dense-s | +5.0% | +0.0 | - | - |"  # a student without runs: no difference
    assert len(lines) == 7  # dense students are the baseline, not a row


def test_the_heldout_curve_is_read_from_the_rows_that_scored_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "relation": 0.5}, {"step": 100, "relation": 0.4, "heldout_relation": 0.45},
            {"step": 200, "heldout_relation": 0.41}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report.heldout_curve(str(path)) == ([100, 200], [0.45, 0.41])


def _earlier(tmp_path, steps=400):
    """A results.json as report() writes it: one teacher, a dense student and its MoE-4 twin."""
    facts = {"layers": 2, "hidden": 128, "experts": 1, "router": "learned", "params": 4385920,
             "params_no_emb": 413056, "active_no_emb": 413056, "gflops": 0.1174}

    def row(heldout, sentiment, wnut16):
        return {"heldout": [heldout], "qq": [None], "kk": [None], "vv": [None], "entropy": [None],
                "max_load": [None], "tokens": [1], "steps": [steps], "curves": [([100, 400], [0.4, heldout])],
                "scores": {"sentiment": sentiment, "wnut16": wnut16}, "facts": facts}
    mode = dict(run.MODES["full"], steps=steps)
    teachers = {"minilm": {"label": "MiniLM-L6", "teacher": {"total": 22.7e6, "without_embeddings": 10.8e6},
                           "recipes": ["lr 0.001, 5 epochs, patience 0"],
                           "students": {"dense-s": row(0.34, [0.70, 0.72], [0.20, 0.30]),
                                        "moe4-s": row(0.33, [0.71, 0.74], [0.30, 0.30])}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"mode": mode, "distill_seeds": ["776"], "teachers": teachers}))
    return str(path), mode


def test_an_earlier_report_stands_in_for_a_teacher_whose_runs_are_elsewhere(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(HERE)  # as when run.py runs: report imports run
    path, mode = _earlier(tmp_path)
    out = tmp_path / "out"
    text = report.report(str(out), ["minilm"], ["776"], mode, report.reusable(path, mode))
    assert "| moe4-s vs dense-s | -2.9% | +1.5 ± 0.7 | +5.0 ± 7.1 | +3.3 ± 3.2 |" in text
    assert "Fine-tuning: lr 0.001, 5 epochs, patience 0;" in text  # the recipe travels with the rows
    written = json.loads((out / "results.json").read_text())
    assert written["reused"] == {"minilm": ["dense-s", "moe4-s"]}
    assert written["teachers"]["minilm"]["students"].keys() == {"dense-s", "moe4-s"}
    assert (out / "heldout.png").stat().st_size > 0 and (out / "curse.png").stat().st_size > 0


def test_students_an_earlier_report_has_stand_beside_the_runs_of_the_same_teacher(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    path, mode = _earlier(tmp_path)
    earlier = report.reusable(path, mode)
    rerun = json.loads(json.dumps(earlier["minilm"]))  # moe4-s run again here (fine-tuned with one more seed)
    rerun["students"] = {"moe4-s": dict(rerun["students"]["moe4-s"], heldout=[0.32],
                                        scores={"sentiment": [0.71, 0.74, 0.75], "wnut16": [0.3, 0.3, 0.4]})}
    rerun["recipes"] = ["lr 0.002, 5 epochs, patience 0"]
    seen = []
    monkeypatch.setattr(report, "collect", lambda out, teachers, dseeds: seen.append(teachers) or {
        t: json.loads(json.dumps(rerun)) for t in teachers})
    monkeypatch.setattr(report, "recipes", lambda out: rerun["recipes"])
    out = tmp_path / "out"
    (out / "minilm").mkdir(parents=True)
    text = report.report(str(out), ["minilm"], ["776"], mode, earlier)
    assert seen == [["minilm"]]  # runs under out are read even though the teacher is reused
    assert "| moe4-s vs dense-s | -5.9% |" in text  # the new run's 0.32 against the earlier dense-s's 0.34
    written = json.loads((out / "results.json").read_text())
    students = written["teachers"]["minilm"]["students"]
    assert list(students) == ["dense-s", "moe4-s"] and students["moe4-s"]["heldout"] == [0.32]
    assert written["reused"] == {"minilm": ["dense-s"]}
    assert written["teachers"]["minilm"]["recipes"] == ["lr 0.001, 5 epochs, patience 0",
                                                         "lr 0.002, 5 epochs, patience 0"]


def test_an_earlier_report_of_another_budget_is_refused_in_one_line(tmp_path):
    path, mode = _earlier(tmp_path, steps=80)
    with pytest.raises(SystemExit, match="was run with steps 80, this run with 400"):
        report.reusable(path, dict(run.MODES["full"]))
    with pytest.raises(SystemExit, match="cannot read"):
        report.reusable(str(tmp_path / "missing.json"), mode)


def test_fine_tuning_scores_are_read_from_the_finished_runs_in_seed_order(tmp_path):
    for seed, score in ((2, 0.5), (10, 0.7), (1, 0.6)):
        run_dir = tmp_path / "moe4-s" / "wnut16" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({"best": {"main": score}}))
    (tmp_path / "moe4-s" / "wnut16" / "seed3").mkdir()  # under way: no results.json yet
    assert report.fine_tuned(str(tmp_path), "moe4-s", "wnut16") == [0.6, 0.5, 0.7]
    assert report.fine_tuned(str(tmp_path), "moe4-s", "sentiment") == []
