"""One training loop for every stage (in the spirit of torchtitan's train.py + TrainSpec).

A stage (distillation, fine-tuning) supplies what differs as a ``TrainSpec``: its micro-batches, the
forward it shares across members (the teacher's Q/K/V; nothing, or the task teacher's logits), the loss
of one member (a ``Member``: a model trained, with its engine; distillation may train several students
from one teacher pass), a window of metrics between log lines, its evaluation and the loop state of its
own that a checkpoint must carry (fine-tuning's best score). The ``Trainer`` owns what is the same: the
optimizer steps, the non-finite guard, the progress bar and metrics, the log / eval / save cadences,
committed checkpoints (``complete`` marker, ``latest``), resume and elastic resume.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from . import checkpoint, runlock
from .config import ConfigError, TrainConfig
from .distributed import DistInfo, agree, init_distributed
from .errors import Stopped, arm_native_crash_log
from .monitor import Monitor, member_folder


def start(seed: int) -> DistInfo:
    """Start (or join) the process group and seed every generator with the run's seed (each rank then
    seeds its own dropout / gate-noise stream once the model is built: ``Trainer.resume``). A rank started
    by a launcher stops as on SIGTERM when its launcher dies, instead of training on unseen."""
    if "LOCAL_RANK" in os.environ:
        _stop_with_parent()
    info = init_distributed()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return info


def _stop_with_parent() -> None:
    """Linux: ask the kernel for SIGTERM when the parent (the launcher) dies."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's own signals still reach the ranks
        return
    if os.getppid() == 1:  # the launcher died before the call
        os.kill(os.getpid(), signal.SIGTERM)


STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}


class StopRequests:
    """Stop signals (SIGTERM, SIGUSR1: what Slurm sends before preemption, ``#SBATCH --signal``) are only
    recorded here; every rank learns of one at the next loss check (the same all-reduce), finishes that
    optimizer step, and the run saves a committed checkpoint before it stops. Ctrl-C is recorded too, so
    a rank whose collective fails because its partner was interrupted first knows why."""

    def __init__(self):
        self.signum = 0
        self.interrupted = False
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_stop)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        for sig, handler in self._previous.items():
            # Leaving on a stop or a failure, the process is on its way out: the launcher's own SIGTERM to
            # its ranks (it forwards Ctrl-C that way) must not kill it before it has said why and cleaned up.
            signal.signal(sig, handler if kind is None else signal.SIG_IGN)

    def _on_stop(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def _on_interrupt(self, signum, frame) -> None:
        self.interrupted = True
        raise KeyboardInterrupt


class Window(Protocol):
    """Sums over the steps between two log lines, reduced across ranks when logged."""

    steps: int
    step_time: float                            # the steps' wall time (teacher and every member)
    member_s: float                             # this member's own share of it

    def add(self, batch: dict, record: Any) -> None: ...

    def reduce(self, world_size: int) -> tuple[dict, Optional[dict]]: ...


class TrainSpec(Protocol):
    """What a stage supplies to the loop."""

    desc: str                                   # the progress bar's label

    def micro_batches(self, step: int) -> list[dict]: ...          # this rank's, on its device

    def shared_forward(self, batch: dict) -> Any: ...               # once per micro-batch, for every member

    def loss(self, member: "Member", batch: dict, shared: Any) -> tuple[torch.Tensor, Any]:
        ...  # loss, record

    def window(self, member: "Member") -> Window: ...

    def evaluate(self, members: list["Member"], step: int) -> list[tuple[dict, str]]: ...  # per member:
    #                                                                 (metrics to log, a line to print)

    def should_stop(self) -> str: ...                               # why to stop early ("" to go on)

    def improved(self) -> bool: ...                                 # the last evaluation is the best so far

    def loop_state(self) -> dict: ...                               # carried by every checkpoint

    def load_loop_state(self, state: dict) -> None: ...


@dataclass
class Cadence:
    total_steps: int
    log_every: int
    save_every: int
    eval_every: int = 0                         # 0: no evaluation during training

    def log(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.total_steps

    def eval(self, done: int) -> bool:
        return bool(self.eval_every) and (done % self.eval_every == 0 or done == self.total_steps)

    def save(self, done: int) -> bool:
        return bool(self.save_every and done % self.save_every == 0) or done == self.total_steps


@dataclass
class Member:
    """One model the loop trains. A run of several (``--students``) trains each on the same micro-batches and
    shared forward, one after the other, each with its own engine, RNG streams (dropout, gate noise: swapped
    in around its work, so it draws what it would draw alone), checkpoint folder and metrics."""

    engine: Any
    layout: Any                                 # its Layout (ep_size, experts per rank) for resume
    client_state: Callable[[int], dict]         # what its checkpoints record besides the loop position
    name: str = ""                              # "" in a one-model run
    cfg: Any = None                             # its own settings (a --students entry's config)
    history: list = field(default_factory=list)  # its logged metrics
    rng: Optional[dict] = None                  # its torch RNG streams while another member runs

    @property
    def folder(self) -> str:
        """Its folder inside the run folder (its checkpoint files are in ``<tag>/<name>``)."""
        return member_folder(self.name)


class Trainer:
    """Runs ``spec`` on the ``members``' engines from ``start_step`` to ``cadence.total_steps`` (or an early
    stop)."""

    def __init__(self, spec: TrainSpec, members: list[Member], cfg: TrainConfig, info: DistInfo,
                 cadence: Cadence, best_tag: Optional[str] = None):
        self.spec, self.members, self.cfg, self.info, self.cadence = spec, members, cfg, info, cadence
        self.best_tag = best_tag
        self.monitor: Optional[Monitor] = None
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        self.last_step = 0

    @property
    def history(self) -> list[dict]:
        """The first member's logged metrics (the only one's, in a one-model run)."""
        return self.members[0].history

    @contextlib.contextmanager
    def _stream(self, member: Member):
        """``member``'s RNG streams in place while it works (a no-op in a one-model run)."""
        if len(self.members) == 1:
            yield
            return
        checkpoint.set_torch_rng_state(member.rng)
        try:
            yield
        finally:
            member.rng = checkpoint.torch_rng_state()

    def resume(self, resume: Optional[tuple], clients: dict) -> int:
        """Take the output folder (rank 0 holds its lock for the whole job: a live run there refuses this
        one), then restore each member's engine and RNG and the stage's loop state (``clients``: each
        member's checkpoint loop state by name); the step to start from. A fresh start seeds this rank's
        own stream (dropout, gate noise), every member's from the same seed, as it would be alone.
        Incomplete tags of a killed save go. The lock is taken here, the first write into the folder, so a
        run that fails before it leaves no folder behind."""
        took_over = agree(lambda: runlock.acquire(self.cfg.output_dir), main_only=True)
        if took_over:
            print(took_over, flush=True)
        start_step = 0
        if resume:
            first = clients[self.members[0].name]
            start_step = int(first["minimoe_step"])
            if start_step > self.cadence.total_steps:
                raise ConfigError(f"--resume: the checkpoint is at step {start_step}, past this run's "
                                  f"{self.cadence.total_steps} steps; raise --max_steps")
            for m in self.members:
                checkpoint.load(m.engine, *resume, self.info.rank, m.layout, clients[m.name],
                                self.cfg.resume_weights_only, subdir=m.name)
                m.rng = checkpoint.torch_rng_state()
            self.spec.load_loop_state(first.get("minimoe_loop", {}))
        else:
            torch.manual_seed(self.cfg.seed + self.info.rank)
            for m in self.members:
                m.rng = checkpoint.torch_rng_state()
        if self.info.is_main:
            for tag in checkpoint.remove_incomplete(self.ckpt_root):
                print(f"removed {os.path.join(self.ckpt_root, tag)!r}: its save did not finish", flush=True)
        self.last_step = start_step
        return start_step

    def open_run(self, run_config: dict, start_step: int) -> Monitor:
        """The run folder's own files, once resumed: ``run_config.json`` (rank 0), each rank's native-crash
        log, and the monitor (progress bar, ``metrics.jsonl`` without the rows of steps after ``start_step``
        that an interrupted run logged, wandb)."""
        output_dir = self.cfg.output_dir
        if self.info.is_main:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "run_config.json"), "w") as fh:
                json.dump(run_config, fh, indent=2, default=str)
        arm_native_crash_log(output_dir, self.info.rank)
        self.monitor = Monitor(output_dir, self.info.is_main, self.cadence.total_steps, start_step,
                               self.cfg.wandb, self.cfg.wandb_project, run_config, desc=self.spec.desc,
                               members=[m.name for m in self.members])
        return self.monitor

    def save(self, step: int, tag: Optional[str] = None) -> None:
        loop = self.spec.loop_state()
        parts = [checkpoint.Part(m.engine, m.name, {**m.client_state(step), "minimoe_step": step,
                                                      "minimoe_loop": loop},
                                 m.rng if len(self.members) > 1 else None)
                 for m in self.members]
        checkpoint.save(parts, self.ckpt_root, step, self.info.rank, self.cfg.keep_checkpoints, tag=tag)

    def fit(self, start_step: int) -> list[dict]:
        """Train to the end (or an early stop) and return the logged metrics; a stop signal ends in a
        committed checkpoint and ``Stopped``, Ctrl-C in ``Stopped`` naming the last complete checkpoint."""
        if self.spec.should_stop():  # a resumed run that had stopped early
            return self.history
        with StopRequests() as requests:
            try:
                return self._steps(start_step, requests)
            except Exception as e:
                if not requests.interrupted or isinstance(e, Stopped):
                    raise
                raise self._interrupted() from None
            except KeyboardInterrupt:
                raise self._interrupted() from None

    def _interrupted(self) -> Stopped:
        last = self._last_complete()
        where = f"the last complete checkpoint is {last!r}" if last else "no checkpoint was saved"
        return Stopped(f"interrupted (Ctrl-C) after step {self.last_step}; {where}; continue with the same "
                       "command and --resume", 128 + signal.SIGINT)

    def _last_complete(self) -> Optional[str]:
        tags = checkpoint.complete_tags(self.ckpt_root)
        return os.path.join(self.ckpt_root, tags[-1]) if tags else None

    def _steps(self, start_step: int, requests: StopRequests) -> list[dict]:
        spec, members, cadence = self.spec, self.members, self.cadence
        for m in members:
            m.engine.train()
        windows = [spec.window(m) for m in members]
        stop_signal = 0
        # The first step's batches are read on every rank first: an empty stream shard on one rank stops all.
        first = agree(lambda: spec.micro_batches(start_step)) if start_step < cadence.total_steps else None
        for step in range(start_step, cadence.total_steps):
            t0 = time.perf_counter()
            for batch in (first if step == start_step else spec.micro_batches(step)):
                shared = spec.shared_forward(batch)
                for m, window in zip(members, windows):
                    t1 = time.perf_counter()
                    with self._stream(m):
                        loss, record = spec.loss(m, batch, shared)
                        stop_signal = self._check(loss, step + 1, requests.signum, m.name) or stop_signal
                        m.engine.backward(loss)
                        m.engine.step()
                    window.add(batch, record)
                    window.member_s += time.perf_counter() - t1
            for window in windows:
                window.step_time += time.perf_counter() - t0
                window.steps += 1
            self.monitor.advance()
            runlock.touch()
            done = self.last_step = step + 1
            if cadence.log(done):
                for i, (m, window) in enumerate(zip(members, windows)):
                    metrics, util = window.reduce(self.info.world_size)
                    metrics["lr"] = m.engine.get_lr()[0]
                    m.history.append({"step": done, **metrics})
                    self.monitor.log(done, metrics, util, member=m.name)
                    windows[i] = spec.window(m)
            stop = ""
            if cadence.eval(done):
                for m, (scores, line) in zip(members, spec.evaluate(members, done)):
                    self.monitor.log(done, scores, member=m.name)
                    self.monitor.write(line)
                if self.best_tag and spec.improved():
                    self.save(done, tag=self.best_tag)
                stop = spec.should_stop()
                if stop:
                    self.monitor.write(stop)
            if cadence.save(done) or stop or stop_signal:
                self.save(done)
            if stop_signal:
                name = STOP_SIGNALS.get(stop_signal, f"signal {stop_signal}")
                saved = os.path.join(self.ckpt_root, checkpoint.tag_for(done))
                raise Stopped(f"stopped by {name} after step {done}: checkpoint {saved!r} saved; rerun the "
                              "same command with --resume (or --resume auto)", 128 + stop_signal)
            if stop:
                break
        return self.history

    def _check(self, loss: torch.Tensor, step: int, signum: int, member: str = "") -> int:
        """One all-reduce per micro-step tells every rank whether any rank's loss is not finite (stop before
        its gradients reach the weights, naming the step and the last good checkpoint) and whether any
        rank was asked to stop (the signal, or 0)."""
        import torch.distributed as dist
        flags = torch.tensor([float(not bool(torch.isfinite(loss.detach()).all())), float(signum)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            last = self._last_complete()
            where = (f"the last good checkpoint is {last!r} (--resume)" if last
                     else "no checkpoint was saved before it")
            whose = f"student {member!r}'s loss" if member else "the loss"
            raise ConfigError(f"{whose} is not finite at step {step}: training diverged (lower --lr, raise "
                              f"--warmup_ratio or --gradient_clipping); {where}; nothing was exported")
        return int(flags[1])
