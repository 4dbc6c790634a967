"""The one training loop (minimoe/trainer.py) under interruption: a stop signal saves a committed
checkpoint and ``--resume auto`` continues to the uninterrupted weights; Ctrl-C ends in one line and
leaves nothing behind; fine-tuning resumes after a kill and its run folder exports like a distillation's."""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (BIN, REPO, STEPS, TOKENIZER_FILES, deepspeed_cmd, env, flags, free_port, read_jsonl,
                     run_ok, sentiment_dir)
from minimoe.checkpoint import resolve


def test_resume_auto_starts_afresh_without_a_checkpoint_and_continues_with_one(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve("auto", str(root)) is None
    (root / "step_00000004").mkdir(parents=True)
    (root / "latest").write_text("step_00000004")
    assert resolve("auto", str(root)) == (str(root), "step_00000004")


def _ranks_of(port: int) -> list[int]:
    """The pids of a job's ranks: python processes whose environment names its master port."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if f"MASTER_PORT={port}".encode() in environ and b"launchers/" in cmd and any(
                e.startswith(b"RANK=") for e in environ):
            pids.append(int(pid))
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited rank whose launcher is gone waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(cmd, log):
    return subprocess.Popen(cmd, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert path.exists() and proc.poll() is None, "the run ended before it could be stopped"


def _deepspeed_at(port, args):
    return [f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(port),
            f"{REPO}/launchers/distill.py", *args]


@pytest.mark.slow
def test_sigterm_saves_a_committed_checkpoint_and_resume_auto_ends_on_the_uninterrupted_weights(
        assets, straight_run, tmp_path):
    from test_multinode import assert_same_weights
    out, port = tmp_path / "preempted", free_port()
    proc = _start(_deepspeed_at(port, flags(assets, out)), tmp_path / "run.log")
    _wait_for(out / "checkpoints" / "latest", proc)
    for pid in _ranks_of(port):  # what Slurm does: the signal to every process of the job
        os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=120)
    log = (tmp_path / "run.log").read_text()
    said = re.findall(r"stopped by SIGTERM after step (\d+): checkpoint '([^']+)' saved; rerun", log)
    assert len(said) == 1, log[-3000:]
    step, tag_dir = int(said[0][0]), said[0][1]
    assert step < STEPS and os.path.isfile(os.path.join(tag_dir, "complete"))
    assert (out / "checkpoints" / "latest").read_text() == os.path.basename(tag_dir)
    assert "Traceback" not in log and not re.search(r"^error", log, re.M)  # ours; the launcher logs its own
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*")

    run_ok(deepspeed_cmd(flags(assets, out, resume="auto")))
    assert_same_weights(straight_run, out)
    steps = [m["step"] for m in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))  # each step once, though steps after the save were logged twice


@pytest.mark.slow
def test_keep_checkpoints_leaves_the_newest_tags_and_a_run_resumes_from_them(assets, straight_run, tmp_path):
    """The reference run resumed after step 16 (its later tags gone, as after a kill) with --save_every 2
    --keep_checkpoints 2: each save deletes all but the newest two committed tags, the run's older ones
    too, and `latest` names the newest. Killed again after step 22 (step 24 gone), it resumes from what
    was kept; both resumes end on the uninterrupted run's weights."""
    from test_multinode import assert_same_weights
    out = tmp_path / "kept"
    shutil.copytree(straight_run, out, ignore=shutil.ignore_patterns("student", "summary.json"))
    root = out / "checkpoints"

    def kill_after(step):
        for tag in root.glob("step_*"):
            if tag.name > f"step_{step:08d}":
                shutil.rmtree(tag)
        (root / "latest").write_text(f"step_{step:08d}")

    kill_after(16)
    assert len(list(root.glob("step_*"))) == 4
    run_ok(deepspeed_cmd(flags(assets, out, resume=True, save_every=2, keep_checkpoints=2)))
    assert sorted(t.name for t in root.glob("step_*")) == ["step_00000022", "step_00000024"]
    assert (root / "latest").read_text() == "step_00000024"
    assert all((t / "complete").is_file() for t in root.glob("step_*"))
    assert_same_weights(straight_run, out)
    kill_after(22)
    shutil.rmtree(out / "student")
    run_ok(deepspeed_cmd(flags(assets, out, resume=True, save_every=2, keep_checkpoints=2)))
    assert sorted(t.name for t in root.glob("step_*")) == ["step_00000022", "step_00000024"]
    assert_same_weights(straight_run, out)


def test_the_output_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_ones_lock(tmp_path):
    from minimoe import runlock
    from minimoe.config import ConfigError
    out = tmp_path / "run"
    out.mkdir()
    lock = out / runlock.LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "start": runlock._start_time(os.getpid()), "since": "then"}))
    with pytest.raises(ConfigError,
                       match=rf"in use by a live run \(host {socket.gethostname()}, pid {os.getpid()}"):
        runlock.check(str(out))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "start": "1"}))
    runlock.check(str(out))  # its holder is gone
    # a zombie holder (killed, its launcher gone, PID 1 not reaping it: a container without init) is gone too
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": zombie.pid,
                                "start": runlock._start_time(zombie.pid)}))
    with pytest.raises(ConfigError, match="in use by a live run"):
        runlock.check(str(out))
    zombie.kill()
    while _running(zombie.pid):  # killed, not yet reaped: a zombie until zombie.wait()
        time.sleep(0.01)
    runlock.check(str(out))
    zombie.wait()
    assert "took over" in runlock.acquire(str(out))
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    runlock.release()
    assert not lock.exists() and out.is_dir()
    runlock.acquire(str(tmp_path / "fresh"))
    runlock.release()
    assert not (tmp_path / "fresh").exists()  # a folder the run created and left empty goes with the lock


@pytest.mark.slow
def test_a_busy_master_port_is_refused_in_one_line(assets, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run(_deepspeed_at(port, flags(assets, tmp_path / "out")), env=env(),
                           capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"error: --master_port {port} is in use on this machine (another job?)" in p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*")


@pytest.mark.slow
def test_ctrl_c_ends_in_one_line_and_leaves_nothing_behind(assets, tmp_path):
    out, port = tmp_path / "interrupted", free_port()
    proc = _start(_deepspeed_at(port, flags(assets, out, max_steps=400)), tmp_path / "run.log")
    _wait_for(out / "checkpoints" / "latest", proc)
    ranks = _ranks_of(port)
    # A second run, or a resume, into the folder the live run holds: refused, naming the holder.
    for extra in ({}, {"resume": True}):
        p = subprocess.run([sys.executable, f"{REPO}/launchers/distill.py", *flags(assets, out, ep_size=1,
                                                                                    **extra)],
                           env=env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "is in use by a live run (host" in p.stderr, p.stderr[-2000:]
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: SIGINT to the foreground process group
    proc.wait(timeout=120)
    log = (tmp_path / "run.log").read_text()
    said = re.findall(r"interrupted \(Ctrl-C\) after step \d+; the last complete checkpoint is '[^']+'; "
                      r"continue with the same command and --resume", log)
    assert len(said) == 1, log[-3000:]
    assert "minimoe" not in "".join(re.findall(r"Traceback.*?\n\S", log, re.S))  # no rank printed a traceback
    deadline = time.time() + 30
    while [pid for pid in ranks if _running(pid)] and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in ranks if _running(pid)], "a rank outlived the interrupt by 30 s"
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*")
    latest = (out / "checkpoints" / "latest").read_text()
    for tag in glob.glob(str(out / "checkpoints" / "step_*")):  # nothing half-written looks complete
        assert os.path.isfile(os.path.join(tag, "complete")) or os.path.basename(tag) > latest, (tag, latest)


# ---------------------------------------------------------------------------------------------
# Fine-tuning on the same loop: committed checkpoints, resume, a run folder that exports.

@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from minimoe import MiniMoEModel, StudentConfig
    from minimoe.config import PACKAGED_TEACHER
    from minimoe.data.assets import resolve_model
    path = tmp_path_factory.mktemp("student") / "student"
    MiniMoEModel(StudentConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_size=128,
                               num_experts=4)).save_pretrained(str(path))
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(resolve_model(PACKAGED_TEACHER), name), path)
    return str(path)


def _finetune_cmd(student, data, out, **extra):
    f = {"model": student, "task": "sentiment", "data": data, "output_dir": str(out), "micro_batch_size": 8,
         "max_seq_length": 32, "lr": 1e-3, "max_steps": 16, "eval_every": 8, "log_every": 4, "save_every": 4,
         "wandb": "disabled", "patience": 0, **extra}
    return [sys.executable, f"{REPO}/launchers/finetune.py", *[f"--{k}={v}" for k, v in f.items()]]


@pytest.mark.slow
def test_a_killed_fine_tuning_run_resumes_to_the_same_result_and_its_folder_exports(student, tmp_path):
    from safetensors.torch import load_file
    data = sentiment_dir(tmp_path / "sent")
    straight = tmp_path / "straight"
    run_ok(_finetune_cmd(student, data, straight))
    assert json.load(open(straight / "run_config.json"))["task"] == "sentiment"
    assert os.path.isfile(straight / "checkpoints" / "best" / "complete")

    killed = tmp_path / "killed"
    proc = _start(_finetune_cmd(student, data, killed), tmp_path / "killed.log")
    _wait_for(killed / "checkpoints" / "step_00000008" / "complete", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    run_ok(_finetune_cmd(student, data, killed, resume=True))

    want, got = (json.load(open(d / "results.json")) for d in (straight, killed))
    assert got["best"] == want["best"] and got["history"] == want["history"]
    a, b = (load_file(d / "model" / "model.safetensors") for d in (straight, killed))
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
    logged = [m["step"] for m in read_jsonl(killed / "metrics.jsonl") if "train_loss" in m]
    assert logged == sorted(set(logged))

    # The run folder exports like a distillation run's (README: export.py --model runs/finetune-...).
    p = subprocess.run([sys.executable, f"{REPO}/launchers/export.py", "--model", str(killed), "--format",
                        "onnx"], env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.path.isfile(killed / "model" / "onnx" / "model.onnx")


def test_a_resumed_run_logs_each_step_once_to_metrics_and_wandb(tmp_path):
    """Resumed at step 5 after logging 8 steps: metrics.jsonl drops and rewrites steps 6-8; wandb, which
    keeps what it was sent, is sent only the steps after 8."""
    from minimoe.monitor import Monitor
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                                                    for s in range(1, 9)) + '{"step": 9, "lo')
    sent = []

    class FakeRun:
        def log(self, row, step):
            sent.append(step)

    monitor = Monitor(str(tmp_path), True, 12, 5, "disabled", "p", {})
    monitor._wandb = FakeRun()
    for step in range(6, 13):
        monitor.log(step, {"loss": 0.5})
    monitor._wandb = None
    monitor.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 13))
    assert sent == [9, 10, 11, 12]


def _wandb_records(path) -> list:
    """The protobuf records of a wandb ``.wandb`` file: a 7-byte file header (":W&B", magic, version), then
    LevelDB-log blocks of 32 KiB whose chunks (7-byte header: crc, length, type) join into records."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:16]
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero fill at the end of a file still being written
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.slow
def test_an_offline_wandb_run_writes_its_history_where_its_one_line_says(student, tmp_path):
    """--wandb offline (WANDB_MODE, which tests set to disabled, removed from the child): the run prints one
    line naming its id and folder; that folder holds run-<id>.wandb, the id is the one kept in wandb_run_id,
    and the file holds every logged training step with its loss and the run's config."""
    data = sentiment_dir(tmp_path / "sent")
    out = tmp_path / "run"
    child = env()
    child.pop("WANDB_MODE", None)
    child.update(WANDB_DIR=str(tmp_path / "wandb-home"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
                 WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"))
    p = subprocess.run(_finetune_cmd(student, data, out, wandb="offline", max_steps=4, eval_every=4,
                                     log_every=1, save_every=4), env=child, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("wandb:")]
    assert len(lines) == 1, lines
    said = re.fullmatch(r"wandb: offline run (\w+) in (\S+) \(upload: wandb sync (\S+)\)", lines[0])
    assert said and said[2] == said[3], lines[0]
    run_id, folder = said[1], said[2]
    assert run_id == (out / "wandb_run_id").read_text().strip()
    assert os.path.dirname(folder) == str(out / "wandb") and \
        os.path.basename(folder).startswith("offline-run-")
    records = _wandb_records(Path(folder) / f"run-{run_id}.wandb")
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].run_id == run_id
    history = {r.history.step.num: {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                    for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"}
    logged = {m["step"]: m for m in read_jsonl(out / "metrics.jsonl") if "train_loss" in m}
    assert sorted(logged) == [1, 2, 3, 4] and set(logged) <= set(history)
    for step, m in logged.items():
        assert history[step]["train_loss"] == pytest.approx(m["train_loss"]), step
    assert history[4]["dev/dev/accuracy"] == \
        pytest.approx(json.load(open(out / "results.json"))["best"]["main"])
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert config["task"] == "sentiment" and config["max_steps"] == 4
