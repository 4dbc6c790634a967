"""Fine-tuning for real: 2 ranks with ep_size 2 on small task files written here, the exported model
scored in one plain process, a dense HF baseline, and bad input."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, TOKENIZER_FILES, read_jsonl, sentiment_dir, spawn, tiny_teacher
from minimoe import MiniMoEModel, StudentConfig
from minimoe.config import PACKAGED_TEACHER, ConfigError, FinetuneConfig
from minimoe.flags import from_flags
from minimoe.data.assets import resolve_model

def ner_dir(path):
    rng = random.Random(1)
    os.makedirs(path, exist_ok=True)
    names = ["Alice", "Bob", "Carol", "Dave"]
    places = ["Paris", "Oslo", "Lima"]
    for split, n in (("train", 80), ("dev", 20)):
        with open(os.path.join(path, f"{split}.txt"), "w") as fh:
            for _ in range(n):
                fh.write(f"{rng.choice(names)}\tB-person\nvisited\tO\n{rng.choice(places)}\tB-geo-loc\n"
                         "today\tO\n\n")
    return str(path)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    student = tmp / "student"
    MiniMoEModel(StudentConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_size=128,
                               num_experts=4)).save_pretrained(str(student))
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(resolve_model(PACKAGED_TEACHER), f), student)
    return {"tmp": tmp, "student": str(student), "sentiment": sentiment_dir(tmp / "sent"),
            "ner": ner_dir(tmp / "ner")}


def flags(fx, out, **kw):
    f = {"model": fx["student"], "output_dir": str(out), "micro_batch_size": 8, "max_seq_length": 32,
         "lr": 1e-3, "max_steps": 60, "eval_every": 30, "log_every": 10, "wandb": "disabled", "patience": 0}
    f.update(kw)
    return f


def _worker(rank, f):
    from minimoe.finetune import run
    run(from_flags(FinetuneConfig, f))


@pytest.mark.slow
@pytest.mark.parametrize("task,data", [("sentiment", "sentiment"), ("wnut16", "ner")])
def test_two_rank_ep2_finetune_exports_a_model_that_scores_the_same(fx, task, data):
    from minimoe.task_eval import evaluate_folder
    out = fx["tmp"] / f"run_{task}"
    spawn(_worker, 2, flags(fx, out, task=task, data=fx[data], ep_size=2))
    res = json.load(open(out / "results.json"))
    assert [h["step"] for h in res["history"]] == [30, 60]
    assert res["best"]["main"] >= 0.9  # the patterns in these files are easy: the student must learn them
    losses = [m["train_loss"] for m in read_jsonl(out / "metrics.jsonl") if "train_loss" in m]
    assert losses[-1] < losses[0]
    meta = json.load(open(out / "model" / "task.json"))
    assert meta["encoder_type"] == "minimoe" and meta["task"] == task
    # the exported model (experts gathered, ep_size 1, one process) gives the ep_size-2 engine's dev score
    again = evaluate_folder(str(out / "model"), "dev", fx[data], 32, 16)
    assert again["scores"] == pytest.approx(res["best"]["dev"]["dev"])
    # kept: the run can be resumed and re-exported
    assert (out / "checkpoints" / "best" / "complete").exists()


@pytest.mark.slow
def test_dense_hf_baseline_through_the_same_code(fx):
    teacher = tiny_teacher(str(fx["tmp"] / "bert"), hidden=64, layers=2)
    out = fx["tmp"] / "dense"
    spawn(_worker, 1, flags(fx, out, model=teacher, task="sentiment", data=fx["sentiment"], max_steps=6))
    res = json.load(open(out / "results.json"))
    assert res["encoder_type"] == "hf" and 0.0 <= res["best"]["main"] <= 1.0
    assert os.path.isfile(out / "model" / "encoder" / "config.json")


@pytest.mark.slow
def test_evaluate_scores_a_fine_tuned_model_as_its_run_did_and_writes_json_and_a_table(fx, tmp_path):
    """launchers/evaluate.py on a fine-tuned model (the 2-rank run above when it ran, else a short one-rank
    run): exit 0, <model>/../eval_dev.json holding the dev accuracy the training run recorded as its best,
    and the markdown table beside it."""
    run = fx["tmp"] / "run_sentiment"
    if not (run / "results.json").is_file():
        run = tmp_path / "trained"
        spawn(_worker, 1, flags(fx, run, task="sentiment", data=fx["sentiment"], max_steps=8, eval_every=8))
    shutil.copytree(run / "model", tmp_path / "copy" / "model")  # the output lands beside the model
    p = subprocess.run([sys.executable, os.path.join(REPO, "launchers/evaluate.py"), "--model",
                        str(tmp_path / "copy" / "model"), "--split", "dev", "--data", fx["sentiment"],
                        "--max_seq_length", "32", "--batch_size", "16"],
                       env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "copy" / "eval_dev.json"
    assert p.stdout.rstrip().endswith(f"wrote {out}")
    got = json.load(open(out))
    assert (got["task"], got["split"], got["examples"]) == ("sentiment", "dev", 24)
    assert got["main_metric"] == "accuracy"
    best = json.load(open(run / "results.json"))["best"]
    assert got["scores"] == pytest.approx(best["dev"]["dev"])
    table = (tmp_path / "copy" / "eval_dev.md").read_text().splitlines()
    assert table[2] == f"| sentiment | dev | 24 | {100 * best['main']:.2f} |"


def test_finetune_plan_errors(fx, tmp_path):
    from minimoe.finetune import plan
    with pytest.raises(ConfigError, match="--task 'glue' is unknown"):
        plan(from_flags(FinetuneConfig, flags(fx, tmp_path, task="glue")))
    with pytest.raises(ConfigError, match="has no dev.tsv for task sentiment"):
        os.makedirs(tmp_path / "only_train")
        shutil.copy(os.path.join(fx["sentiment"], "train.tsv"), tmp_path / "only_train")
        plan(from_flags(FinetuneConfig, flags(fx, tmp_path, task="sentiment",
                                              data=str(tmp_path / "only_train"))))
    with pytest.raises(ConfigError, match="--ep_size 3 must divide the student's 4 experts"):
        plan(from_flags(FinetuneConfig, flags(fx, tmp_path, task="sentiment", data=fx["sentiment"],
                                              ep_size=3)))
    with pytest.raises(ConfigError, match="--ep_size 2 needs a MiniMoE student with experts"):
        plan(from_flags(FinetuneConfig, flags(fx, tmp_path, model=resolve_model(PACKAGED_TEACHER),
                                              task="sentiment", data=fx["sentiment"], ep_size=2)))
    with pytest.raises(ConfigError, match="--model ./nope. does not exist"):
        plan(from_flags(FinetuneConfig, flags(fx, tmp_path, model="/nope", task="sentiment",
                                              data=fx["sentiment"])))


def test_label_set_mismatch_fails_with_one_line(fx, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(fx["sentiment"], bad)
    with open(bad / "train.tsv", "a") as fh:
        fh.write("a film\t3\n")
    p = subprocess.run([sys.executable, os.path.join(REPO, "launchers/finetune.py"), "--model", fx["student"],
                        "--task", "sentiment", "--data", str(bad), "--output_dir", str(tmp_path / "o"),
                        "--wandb", "disabled"], env=dict(os.environ, DS_ACCELERATOR="cpu"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert errors == ["error: task sentiment: train has labels [3]; allowed 0..1"]


@pytest.mark.slow
def test_task_specific_distillation_from_a_fine_tuned_teacher(fx):
    """The sentence model fine-tuned above teaches a fresh student (2 ranks, ep_size 2) through its logits."""
    teacher = fx["tmp"] / "run_sentiment" / "model"
    if not teacher.is_dir():
        spawn(_worker, 2, flags(fx, fx["tmp"] / "run_sentiment", task="sentiment", data=fx["sentiment"],
                                ep_size=2))
    out = fx["tmp"] / "kd"
    spawn(_worker, 2, flags(fx, out, task="sentiment", data=fx["sentiment"], ep_size=2, teacher=str(teacher),
                            kd_weight=0.7, temperature=2.0))
    logged = [m for m in read_jsonl(out / "metrics.jsonl") if "kd_loss" in m]
    assert logged and logged[-1]["kd_loss"] < logged[0]["kd_loss"]
    from minimoe.finetune import plan
    with pytest.raises(ConfigError, match="was fine-tuned on sentiment, not wnut16"):
        plan(from_flags(FinetuneConfig, flags(fx, out, task="wnut16", data=fx["ner"], teacher=str(teacher))))


def test_sweep_table_averages_seeds_then_tasks(tmp_path):
    """Runs whose results.json exists are not run again; the table averages seeds, then tasks."""
    sys.path.insert(0, os.path.join(REPO, "launchers"))
    import sweep
    from minimoe.config import SweepConfig
    scores = {("a", "sentiment", "1"): 0.80, ("a", "sentiment", "2"): 0.90, ("a", "wnut16", "1"): 0.30,
              ("a", "wnut16", "2"): 0.50, ("b", "sentiment", "1"): 0.60, ("b", "sentiment", "2"): 0.60,
              ("b", "wnut16", "1"): 0.20, ("b", "wnut16", "2"): 0.20}
    for (m, t, s), v in scores.items():
        d = tmp_path / m / t / f"seed{s}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"best": {"main": v}}))
    sweep.run(SweepConfig(models="a,b", tasks="sentiment,wnut16", seeds="1,2", output_dir=str(tmp_path)))
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[2] == "| a | 85.00 | 40.00 | 62.50 |"
    assert table[3] == "| b | 60.00 | 20.00 | 40.00 |"


@pytest.mark.slow
@pytest.mark.parametrize("router", ["random", "hash"])
def test_a_fixed_router_student_fine_tunes_at_ep2_and_its_model_scores_the_same(fx, router):
    """The random router's draw count is loop state: kept in checkpoints, left out of the exported task
    model, which loads and scores as the engine did (found by the capacity-gap experiment's ablations)."""
    from minimoe.task_eval import evaluate_folder
    student = fx["tmp"] / f"student-{router}"
    MiniMoEModel(StudentConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_size=128, num_experts=4,
                               router=router, router_seed=7)).save_pretrained(str(student))
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(resolve_model(PACKAGED_TEACHER), f), student)
    out = fx["tmp"] / f"run_{router}"
    spawn(_worker, 2, flags(fx, out, model=str(student), task="sentiment", data=fx["sentiment"], ep_size=2,
                            max_steps=30, eval_every=30))
    res = json.load(open(out / "results.json"))
    again = evaluate_folder(str(out / "model"), "dev", fx["sentiment"], 32, 16)
    assert again["scores"] == pytest.approx(res["best"]["dev"]["dev"])
    assert json.load(open(out / "model" / "config.json"))["router"] == router


def _finishing_run(launched: list):
    """A stand-in for sweep._run: records the command and writes the results a finished run leaves."""
    def run(cmd, what):
        launched.append(cmd)
        out = cmd[cmd.index("--output_dir") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump({"best": {"main": 0.5}}, fh)
    return run


def test_sweep_continues_an_interrupted_fine_tuning_run(tmp_path, monkeypatch):
    """A run without results.json is started with --resume auto: one a failure or a kill left checkpoints
    behind continues when the sweep is run again, instead of being refused."""
    sys.path.insert(0, os.path.join(REPO, "launchers"))
    import sweep
    from minimoe.config import SweepConfig
    launched = []

    monkeypatch.setattr(sweep, "_run", _finishing_run(launched))
    sweep.run(SweepConfig(models="a", tasks="sentiment", seeds="1", output_dir=str(tmp_path)))
    assert len(launched) == 1 and launched[0][launched[0].index("--resume") + 1] == "auto"


@pytest.mark.parametrize("launcher,first", [("python", sys.executable),
                                            ("deepspeed --num_gpus 2",
                                             os.path.join(os.path.dirname(sys.executable), "deepspeed"))])
def test_sweep_runs_its_own_python(tmp_path, monkeypatch, launcher, first):
    """The default launcher ran whatever `python` came first on PATH: another Python's child failed with
    "No module named 'fire'". python, deepspeed and torchrun are the ones beside the sweep's interpreter."""
    sys.path.insert(0, os.path.join(REPO, "launchers"))
    import sweep
    from minimoe.config import SweepConfig
    other = tmp_path / "other-bin"
    other.mkdir()
    for name in ("python", "deepspeed"):
        (other / name).write_text("#!/bin/sh\nexit 3\n")
        (other / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{other}:{os.environ['PATH']}")
    launched = []

    monkeypatch.setattr(sweep, "_run", _finishing_run(launched))
    sweep.run(SweepConfig(models="a", tasks="sentiment", seeds="1", output_dir=str(tmp_path / "s"),
                          launcher=launcher))
    assert launched[0][0] == first and launched[0][1:len(launcher.split())] == launcher.split()[1:]
