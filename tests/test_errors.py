"""Bad input stops before training with one line naming the value, exit code 2, and no output."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, tiny_teacher, wiki_slice
from minimoe.config import ConfigError, DistillConfig
from minimoe.flags import from_flags
from minimoe.data.corpus import build_or_load
from minimoe.distill import plan


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(str(tmp_path_factory.mktemp("t") / "teacher"), hidden=64, layers=2)


def cfg(teacher, tmp_path, **kw):
    base = {"teacher": teacher, "data": wiki_slice(str(tmp_path / "w.jsonl"), 2),
            "output_dir": str(tmp_path / "out"),
            "cache_dir": str(tmp_path / "cache"), "hidden_size": 64, "num_heads": 4, "relation_heads": 8}
    base.update(kw)
    return from_flags(DistillConfig, base)


def write(path, text):
    path.write_text(text)
    return str(path)


def test_flags_are_typed_and_known():
    with pytest.raises(ConfigError, match="unknown flag --num_expert;"):
        from_flags(DistillConfig, {"num_expert": 4})
    with pytest.raises(ConfigError, match="--max_steps 'ten' is invalid: expected int"):
        from_flags(DistillConfig, {"max_steps": "ten"})
    with pytest.raises(ConfigError, match="--dry_run 'no' is invalid: expected true or false$"):
        from_flags(DistillConfig, {"dry_run": "no"})
    assert from_flags(DistillConfig, {"dry_run": "False"}).launch.dry_run is False  # fire passes the text
    c = from_flags(DistillConfig, {"num_experts": 8, "ep_size": 2, "lr": 1, "data": ("a.txt", "b.txt")})
    assert c.student.num_experts == 8 and c.lr == 1.0 and c.data == "a.txt,b.txt"


@pytest.mark.parametrize("flags,message", [
    ({"relation_heads": 7}, "--relation_heads 7 must divide the student hidden size 64"),
    ({"precision": "fp8"}, "--precision 'fp8' is invalid: allowed auto, fp32, bf16, fp16"),
    ({"max_steps": 0}, "--max_steps 0 is invalid"),
    ({"num_heads": 5}, "--num_heads 5 must divide --hidden_size 64"),
])
def test_bad_values(teacher, tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cfg(teacher, tmp_path, **flags)


def test_plan_errors(teacher, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--teacher '/nope' does not exist"):
        plan(cfg("/nope", tmp_path))
    with pytest.raises(ConfigError, match="--data '/nope.txt' does not exist"):
        plan(cfg(teacher, tmp_path, data="/nope.txt"))
    with pytest.raises(ConfigError,
                       match="'wikipedia:20231101.en' is a legacy script dataset .* --data wikimedia/"):
        plan(cfg(teacher, tmp_path, data="wikipedia:20231101.en"))  # before anything is downloaded
    with pytest.raises(ConfigError, match="--ds_config '/nope.json' does not exist"):
        plan(cfg(teacher, tmp_path, ds_config="/nope.json"))
    bad = write(tmp_path / "bad.json", '{"zero_optimization": {"stage": 2},}')
    with pytest.raises(ConfigError, match="bad.json' is not valid JSON: .* line 1 column"):
        plan(cfg(teacher, tmp_path, ds_config=bad))
    z3 = json.load(open(os.path.join(REPO, "ds_configs/zero2_moe.json")))
    z3["zero_optimization"] = {"stage": 3}
    z3p = write(tmp_path / "z3.json", json.dumps(z3))
    with pytest.raises(ConfigError, match="ZeRO stage 3 is not supported for a MoE student"):
        plan(cfg(teacher, tmp_path, ds_config=z3p))
    z0 = dict(z3, zero_optimization={"stage": 0})
    with pytest.raises(ConfigError, match="ZeRO stage 0 with --ep_size 2"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        plan(cfg(teacher, tmp_path, ds_config=write(tmp_path / "z0.json", json.dumps(z0)), ep_size=2))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="--ep_size 2 must divide the world size 3"):
        plan(cfg(teacher, tmp_path, ep_size=2))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="--ep_size 3 must divide the student's 4 experts"):
        plan(cfg(teacher, tmp_path, ep_size=3))
    with pytest.raises(ConfigError, match="--relation_heads 32 must divide the teacher hidden size 48"):
        plan(cfg(tiny_teacher(str(tmp_path / "t48"), hidden=48, layers=2), tmp_path, relation_heads=32,
                 hidden_size=128))
    with pytest.raises(ConfigError, match="--teacher_layer 5 is out of range for a 2-layer teacher"):
        plan(cfg(teacher, tmp_path, teacher_layer=5))
    with pytest.raises(ConfigError, match="--resume: no complete checkpoint to resume"):
        plan(cfg(teacher, tmp_path, resume=True))


def test_tokenizer_that_does_not_fit_the_teacher(tmp_path):
    from transformers import BertConfig, BertModel
    from helpers import TOKENIZER_FILES
    import shutil
    from minimoe.data.assets import resolve_model
    path = tmp_path / "small_vocab"
    BertModel(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(resolve_model("packaged:all-MiniLM-L6-v2"), f), path)
    with pytest.raises(ConfigError, match="has 30522 tokens but the model's embedding table has 1000"):
        plan(cfg(str(path), tmp_path))


def test_empty_corpus(teacher, tmp_path):
    from transformers import AutoTokenizer
    empty = write(tmp_path / "empty.txt", "\n\n  \n")
    with pytest.raises(ConfigError, match="gave no training pairs"):
        build_or_load(empty, "text", AutoTokenizer.from_pretrained(teacher), 64, 0.1, 1, str(tmp_path / "c"))
    wrong = write(tmp_path / "w.jsonl", '{"body": "x"}\n')
    with pytest.raises(ConfigError, match="no column 'text'"):
        build_or_load(wrong, "text", AutoTokenizer.from_pretrained(teacher), 64, 0.1, 1, str(tmp_path / "c"))


def launch(args):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, os.path.join(REPO, "launchers/distill.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def stderr_lines(p):
    return [l for l in p.stderr.splitlines() if l.strip() and "[WARNING]" not in l and "Warning" not in l]


@pytest.mark.slow
def test_launcher_errors_are_one_line_with_exit_2_and_no_output(teacher, tmp_path):
    out = tmp_path / "out"
    p = launch([f"--teacher={teacher}", "--ep_size=3", f"--output_dir={out}"])
    assert p.returncode == 2
    assert stderr_lines(p) == ["error: --ep_size 3 must divide the student's 4 experts"]
    assert not out.exists()
    # Found only after the process group started (rank 0 tokenises): still one line, exit 2, no output.
    empty = write(tmp_path / "empty.txt", "\n")
    p = launch([f"--teacher={teacher}", f"--data={empty}", f"--output_dir={out}",
                f"--cache_dir={tmp_path / 'c'}", "--hidden_size=64", "--num_heads=4", "--relation_heads=8"])
    assert p.returncode == 2, p.stderr[-2000:]
    assert [l for l in stderr_lines(p) if l.startswith("error:")] == [
        f"error: --data {empty!r} gave no training pairs (empty corpus, or documents of < 2 tokens)"]
    assert not out.exists()
    p = launch(["--help"])
    assert p.returncode == 0 and "--ep_size" in p.stdout and "--teacher_ds_config" in p.stdout


# ---------------------------------------------------------------------------------------------
# One error path: every failure is one line and an exit code; the traceback goes to a log file.


def test_failures_are_classified_as_user_or_environment():
    import errno
    from minimoe.errors import classify
    assert classify(ConfigError("--lr 0 must be > 0")) == (2, "--lr 0 must be > 0")
    code, line = classify(OSError(errno.ENOSPC, "No space left on device", "/ckpt/step_00000004/x.pt"))
    assert code == 1 and line.startswith("no space left on device writing '/ckpt/step_00000004/x.pt'")
    code, line = classify(RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter "
                                       "failed writing file data/0: file write failed"))
    assert code == 1 and "no space left on device while saving" in line
    code, line = classify(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:56530: "
                                       "Connection reset by peer. This is typically caused by ..."))
    assert code == 1 and line.startswith("another rank of this job stopped")
    assert classify(PermissionError(errno.EACCES, "Permission denied", "/ro/run"))[1] == \
        "cannot write '/ro/run': Permission denied; choose a writable --output_dir"
    assert classify(ValueError("boom\nmore"))[1] == "internal error: ValueError: boom"


def test_a_read_only_cache_is_named_with_its_variable_not_blamed_on_the_output_dir(monkeypatch, tmp_path):
    import errno
    from minimoe.errors import classify
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME", "HF_HOME", "MINIMOE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    run = str(tmp_path / "run")

    def line(path):
        return classify(OSError(errno.EROFS, "Read-only file system", str(path)), run)[1]
    assert line(tmp_path / ".cache/torch_extensions") == (
        f"cannot write '{tmp_path}/.cache/torch_extensions': Read-only file system; that is where DeepSpeed "
        "compiles its ops: set TORCH_EXTENSIONS_DIR to a writable folder")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/ro/ext")
    assert line("/ro/ext/deepspeed_shm_comm").endswith(
        "it is in '/ro/ext', where DeepSpeed compiles its ops: set TORCH_EXTENSIONS_DIR to a writable folder")
    assert "set HF_HOME" in line(tmp_path / ".cache/huggingface/modules")
    assert "set MINIMOE_CACHE (or --cache_dir)" in line(tmp_path / ".cache/minimoe/corpus")
    assert "set XDG_CACHE_HOME" in line(tmp_path / ".cache/matplotlib")
    assert line(f"{run}/checkpoints").endswith("choose a writable --output_dir")
    assert line("/srv/elsewhere").endswith(f"outside --output_dir {run!r}: make that folder writable")


def test_an_environment_failure_prints_one_line_and_logs_the_traceback(tmp_path, capsys):
    from minimoe.errors import report
    try:
        raise OSError(28, "No space left on device", str(tmp_path / "ckpt.pt"))
    except OSError as e:
        assert report(e, str(tmp_path), debug=False) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on device writing")
    log = err[0].rpartition("[traceback: ")[2].rstrip("]")
    assert log.startswith(str(tmp_path / "logs")) and "Traceback (most recent call last)" in open(log).read()


# ---------------------------------------------------------------------------------------------
# Checked before any work: what used to run to the end (or fail late) with a useless result.


def test_ds_config_keys_deepspeed_does_not_know(teacher, tmp_path):
    base = json.load(open(os.path.join(REPO, "ds_configs/zero2_moe.json")))
    typo = write(tmp_path / "typo.json", json.dumps(dict(base, gradient_clipingg=1.0)))
    with pytest.raises(ConfigError, match="'gradient_clipingg' is not a DeepSpeed setting .* did you mean "
                                          "'gradient_clipping'"):
        plan(cfg(teacher, tmp_path, ds_config=typo, ep_size=1))
    with pytest.warns(UserWarning, match="'gradient_clipingg' is not a DeepSpeed setting"):
        plan(cfg(teacher, tmp_path, ds_config=typo, ep_size=1, strict_ds_config=False))
    nested = dict(base, zero_optimization=dict(base["zero_optimization"], overlap_com=True))
    with pytest.raises(ConfigError, match="DeepSpeedZeroConfig overlap_com: Extra inputs are not permitted"):
        plan(cfg(teacher, tmp_path, ds_config=write(tmp_path / "n.json", json.dumps(nested)), ep_size=1))
    teacher_typo = write(tmp_path / "t.json",
                         json.dumps({"zero_optimization": {"stage3_prefetch_bucket": 1}}))
    with pytest.raises(ConfigError, match="--teacher_ds_config .*stage3_prefetch_bucket: Extra inputs"):
        plan(cfg(teacher, tmp_path, teacher_ds_config=teacher_typo, ep_size=1))
    commented = write(tmp_path / "c.json", json.dumps(dict(base, _comment="ZeRO-2 for the student")))
    plan(cfg(teacher, tmp_path, ds_config=commented, ep_size=1))  # keys starting with _ are comments


def test_a_model_folder_without_its_tokenizer_files(teacher, tmp_path):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(teacher, bare,
                    ignore=shutil.ignore_patterns("vocab.txt", "tokenizer*", "special_tokens_map.json"))
    with pytest.raises(ConfigError, match=r"the folder lacks its tokenizer files|has no loadable tokenizer"):
        plan(cfg(str(bare), tmp_path, ep_size=1))


@pytest.mark.parametrize("flags,message", [
    ({"lr": float("nan")}, "--lr nan is invalid: must be a finite number"),
    ({"gradient_clipping": float("inf")}, "--gradient_clipping inf is invalid: must be a finite number"),
    ({"weight_decay": -0.1}, "--weight_decay -0.1 is invalid: must be >= 0"),
    ({"seed": -1}, r"--seed -1 is invalid: must be in \[0, 2\*\*32\)"),
    ({"seed": 2 ** 32}, "--seed 4294967296 is invalid"),
])
def test_values_that_cannot_work(teacher, tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        cfg(teacher, tmp_path, **flags)


def test_an_output_dir_that_cannot_be_a_folder(teacher, tmp_path):
    afile = write(tmp_path / "afile", "x")
    with pytest.raises(ConfigError, match="--output_dir .*afile' is a file, not a folder"):
        plan(cfg(teacher, tmp_path, output_dir=afile, ep_size=1))
    with pytest.raises(ConfigError, match="cannot be written .*afile' is not a writable folder"):
        plan(cfg(teacher, tmp_path, output_dir=os.path.join(afile, "run"), ep_size=1))


def test_an_output_dir_that_is_a_dangling_link(tmp_path):
    """Refused before any work, naming the link and its missing target (it failed with "File exists" once
    the engines were built)."""
    from minimoe.config import check_output_dir
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(ConfigError, match=f"--output_dir '{tmp_path}/link' is a symbolic link to "
                                          f"'{tmp_path}/gone', which does not exist"):
        check_output_dir(str(tmp_path / "link"))
    with pytest.raises(ConfigError, match=f"'{tmp_path}/link/run': '{tmp_path}/link' is a symbolic link"):
        check_output_dir(str(tmp_path / "link" / "run"))
    (tmp_path / "gone").mkdir()
    check_output_dir(str(tmp_path / "link" / "run"))  # its target made: a link is a fine run folder


def test_num_epochs_given_alone_trains_the_epochs():
    """--num_epochs 5 once trained the 60 steps of --max_steps' default without a word."""
    from minimoe.config import FinetuneConfig
    assert from_flags(DistillConfig, {"num_epochs": 5}).max_steps == -1
    assert from_flags(DistillConfig, {}).max_steps == 60  # the demo's length when neither is given
    assert from_flags(DistillConfig, {"num_epochs": 5, "max_steps": -1}).num_epochs == 5.0
    assert from_flags(FinetuneConfig, {"num_epochs": 2}).max_steps == -1
    with pytest.raises(ConfigError, match=r"--max_steps 100 and --num_epochs 5.0 both set the run's length"):
        from_flags(DistillConfig, {"num_epochs": 5, "max_steps": 100})


def test_a_leading_tilde_is_expanded_in_every_path_flag(monkeypatch, tmp_path):
    """The shell leaves ``~`` alone after ``--output_dir=~/run``: the run created a folder named ``~``."""
    from minimoe.config import EvaluateConfig, ExportConfig, FinetuneConfig, SweepConfig
    from minimoe.flags import _cli_fields
    monkeypatch.setenv("HOME", str(tmp_path))
    c = from_flags(DistillConfig, {"output_dir": "~/run", "data": "~/a.txt,~/b.txt", "teacher": "~/t",
                                   "cache_dir": "~", "ds_config": "~/ds.json", "resume": "~/run/ckpt"})
    assert (c.output_dir, c.data, c.teacher) == (f"{tmp_path}/run", f"{tmp_path}/a.txt,{tmp_path}/b.txt",
                                                 f"{tmp_path}/t")
    assert (c.cache_dir, c.ds_config, c.resume) == (str(tmp_path), f"{tmp_path}/ds.json",
                                                    f"{tmp_path}/run/ckpt")
    assert from_flags(DistillConfig, {"data": "packaged:wikipedia", "resume": True}).resume is True
    # Every flag that names a file or folder, in every launcher: a field redeclared without the mark fails
    # here.
    paths = {"output_dir", "ds_config", "resume", "hostfile", "teacher", "data", "eval_data", "cache_dir",
             "teacher_ds_config", "students", "model", "output", "models"}
    for cls in (DistillConfig, FinetuneConfig, EvaluateConfig, ExportConfig, SweepConfig):
        marked = {f.name for _, f in _cli_fields(cls) if f.metadata.get("path")}
        assert marked == paths & {f.name for _, f in _cli_fields(cls)}, cls.__name__
        for name in marked:
            got = from_flags(cls, {name: "~/x", **({"dry_run": True} if name == "hostfile" else {})})
            assert getattr(got.launch if name == "hostfile" else got, name) == f"{tmp_path}/x", (cls, name)


def test_the_demo_run_folder_is_one_name():
    """`python launchers/distill.py` ("the same job as make demo") wrote runs/distill, while fine-tuning and
    export looked in runs/demo by default."""
    import re
    import sys
    from minimoe.config import DEMO_RUN, ExportConfig, FinetuneConfig
    assert DistillConfig().output_dir == ExportConfig().model == DEMO_RUN
    assert FinetuneConfig().model == f"{DEMO_RUN}/student"
    sys.path.insert(0, os.path.join(REPO, "launchers"))
    import sweep
    assert sweep.DEFAULT_MODEL == f"{DEMO_RUN}/student"
    makefile = open(os.path.join(REPO, "Makefile")).read()
    demo = makefile[makefile.index("\ndemo:"):].split("\n\n")[0]
    assert re.search(r"--output_dir (\S+)", demo).group(1) == DEMO_RUN and f"rm -rf {DEMO_RUN}\n" in demo


def test_a_quiet_rank_waits_for_the_speaking_one(monkeypatch, capsys):
    """The launchers kill every rank when one exits with an error: a rank that leaves the line to rank 0
    (the same bad input met on every rank) waits before it exits, so rank 0's line is printed first."""
    import time
    from minimoe import errors
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(errors, "QUIET_RANK_GRACE_S", 0.3)
    t = time.perf_counter()
    assert errors.report(errors.ConfigError("--seed -1 is out of range"), None, False) == 2
    assert time.perf_counter() - t >= 0.3 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    t = time.perf_counter()
    assert errors.report(errors.ConfigError("--seed -1 is out of range"), None, False) == 2
    assert time.perf_counter() - t < 0.3 and "error: --seed -1 is out of range" in capsys.readouterr().err
