"""``--students``: several students from one teacher pass. Each learns exactly what its own run would (the
same initial weights, batches, RNG streams), keeps its own folder, and the run resumes after a kill."""
import json
import os
import signal
import subprocess
import time

import pytest

from helpers import BIN, REPO, STEPS, deepspeed_cmd, env, flag_dict, flags, free_port, read_jsonl, run_ok
from minimoe.config import ConfigError, DistillConfig
from minimoe.flags import from_flags
from minimoe.students import expand, read_entries

PAIR = "moe:num_experts=4,ep_size=2;dense:num_experts=1,ep_size=1,lr=0.0002"


def _cfg(**flags) -> DistillConfig:
    return from_flags(DistillConfig, flags)


def test_the_inline_form_and_the_command_line_defaults():
    runs = dict(expand(_cfg(students=PAIR, hidden_size=128, num_heads=4, relation_heads=16, ep_size=2)))
    assert list(runs) == ["moe", "dense"]
    moe, dense = runs["moe"], runs["dense"]
    assert (moe.student.hidden_size, moe.student.num_experts, moe.ep_size) == (128, 4, 2)
    assert (dense.student.hidden_size, dense.student.num_experts, dense.ep_size, dense.lr) == \
        (128, 1, 1, 2e-4)
    # derived fields follow each entry: the dense entry of a MoE command line has no relation projection
    assert moe.student.relation_projection and not dense.student.relation_projection
    assert moe.students == dense.students == ""
    assert expand(_cfg()) == [("", _cfg())]


def test_a_yaml_or_json_file_lists_the_students(tmp_path):
    yml = tmp_path / "s.yaml"
    yml.write_text("students:\n  - {name: a, num_layers: 2, lr: 2e-4}\n  - name: b\n    num_experts: 1\n"
                   "    ffn_size: 512\n")
    js = tmp_path / "s.json"
    js.write_text(json.dumps([{"name": "a", "num_layers": 2},
                              {"name": "b", "num_experts": 1, "ffn_size": 512}]))
    for path in (yml, js):
        runs = dict(expand(_cfg(students=str(path))))
        assert runs["a"].student.num_layers == 2 and runs["b"].student.ffn_size == 512
    assert dict(expand(_cfg(students=str(yml))))["a"].lr == 2e-4  # YAML's text "2e-4" read as a number
    assert read_entries(str(js)) == json.loads(js.read_text())


@pytest.mark.parametrize("value, message", [
    ("a:num_layers=2;a:num_layers=3", "the name 'a' is used twice"),
    ("a:num_layerz=2", "--students entry 'a': unknown key 'num_layerz'; allowed: name, num_layers"),
    ("a:hidden_size=100", "--students entry 'a': --num_heads 12 must divide --hidden_size 100"),
    ("a:num_layers=two", "--students entry 'a': --num_layers 'two' is invalid: expected int"),
    ("a:num_experts=4,ep_size=0", "--students entry 'a': --ep_size 0 is invalid"),
    ("bad/name:num_layers=2", "--students entry 1: name 'bad/name' is invalid"),
    ("a:num_layers", "'num_layers' in entry 'a' is not key=value"),
    ("nope.yaml", "--students 'nope.yaml' does not exist"),
    (" ; ", "names no student"),
])
def test_a_bad_entry_is_named_in_one_line(value, message):
    with pytest.raises(ConfigError, match=None) as e:
        expand(_cfg(students=value))
    assert message in str(e.value), str(e.value)


def test_a_file_that_is_not_a_list_of_objects(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: a\n")
    with pytest.raises(ConfigError, match="must hold a non-empty list of objects"):
        expand(_cfg(students=str(bad)))
    bad.write_text("- [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        expand(_cfg(students=str(bad)))


def test_dry_run_shows_each_students_memory_and_refuses_a_set_that_does_not_fit(assets, tmp_path):
    from minimoe.distill import run
    out = tmp_path / "planned"
    args = flag_dict(assets, out, students=PAIR, dry_run=True, num_nodes=1, gpus_per_node=2)
    summary = run(from_flags(DistillConfig, args))
    assert summary["dry_run"] and not out.exists()
    huge = "big:num_layers=48,hidden_size=4096,num_heads=32,ffn_size=16384,num_experts=16,ep_size=1;small:"
    with pytest.raises(ConfigError, match=r"the 2 students and the teacher need .* GiB per rank"):
        run(from_flags(DistillConfig, {**args, "students": huge, "relation_heads": 8}))


def test_dry_run_output_lists_the_students(assets, tmp_path):
    p = subprocess.run([f"{BIN}/python", f"{REPO}/launchers/distill.py",
                        *flags(assets, tmp_path / "x", students=PAIR, dry_run=True, num_nodes=1,
                               gpus_per_node=2)],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "students: 2, each trained on every micro-batch of one teacher pass" in p.stdout
    assert "  moe: 2L H64 FFN 128 x 4 experts, ep_size 2" in p.stdout
    assert "  dense: 2L H64 FFN 128 x 1 experts, ep_size 1" in p.stdout
    assert "total per rank: students" in p.stdout


def _relations(path):
    return [(r["step"], r["relation"], r["load_balance"]) for r in read_jsonl(path)]


@pytest.fixture(scope="module")
def pair_run(assets):
    """2 ranks: a MoE student split over both (ep_size 2) and a dense one, fed by one teacher pass."""
    out = assets / "pair"
    run_ok(deepspeed_cmd(flags(assets, out, students=PAIR)))
    return out


@pytest.mark.slow
def test_each_student_learns_what_its_own_run_learns(assets, straight_run, pair_run):
    from test_multinode import assert_same_weights
    dense = assets / "dense_alone"
    run_ok(deepspeed_cmd(flags(assets, dense, num_experts=1, ep_size=1, lr=0.0002)))
    for name, alone in (("moe", straight_run), ("dense", dense)):
        mine = pair_run / "students" / name
        # dropout and noise on
        assert _relations(mine / "metrics.jsonl") == _relations(alone / "metrics.jsonl")
        assert_same_weights(alone, mine, tol=0)
        assert set(read_jsonl(mine / "metrics.jsonl")[0]) == set(read_jsonl(alone / "metrics.jsonl")[0])
        summary = json.loads((mine / "summary.json").read_text())
        assert summary["steps"] == STEPS and summary["ep_size"] == (2 if name == "moe" else 1)
        assert json.loads((mine / "run_config.json").read_text())["student"]["num_experts"] == (
            4 if name == "moe" else 1)
    # one checkpoint step holds every student, committed once
    tag = pair_run / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(os.listdir(tag)) == sorted(["complete", "dense", "moe", "zero_to_fp32.py",
                                              "zero_to_torch.py"])
    assert (pair_run / "checkpoints" / "latest").read_text() == tag.name
    assert set(json.loads((pair_run / "summary.json").read_text())["students"]) == {"moe", "dense"}
    # a student's folder exports like a single run's
    run_ok([f"{BIN}/python", f"{REPO}/launchers/export.py", "--model", str(pair_run / "students" / "dense"),
            "--format", "hf", "--output_dir", str(assets / "dense-hf")])


@pytest.mark.slow
def test_a_killed_run_of_two_students_resumes_to_the_uninterrupted_weights(assets, pair_run, tmp_path):
    from test_multinode import assert_same_weights
    from test_trainer import _ranks_of, _start, _wait_for
    out, port = tmp_path / "killed", free_port()
    cmd = [f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(port), f"{REPO}/launchers/distill.py",
           *flags(assets, out, students=PAIR)]
    proc = _start(cmd, tmp_path / "run.log")
    _wait_for(out / "checkpoints" / "step_00000008" / "complete", proc)
    for pid in _ranks_of(port):
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert (out / "checkpoints" / "latest").read_text() != f"step_{STEPS:08d}", "finished before the kill"
    time.sleep(1)
    # --students must name the same students as the checkpoint
    p = subprocess.run(deepspeed_cmd(flags(assets, out, resume=True, students="moe:num_experts=4,ep_size=2")),
                       env=env(), capture_output=True, text=True, timeout=600)
    said = p.stdout + p.stderr
    assert p.returncode == 2 and "holds students dense, moe; this run has students moe" in said, said[-3000:]
    run_ok(deepspeed_cmd(flags(assets, out, resume=True, students=PAIR)))
    for name in ("moe", "dense"):
        assert_same_weights(pair_run / "students" / name, out / "students" / name, tol=0)
        steps = [r["step"] for r in read_jsonl(out / "students" / name / "metrics.jsonl")]
        assert steps == list(range(1, STEPS + 1))  # each step once, though the killed run logged some twice


def test_sweep_distils_the_students_once_then_scores_each(tmp_path, monkeypatch):
    """The distillation is run once (a finished one is kept); each student is fine-tuned under its name."""
    import sys
    sys.path.insert(0, os.path.join(REPO, "launchers"))
    import sweep
    from minimoe.config import SweepConfig
    launched = []
    monkeypatch.setattr(sweep, "_run", lambda cmd, what: launched.append(cmd))
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "summary.json").write_text("{}")
    for name, score in (("moe", 0.9), ("dense", 0.7)):
        d = tmp_path / name / "sentiment" / "seed1"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"best": {"main": score}}))
    sweep.run(SweepConfig(students=PAIR, tasks="sentiment", seeds="1", output_dir=str(tmp_path),
                          distill_extra="--max_steps 5"))
    assert launched == []
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[2:] == ["| moe | 90.00 | 90.00 |", "| dense | 70.00 | 70.00 |"]
    (tmp_path / "distill" / "summary.json").unlink()
    sweep.run(SweepConfig(students=PAIR, tasks="sentiment", seeds="1", output_dir=str(tmp_path),
                          distill_extra="--max_steps 5"))
    assert launched[0][1:] == [os.path.join(REPO, "launchers", "distill.py"), "--students", PAIR,
                               "--output_dir", str(tmp_path / "distill"), "--resume", "auto",
                               "--max_steps", "5"]
    with pytest.raises(ConfigError, match="--distill_extra: unknown flag --max_stepz"):
        sweep.run(SweepConfig(students=PAIR, tasks="sentiment", output_dir=str(tmp_path),
                              distill_extra="--max_stepz 5"))


@pytest.mark.slow
def test_a_sweep_really_distils_its_student_then_fine_tunes_and_scores_it(assets, tmp_path):
    """launchers/sweep.py with nothing stubbed, as small as it gets: one student distilled for 2 steps in one
    process, then fine-tuned for 2 steps on the tiny sentiment task; the table holds the score the run wrote,
    and the fine-tuning loaded the distilled student."""
    import sys
    from helpers import sentiment_dir
    data = sentiment_dir(tmp_path / "sent")
    a = flag_dict(assets, tmp_path / "unused", max_steps=2, ep_size=1)
    distill = " ".join(f"--{k}={a[k]}" for k in ("teacher", "data", "cache_dir", "num_layers", "hidden_size",
                                                  "num_heads", "ffn_size", "relation_heads",
                                                  "micro_batch_size", "max_seq_length", "max_steps",
                                                  "log_every", "wandb"))
    finetune = (f"--data={data} --micro_batch_size=8 --max_seq_length=32 --max_steps=2 --eval_every=2 "
                "--log_every=1 --wandb=disabled")
    out = tmp_path / "sweep"
    p = subprocess.run([sys.executable, f"{REPO}/launchers/sweep.py", "--students", "moe:num_experts=4",
                        "--tasks", "sentiment", "--seeds", "3", "--output_dir", str(out),
                        f"--distill_extra={distill}", f"--extra={finetune}"],
                       env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    student = out / "distill" / "students" / "moe" / "student"
    assert [r["step"] for r in read_jsonl(student.parent / "metrics.jsonl")] == [1, 2]
    assert (student / "model.safetensors").is_file()
    run = out / "moe" / "sentiment" / "seed3"
    config = json.load(open(run / "run_config.json"))
    assert (config["model"], config["seed"], config["max_steps"]) == (str(student), 3, 2)
    score = json.load(open(run / "results.json"))["best"]["main"]
    assert (out / "sweep.md").read_text().splitlines()[2] == \
        f"| moe | {100 * score:.2f} | {100 * score:.2f} |"
    assert json.load(open(out / "sweep.json"))["moe"]["runs"] == {"sentiment": [score]}
