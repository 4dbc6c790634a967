"""Every bad input and fault, driven through the real launchers (all four; 1 and 2 ranks), ends the same
way: the exit code says whose fault it was (2: the input, 1: files, disk, a peer rank), stderr holds
exactly one ``error...:`` line that names the culprit, no traceback reaches the terminal, and nothing
partial is left behind (no run folder for a run that never started, no half-written checkpoint or export).
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import (BIN, REPO, TOKENIZER_FILES, env, flags, free_port, sentiment_dir, tiny_teacher,
                     wiki_slice)

PROGRESS = ("step/s", "it/s", "doc/s", "tokenising")


def launch(script, args, ranks=1, timeout=300, **environ):
    if ranks == 1:
        cmd = [sys.executable, f"{REPO}/launchers/{script}.py", *args]
    else:
        cmd = [f"{BIN}/deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
               f"{REPO}/launchers/{script}.py", *args]
    environ = {k: v for k, v in {**env(), **environ}.items() if v is not None}  # None: unset
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout, cwd="/")


def assert_one_line(p, code, culprit):
    """Exit code, one error line naming the culprit, no traceback anywhere on the terminal."""
    # A line may follow another rank's progress bar on the same terminal line: find it where it starts.
    errors = [m.group(0) for m in re.finditer(r"error(?: \(rank \d+\))?: [^\r\n]*", p.stderr)]
    shown = p.stdout[-1500:] + p.stderr[-3000:]
    assert p.returncode == code, shown
    assert len(errors) == 1, shown
    assert culprit in errors[0], errors[0]
    assert "Traceback" not in p.stdout + p.stderr, shown
    return errors[0]


def args_of(d):
    return [f"--{k}={v}" for k, v in d.items()]


def truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from minimoe import MiniMoEModel, StudentConfig
    from minimoe.config import PACKAGED_TEACHER
    from minimoe.data.assets import resolve_model
    tmp = tmp_path_factory.mktemp("faults")
    f = {"tmp": tmp, "teacher": tiny_teacher(str(tmp / "teacher"), hidden=64, layers=2),
         "wiki": wiki_slice(str(tmp / "wiki.jsonl"), 4)}
    # Damaged or wrong inputs, one of each kind.
    (tmp / "binary.txt").write_bytes(bytes(range(128, 256)) * 40)
    (tmp / "broken.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    f["binary"], f["parquet"] = str(tmp / "binary.txt"), str(tmp / "broken.parquet")
    # Valid UTF-8 for longer than the up-front check reads (1 MiB), then a byte that is not.
    late = tmp / "late.txt"
    with open(late, "w") as fh:
        for i in range(15000):
            fh.write(f"Sentence number {i} of a long and perfectly readable document about nothing.\n")
            if i % 5 == 4:
                fh.write("\n")
    with open(late, "ab") as fh:
        fh.write(b"\nthe end \xff\xfe of the file\n")
    f["late"] = str(late)
    f["cut_teacher"] = shutil.copytree(f["teacher"], tmp / "cut_teacher")
    truncate(os.path.join(f["cut_teacher"], "model.safetensors"))
    f["bare_teacher"] = shutil.copytree(f["teacher"], tmp / "bare_teacher", ignore=shutil.ignore_patterns(
        "vocab.txt", "tokenizer*", "special_tokens_map.json"))
    ds = open(os.path.join(REPO, "ds_configs/zero2_moe.json")).read()
    (tmp / "typo.json").write_text(ds.replace('"gradient_clipping"', '"gradient_clipingg"'))
    f["typo"] = str(tmp / "typo.json")
    ds_dict = json.loads(ds)
    for name, change in (("zero_int", {"zero_optimization": 2}),
                         ("noopt", {"optimizer": {"type": "NoSuchOpt", "params": {"lr": 1e-3}}}),
                         ("params_typo", {"optimizer": {"type": "AdamW", "params": {"lrr": 1e-3}}})):
        (tmp / f"{name}.json").write_text(json.dumps({**ds_dict, **change}))
        f[name] = str(tmp / f"{name}.json")
    (tmp / "corpus_dir").mkdir()
    f["corpus_dir"] = str(tmp / "corpus_dir")
    (tmp / "afile").write_text("x")
    f["afile"] = str(tmp / "afile")
    os.symlink(tmp / "gone", tmp / "dangling")  # a link whose target was removed (or is on an unmounted disk)
    f["dangling"] = str(tmp / "dangling")
    # Fine-tuning: a student, its damaged twins, task folders good and bad, a fine-tuned model folder.
    student = tmp / "student"
    MiniMoEModel(StudentConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_size=128, num_experts=4)
                 ).save_pretrained(str(student))
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(resolve_model(PACKAGED_TEACHER), name), student)
    f["student"] = str(student)
    f["cut_student"] = shutil.copytree(student, tmp / "cut_student")
    truncate(os.path.join(f["cut_student"], "model.safetensors"))
    f["bare_student"] = shutil.copytree(student, tmp / "bare_student", ignore=shutil.ignore_patterns(
        "vocab.txt", "tokenizer*", "special_tokens_map.json"))
    f["sent"] = sentiment_dir(tmp / "sent")
    f["sent_binary"] = sentiment_dir(tmp / "sent_binary")
    with open(os.path.join(f["sent_binary"], "train.tsv"), "ab") as fh:
        fh.write(b"caf\xe9 au lait\t1\n")  # latin-1, not UTF-8
    f["sent_label"] = sentiment_dir(tmp / "sent_label")
    with open(os.path.join(f["sent_label"], "train.tsv"), "a") as fh:
        fh.write("a label that does not exist\t7\n")
    f["run_folder"] = str(tmp / "run")  # what a distillation run leaves: student/ and checkpoints/
    shutil.copytree(student, tmp / "run" / "student")
    (tmp / "run" / "checkpoints").mkdir()
    f["finetuned"] = _finetuned_folder(tmp / "finetuned", f["student"])
    f["bad_task_json"] = shutil.copytree(f["finetuned"], tmp / "bad_task_json")
    (tmp / "bad_task_json" / "task.json").write_text('{"task": ')
    f["cut_head"] = shutil.copytree(f["finetuned"], tmp / "cut_head")
    truncate(os.path.join(f["cut_head"], "model.safetensors"))
    return f


def _finetuned_folder(folder, student):
    """A fine-tuned model folder as launchers/finetune.py writes it (untrained head)."""
    from minimoe.data.tasks import get_task
    from minimoe.export.hf import save_task_model
    from minimoe.heads import TaskModel, load_encoder, tokenizer_for
    task = get_task("sentiment")
    model = TaskModel(load_encoder(student)[0], "minimoe", task.kind, task.num_labels)
    save_task_model(str(folder), model.state_dict(), task, "minimoe", student, tokenizer_for(student),
                    0.1, 32)
    return str(folder)


def distill_args(fx, out, **kw):
    d = {"teacher": fx["teacher"], "data": fx["wiki"], "cache_dir": fx["tmp"] / "cache", "output_dir": out,
         "num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_size": 128, "num_experts": 4,
         "relation_heads": 8, "micro_batch_size": 4, "max_seq_length": 64, "max_steps": 2,
         "wandb": "disabled", "ep_size": 1}
    d.update(kw)
    return args_of(d)


def finetune_args(fx, out, **kw):
    d = {"model": fx["student"], "task": "sentiment", "data": fx["sent"], "output_dir": out, "max_steps": 2,
         "micro_batch_size": 8, "max_seq_length": 32, "wandb": "disabled"}
    d.update(kw)
    return args_of(d)


# ---------------------------------------------------------------------------------------------
# One rank: input that cannot work stops before any work and leaves no run folder.

DISTILL = [  # (case, bad flags (values naming fx entries are resolved), exit code, culprit the line names)
    ("data not UTF-8", {"data": "binary"}, 1, "binary.txt' is not UTF-8 text"),
    ("corrupt parquet", {"data": "parquet"}, 1, "broken.parquet' is truncated or corrupt"),
    ("truncated teacher weights", {"teacher": "cut_teacher"}, 1, "model.safetensors' is truncated"),
    ("teacher without tokenizer", {"teacher": "bare_teacher"}, 2, "tokenizer"),
    ("misspelt ds_config key", {"ds_config": "typo"}, 2, "did you mean 'gradient_clipping'"),
    ("output_dir is a file", {"output_dir": "afile"}, 2, "afile' is a file, not a folder"),
    ("output_dir is a dangling link", {"output_dir": "dangling"}, 2, "dangling' is a symbolic link to '"),
    ("learning rate not finite", {"lr": "nan"}, 2, "--lr nan is invalid: must be a finite number"),
    ("seed out of range", {"seed": -1}, 2, "--seed -1 is invalid"),
    ("missing data", {"data": "/nope/corpus.txt"}, 2, "--data '/nope/corpus.txt' does not exist"),
    ("resume with nothing to resume", {"resume": True}, 2, "no complete checkpoint to resume"),
    ("ds_config block of another type", {"ds_config": "zero_int"}, 2,
     "'zero_optimization' must be a JSON object"),
    ("optimizer DeepSpeed cannot build", {"ds_config": "noopt"}, 2, "optimizer.type 'NoSuchOpt' is not one"),
    ("optimizer argument its class does not take", {"ds_config": "params_typo"}, 2,
     "DeepSpeed cannot build the engine from it: AdamW.__init__() got an unexpected keyword argument 'lrr'"),
    ("cache_dir is a file", {"cache_dir": "afile"}, 2, "--cache_dir '"),
    ("data is a folder", {"data": "corpus_dir"}, 2, "corpus_dir' is a folder; give its files"),
]

FINETUNE = [
    ("task file not UTF-8", {"data": "sent_binary"}, 1, "train.tsv' is not UTF-8 text"),
    ("label outside the task's set", {"data": "sent_label"}, 2, "has labels [7]; allowed 0..1"),
    ("model without tokenizer", {"model": "bare_student"}, 2, "tokenizer"),
    ("output_dir is a file", {"output_dir": "afile"}, 2, "afile' is a file, not a folder"),
    ("output_dir is a dangling link", {"output_dir": "dangling"}, 2, "dangling' is a symbolic link to '"),
    ("truncated student weights", {"model": "cut_student"}, 1, "model.safetensors' is truncated or corrupt"),
    ("model is a distillation run folder", {"model": "run_folder"}, 2,
     "is a distillation run folder; fine-tune"),
    ("max_seq_length past the positions", {"max_seq_length": 4096}, 2, "4096 exceeds the 512 positions"),
]

EVALUATE = [
    ("truncated weights", {"model": "cut_head"}, 1, "model.safetensors' is truncated or corrupt"),
    ("not a fine-tuned folder", {"model": "student"}, 2, "is not a fine-tuned model folder (no task.json)"),
    ("task file not UTF-8", {"model": "finetuned", "data": "sent_binary", "split": "train"}, 1,
     "train.tsv' is not UTF-8 text"),
    ("corrupt task.json", {"model": "bad_task_json"}, 1, "task.json' is truncated or corrupt"),
    ("output is a folder", {"model": "finetuned", "output": "sent"}, 2, "--output '"),
]

SWEEP = [
    ("empty model list", {"models": ","}, 2, "--models ',' names nothing"),
    ("seed that is not a number", {"seeds": "1,x"}, 2, "'x' is not a non-negative integer"),
    ("launcher not on PATH", {"launcher": "nosuch-launcher"}, 2, "is not a command on PATH"),
    ("missing model folder", {"models": "/nope/student"}, 2, "'/nope/student' is not a folder"),
    ("finetune flag misspelt in --extra", {"extra": "--max_stepz 2"}, 2, "unknown flag --max_stepz"),
    ("--extra sets what the sweep sets", {"extra": "--output_dir /tmp/x"}, 2, "--extra sets --output_dir"),
]

EXPORT = [
    ("unknown format", {"format": "tflite"}, 2, "--format 'tflite' is invalid: choose one of onnx, hf"),
    ("opset too old", {"opset": 11}, 2, "--opset 11 is too old"),
    ("tolerance not positive", {"tolerance": 0}, 2, "--tolerance 0.0 must be a positive number"),
    ("run that did not finish", {"model": "run_folder"}, 2, "is not a finished run"),
    ("truncated weights", {"model": "cut_student"}, 1, "model.safetensors' is truncated"),
    ("output_dir is a file", {"output_dir": "afile"}, 2, "afile' is a file, not a folder"),
    ("output_dir is a dangling link", {"output_dir": "dangling"}, 2, "gone', which does not exist"),
    ("output_dir is the model", {"output_dir": "student"}, 2, "is the folder being exported: choose another"),
]

ARGS = {  # each launcher's otherwise good command line, with the bad flags on top
    "distill": lambda fx, out, bad: distill_args(fx, out, **bad),
    "finetune": lambda fx, out, bad: finetune_args(fx, out, **bad),
    "evaluate": lambda fx, out, bad: args_of({"output": out / "eval.json", **bad}),
    "sweep": lambda fx, out, bad: args_of({"models": fx["student"], "tasks": "sentiment", "output_dir": out,
                                           **bad}),
    "export": lambda fx, out, bad: args_of({"model": fx["student"], "format": "onnx", "output_dir": out,
                                            **bad}),
}
SLOW = pytest.mark.slow  # the distill and finetune launchers load DeepSpeed and start a process group
BAD_INPUT = [pytest.param(launcher, *case, id=f"{launcher}: {case[0]}",
                          marks=[SLOW] if launcher in ("distill", "finetune") else [])
             for launcher, cases in (("distill", DISTILL), ("finetune", FINETUNE), ("evaluate", EVALUATE),
                                     ("sweep", SWEEP), ("export", EXPORT))
             for case in cases]


@pytest.mark.parametrize("launcher,case,bad,code,culprit", BAD_INPUT)
def test_bad_input(fx, tmp_path, launcher, case, bad, code, culprit):
    """Stopped before any work: one line, the exit code, and no run folder."""
    out = tmp_path / "out"
    bad = {k: fx.get(v, v) if isinstance(v, str) else v for k, v in bad.items()}
    assert_one_line(launch(launcher, ARGS[launcher](fx, out, bad)), code, culprit)
    assert not out.exists()


@pytest.mark.parametrize("script", ["distill", "finetune", "evaluate", "sweep", "export"])
def test_a_stray_argument_stops_before_any_work(tmp_path, script):
    """An unquoted glob the shell expanded (--data dir/a.txt dir/b.txt) once trained on the first file and
    only then failed; now every launcher refuses it at once."""
    p = launch(script, ["--output_dir", str(tmp_path / "out"), "a.txt", "b.txt"])
    assert_one_line(p, 2, "unexpected argument 'a.txt': every value belongs to a --flag; quote a glob")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Faults while running leave a usable state.


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: the first checkpoint does not fit. Root can mount one; others cannot."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("launcher", ["distill", "finetune"])
def test_an_accelerator_this_machine_lacks(fx, tmp_path, launcher):
    """DS_ACCELERATOR=cuda without CUDA ended in 'internal error: AssertionError: Torch not compiled with
    CUDA' (or NCCL's) from inside the process group."""
    p = launch(launcher, ARGS[launcher](fx, tmp_path / "out", {}), DS_ACCELERATOR="cuda")
    line = assert_one_line(p, 2, "DS_ACCELERATOR=cuda was asked for, but this ")
    assert line.endswith("unset DS_ACCELERATOR (DeepSpeed then uses what the machine has) or set "
                         "DS_ACCELERATOR=cpu"), line
    assert not (tmp_path / "out").exists()


@pytest.fixture
def read_only_cache(tmp_path):
    """A home folder whose .cache is a read-only tmpfs (root can mount one; others cannot, and writes as
    root ignore file modes)."""
    where = tmp_path / "home" / ".cache"
    where.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)])


@pytest.mark.slow
@pytest.mark.parametrize("where", ["TORCH_EXTENSIONS_DIR", "HOME"])
def test_a_read_only_cache_is_named_not_the_output_dir(fx, read_only_cache, tmp_path, where):
    """DeepSpeed compiles its ops in TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); a read-only
    one was blamed on --output_dir."""
    if where == "HOME":  # ~/.cache read-only: torch's default folder under it
        folder = read_only_cache / "torch_extensions"
        environ = {"HOME": str(read_only_cache.parent), "TORCH_EXTENSIONS_DIR": None, "XDG_CACHE_HOME": None}
    else:
        folder = read_only_cache / "ext"
        environ = {"TORCH_EXTENSIONS_DIR": str(folder)}
    p = launch("finetune", finetune_args(fx, tmp_path / "out"), **environ)
    line = assert_one_line(p, 1, f"cannot write '{folder}': Read-only file system")
    assert "set TORCH_EXTENSIONS_DIR to a writable folder" in line and "--output_dir" not in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_full_disk_says_so_and_leaves_nothing_half_written(fx, small_disk, ranks):
    out = small_disk / "run"
    args = distill_args(fx, out, max_steps=4, save_every=2, ep_size=ranks)
    line = assert_one_line(launch("distill", args, ranks), 1, "no space left on device writing")
    assert "checkpoints/step_00000002" in line
    assert glob.glob(str(out / "checkpoints" / "step_*")) == []  # the failed save removed what it wrote
    assert not (out / "student").exists()
    p = launch("distill", args + ["--resume=true"], ranks)  # nothing complete to resume: says so, exit 2
    assert_one_line(p, 2, "no complete checkpoint to resume")
    # Space freed: the same command (no --resume needed: there is no complete checkpoint) runs to the end.
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    p = launch("distill", args, ranks)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.path.basename(t) for t in glob.glob(str(out / "checkpoints" / "step_*"))) == [
        "step_00000002", "step_00000004"]
    assert (out / "student" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_fresh_run_removes_the_tag_of_a_save_that_did_not_finish(fx, tmp_path):
    out = tmp_path / "out"
    stale = out / "checkpoints" / "step_00000002"
    stale.mkdir(parents=True)
    (stale / "mp_rank_00_model_states.pt").write_bytes(b"half")  # a job killed while saving its first tag
    p = launch("distill", distill_args(fx, out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"removed {str(stale)!r}: its save did not finish" in p.stdout
    assert (out / "checkpoints" / "step_00000002" / "complete").exists()


# ---------------------------------------------------------------------------------------------
# Two ranks: the line on the terminal is the cause, said once, not the other rank's lost connection.


@pytest.mark.slow
def test_two_ranks_data_not_utf8_before_the_process_group(fx, tmp_path):
    p = launch("distill", distill_args(fx, tmp_path / "out", data=fx["binary"], ep_size=2), ranks=2)
    assert_one_line(p, 1, "binary.txt' is not UTF-8 text")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_ranks_data_damaged_past_the_first_mib(fx, tmp_path):
    """Found while rank 0 tokenises (after the process group started): rank 0 says it, rank 1 is quiet."""
    p = launch("distill", distill_args(fx, tmp_path / "out", data=fx["late"], ep_size=2), ranks=2)
    line = assert_one_line(p, 1, "late.txt' is not UTF-8 text (byte 0xff)")
    assert line.startswith("error (rank 0): ")
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_two_ranks_truncated_student_weights(fx, tmp_path):
    p = launch("finetune", finetune_args(fx, tmp_path / "out", model=fx["cut_student"], ep_size=2), ranks=2)
    assert_one_line(p, 1, "model.safetensors' is truncated or corrupt")
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.slow
def test_two_ranks_task_file_not_utf8(fx, tmp_path):
    p = launch("finetune", finetune_args(fx, tmp_path / "out", data=fx["sent_binary"], ep_size=2), ranks=2)
    assert_one_line(p, 1, "train.tsv' is not UTF-8 text")


@pytest.mark.slow
def test_two_ranks_resume_from_a_truncated_optimizer_shard(assets, straight_run, tmp_path):
    """Only rank 1 would read that shard (and rank 0 would wait for it): the zip directory of every file
    of the tag is checked before the process group starts, so one line names the file."""
    out = tmp_path / "run"
    shutil.copytree(straight_run / "checkpoints", out / "checkpoints")
    tag = open(out / "checkpoints" / "latest").read().strip()
    shard = out / "checkpoints" / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    truncate(shard)
    p = launch("distill", flags(assets, out, resume="true"), ranks=2)
    line = assert_one_line(p, 1, f"{tag}/zero_pp_rank_1_mp_rank_00_optim_states.pt' is truncated or corrupt")
    assert line.startswith("error: ") and "resume from an earlier checkpoint" in line
    assert not (out / "student").exists()


@pytest.mark.slow
@pytest.mark.parametrize("change,culprit", [
    ("missing shard", "zero_pp_rank_1_mp_rank_00_optim_states.pt' is missing: the checkpoint is incomplete"),
    ("another target",
     "the checkpoint distilled another target: ['relation_heads'] were [8], this run has [16]"),
])
def test_two_ranks_resume_refuses_what_cannot_continue(assets, straight_run, tmp_path, change, culprit):
    out = tmp_path / "run"
    shutil.copytree(straight_run / "checkpoints", out / "checkpoints")
    tag = open(out / "checkpoints" / "latest").read().strip()
    extra = {"resume": "true"}
    if change == "missing shard":
        os.remove(out / "checkpoints" / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    else:
        extra["relation_heads"] = 16
    assert_one_line(launch("distill", flags(assets, out, **extra), ranks=2),
                    1 if change == "missing shard" else 2, culprit)
    assert not (out / "student").exists()


def test_an_export_that_fails_leaves_the_previous_one_and_no_temporary_folder(tmp_path):
    from minimoe.model_folder import staged_folder
    out = tmp_path / "student"
    with staged_folder(str(out)) as tmp:
        open(os.path.join(tmp, "model.safetensors"), "w").write("v1")
    with pytest.raises(OSError):
        with staged_folder(str(out)) as tmp:
            open(os.path.join(tmp, "model.safetensors"), "w").write("v2, half")
            raise OSError(28, "No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["student"]
    assert open(out / "model.safetensors").read() == "v1"
