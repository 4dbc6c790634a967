"""Deployment: every export loads in a fresh process with transformers (and onnxruntime) alone and gives
minimoe's outputs; model cards; ONNX keeps top-1 routing; unfinished runs are refused."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, env, flag_dict, sentiment_dir, tiny_teacher, wiki_slice
from minimoe import MiniMoEModel, StudentConfig
from minimoe.data.tasks import get_task
from minimoe import model_folder as names
from minimoe.export.hf import save_task_model
from minimoe.heads import TaskModel, load_task_model, tokenizer_for

PY = sys.executable
TINY = dict(num_layers=2, hidden_size=64, num_heads=4, ffn_size=128)


def launch(script, **flags):
    return subprocess.run([PY, f"{REPO}/launchers/{script}.py", *[f"--{k}={v}" for k, v in flags.items()]],
                          env=env(), capture_output=True, text=True, timeout=600)


def batches(vocab=30522):
    """Token batches of several shapes with padding; the single token leaves experts without a token."""
    g = torch.Generator().manual_seed(3)
    out = []
    for b, length in ((1, 1), (2, 9), (5, 40)):
        ids = torch.randint(1000, vocab, (b, length), generator=g)
        mask = torch.ones_like(ids)
        if b > 1:
            mask[0, length // 2:] = 0
            ids = ids.masked_fill(mask == 0, 0)
        out.append((ids, mask))
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A finished distillation run (1 process, 4 steps), a fine-tuning run on its student, a NER task folder
    and a dense student with its task folder."""
    tmp = tmp_path_factory.mktemp("export")
    tiny_teacher(str(tmp / "teacher"), hidden=64, layers=2)
    wiki_slice(str(tmp / "wiki.jsonl"), docs=4)
    run = tmp / "run"
    p = launch("distill", **flag_dict(tmp, run, ep_size=1, max_steps=4, save_every=4, micro_batch_size=8,
                                      max_seq_length=32))
    assert p.returncode == 0, p.stderr[-3000:]
    student = str(run / "student")
    ft = tmp / "ft"
    p = launch("finetune", model=student, task="sentiment", data=sentiment_dir(tmp / "sent"), output_dir=ft,
               max_steps=4, eval_every=4, micro_batch_size=8, max_seq_length=32, wandb="disabled")
    assert p.returncode == 0, p.stderr[-3000:]
    tok = tokenizer_for(student)
    ner = get_task("wnut16")
    torch.manual_seed(0)
    ner_model = TaskModel(MiniMoEModel.from_pretrained(student), "minimoe", ner.kind, ner.num_labels)
    save_task_model(str(tmp / "ner"), ner_model.state_dict(), ner, "minimoe", student, tok, 0.1, 32)
    dense = str(tmp / "dense")
    MiniMoEModel(StudentConfig(**TINY, num_experts=1)).save_pretrained(dense)
    tok.save_pretrained(dense)
    sent = get_task("sentiment")
    dense_task = TaskModel(MiniMoEModel.from_pretrained(dense), "minimoe", sent.kind, sent.num_labels)
    save_task_model(str(tmp / "dense_sent"), dense_task.state_dict(), sent, "minimoe", dense, tok, 0.1, 32)
    return {"tmp": tmp, "run": str(run), "student": student, "dense": dense, "sentiment": str(ft / "model"),
            "ner": str(tmp / "ner"), "dense_sentiment": str(tmp / "dense_sent")}


def references(folder, path):
    """minimoe's own outputs on ``batches()``, saved for a fresh process to compare against."""
    if os.path.isfile(os.path.join(folder, "task.json")):
        model, _ = load_task_model(folder)
        with torch.no_grad():
            outs = [(ids, mask, model(ids, mask)[0]) for ids, mask in batches()]
    else:
        model = MiniMoEModel.from_pretrained(folder).eval()
        with torch.no_grad():
            outs = [(ids, mask, model(ids, mask).last_hidden_state) for ids, mask in batches()]
    torch.save(outs, path)
    return path


# Runs in a fresh interpreter: transformers and torch only, then the comparison.
FRESH = r"""
import sys, torch, transformers
folder, refs, auto, remote = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=remote).eval()
worst = 0.0
for ids, mask, want in torch.load(refs):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    got = out.logits if hasattr(out, "logits") else out.last_hidden_state
    worst = max(worst, float((got - want).abs().max()))
loaded = {m.split(".")[0] for m in sys.modules}
assert not loaded & {"minimoe", "deepspeed"}, "imported minimoe or deepspeed"
print(type(model).__name__, worst)
"""


def fresh(folder, refs, auto, remote):
    p = subprocess.run([PY, "-c", FRESH, folder, refs, auto, "1" if remote else "0"], env=env(),
                       capture_output=True, text=True, timeout=300, cwd="/")
    assert p.returncode == 0, p.stderr[-3000:]
    cls, worst = p.stdout.split()[-2:]
    return cls, float(worst)


@pytest.mark.slow
@pytest.mark.parametrize("key, auto, remote, cls", [
    ("student", "AutoModel", True, "MiniMoEModel"),
    ("dense", "AutoModel", False, "BertModel"),
    ("sentiment", "AutoModelForSequenceClassification", True, "MiniMoEForSequenceClassification"),
    ("ner", "AutoModelForTokenClassification", True, "MiniMoEForTokenClassification"),
    ("dense_sentiment", "AutoModelForSequenceClassification", False, "BertForSequenceClassification"),
])
def test_exports_load_in_plain_transformers_with_equal_outputs(fx, tmp_path, key, auto, remote, cls):
    refs = references(fx[key], str(tmp_path / "refs.pt"))
    got_cls, worst = fresh(fx[key], refs, auto, remote)
    assert got_cls == cls
    assert worst <= 5e-6, worst  # measured: 9.5e-7 at most (the dense BertModel), 2.4e-7 the MoE student


@pytest.mark.slow
def test_pipelines_run_on_task_folders(fx):
    script = ("import sys, transformers\n"
              "c = transformers.pipeline('text-classification', model=sys.argv[1], trust_remote_code=True)\n"
              "t = transformers.pipeline('token-classification', model=sys.argv[2], trust_remote_code=True)\n"
              "print(c('the film was great')[0]['label'], type(t('Alice visited Paris today')).__name__)\n")
    p = subprocess.run([PY, "-c", script, fx["sentiment"], fx["ner"]], env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    label, entities = p.stdout.split()[-2:]
    assert label in get_task("sentiment").labels and entities == "list"


@pytest.mark.slow
def test_model_cards_follow_the_hub_format(fx):
    import yaml
    text = open(os.path.join(fx["student"], "README.md")).read()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "feature-extraction"
    summary = json.load(open(os.path.join(fx["run"], "summary.json")))
    for fact in ("| teacher |", "| data |", "4 steps x 8 sequences", f"{summary['tokens_seen']:,}",
                 "| parameters |", "GFLOPs per 32-token sequence", f"{summary['relation_last']:.4f}",
                 "launchers/distill.py", "trust_remote_code=True"):
        assert fact in text, fact
    task = open(os.path.join(fx["sentiment"], "README.md")).read()
    front = yaml.safe_load(task.split("---")[1])
    assert front["pipeline_tag"] == "text-classification"
    results = json.load(open(os.path.join(os.path.dirname(fx["sentiment"]), "results.json")))
    metric = front["model-index"][0]["results"][0]["metrics"][0]
    assert metric["value"] == pytest.approx(results["best"]["dev"]["dev"][metric["type"]], abs=1e-4)
    assert "launchers/finetune.py" in task


# Runs in a fresh interpreter: onnxruntime on the exported graph against minimoe's outputs.
ORT = r"""
import sys, torch, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1] + "/model.onnx")
worst = 0.0
for ids, mask, want in torch.load(sys.argv[2]):
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                             "token_type_ids": torch.zeros_like(ids).numpy()})[0]
    worst = max(worst, float((torch.from_numpy(got) - want).abs().max()))
print(worst)
"""


@pytest.mark.slow
@pytest.mark.parametrize("key", ["run", "sentiment", "dense"])
def test_onnx_keeps_top1_routing_and_equals_pytorch(fx, tmp_path, key):
    import onnx
    out = tmp_path / "onnx"
    p = launch("export", model=fx[key], format="onnx", output_dir=out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "onnxruntime equals PyTorch within" in p.stdout
    folder = fx["student"] if key == "run" else fx[key]
    refs = references(folder, str(tmp_path / "refs.pt"))
    p = subprocess.run([PY, "-c", ORT, str(out), refs], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    worst = float(p.stdout.split()[-1])
    assert worst <= 1e-5, worst  # measured: 1.4e-6 at most (the MoE run's student)
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    experts = json.load(open(os.path.join(folder, "config.json"))).get("num_experts", 1)
    # one gather of its own tokens per expert and layer: no expert computes every token
    assert ops.count("NonZero") == (TINY["num_layers"] * experts if experts > 1 else 0)


@pytest.mark.slow
def test_the_check_batches_leave_an_expert_without_tokens(fx):
    """The ONNX check and the test above include a batch in which some expert of some layer gets no token."""
    model = MiniMoEModel.from_pretrained(fx["student"]).eval()
    ids, mask = batches()[0]
    with torch.no_grad():
        counts = model(ids, mask).expert_counts
    assert any(int(c.min()) == 0 for c in counts)


def test_names_round_trip_for_every_parameter():
    for e in (1, 4):
        model = MiniMoEModel(StudentConfig(**TINY, num_experts=e))
        for k in model.state_dict():
            assert names.from_hf(names.to_hf(k)) == k
        cfg = names.hf_config(model.config.to_dict(), "0")
        assert cfg["model_type"] == ("minimoe" if e > 1 else "bert")
        known = set(model.config.to_dict())
        assert StudentConfig.from_dict(names.student_fields(cfg, known)) == model.config


def test_earlier_student_folders_convert_and_load(tmp_path):
    """A student folder written before students were Hugging Face folders (minimoe's own names)."""
    from safetensors.torch import save_file
    model = MiniMoEModel(StudentConfig(**TINY, num_experts=4)).eval()
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "model.safetensors"))
    json.dump({"model_type": "minimoe", **model.config.to_dict()}, open(old / "config.json", "w"))
    ids, mask = batches()[2]
    with torch.no_grad():
        want = model(ids, mask).last_hidden_state
        assert torch.equal(MiniMoEModel.from_pretrained(str(old)).eval()(ids, mask).last_hidden_state, want)
    p = launch("export", model=old, format="onnx")
    assert p.returncode == 2 and "--format hf" in p.stderr
    p = launch("export", model=old, format="hf", output_dir=tmp_path / "new")
    assert p.returncode == 0, p.stderr[-3000:]
    from transformers import AutoModel
    again = AutoModel.from_pretrained(str(tmp_path / "new"), trust_remote_code=True).eval()
    with torch.no_grad():
        assert (again(input_ids=ids, attention_mask=mask).last_hidden_state - want).abs().max() <= 1e-5


def _folder(path, *files):
    path.mkdir()
    for f in files:
        (path / f).write_text("{}")
    return path


@pytest.mark.parametrize("make, message", [
    (lambda t: t / "missing", "is not a folder"),
    (lambda t: _folder(t / "run", "run_config.json"),
     "is not a finished run: it has no summary.json and student/ (or results.json and model/); it saved no "
     "complete checkpoint"),
    (lambda t: _folder(t / "empty"), "is neither a finished minimoe run nor a model folder"),
])
def test_export_refuses_what_is_not_finished_work(tmp_path, make, message):
    p = launch("export", model=make(tmp_path), format="onnx")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("error")]
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert not (tmp_path / "run" / "onnx").exists()


@pytest.mark.slow
def test_reading_a_moe_folders_tokenizer_runs_none_of_its_code(fx, monkeypatch):
    """AutoTokenizer reads config.json through AutoConfig, which asks before running a folder's code;
    minimoe needs only the tokenizer and must never stop at that question."""
    questions = []

    def asked(prompt=""):
        questions.append(prompt)  # transformers turns any exception here into its own fallback: record it
        return "n"
    monkeypatch.setattr("builtins.input", asked)
    assert tokenizer_for(fx["student"])("a test")["input_ids"][0] == 101
    assert not questions


def test_the_task_model_cards_snippet_runs_as_written(tmp_path):
    """The card's "How to load" ran `import minimoe; minimoe.heads.load_task_model(path)`, which raised
    AttributeError: the package did not import its submodules. Run the card's python block as written, in
    the model folder (its `path = "."`), in a fresh interpreter."""
    import re
    from minimoe.config import PACKAGED_TEACHER
    from minimoe.data.assets import resolve_model
    student = str(tmp_path / "student")
    MiniMoEModel(StudentConfig(**TINY, num_experts=4)).save_pretrained(student)
    tok = tokenizer_for(resolve_model(PACKAGED_TEACHER))
    tok.save_pretrained(student)
    task = get_task("sentiment")
    model = TaskModel(MiniMoEModel.from_pretrained(student), "minimoe", task.kind, task.num_labels)
    results = {"main_metric": task.main_metric, "steps": 4, "wall_s": 1.0,
               "best": {"step": 4, "main": 0.5, "dev": {"dev": {"accuracy": 0.5}}}}
    folder = save_task_model(str(tmp_path / "run" / "model"), model.state_dict(), task, "minimoe", student,
                             tok, 0.1, 32, "launchers/finetune.py --task sentiment", results)
    card = open(os.path.join(folder, "README.md")).read()
    snippet = re.search(r"## How to load\n\n```python\n(.*?)```", card, re.S).group(1)
    assert "minimoe.heads.load_task_model(path)" in snippet
    p = subprocess.run([PY, "-c", snippet + "print(type(model).__name__, meta['task'])"], cwd=folder,
                       env={**env(), "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-2:] == ["TaskModel", "sentiment"]
