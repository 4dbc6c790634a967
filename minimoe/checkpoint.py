"""Checkpoints: DeepSpeed engine state (experts included) plus our loop state, and resume.

Layout of ``output_dir/checkpoints``::

    step_00000050/                       one DeepSpeed tag per save
        mp_rank_00_model_states.pt       non-expert weights + client state (loop position, config)
        layer_{l}_expert_{e}_mp_rank_00_model_states.pt   one file per global expert
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt       optimizer shards
        rng_rank_{r}.pt                  each rank's RNG streams (gate noise, dropout)
        complete                         written last, once every rank's files are on disk
    latest                               written (atomically) once every rank's files are on disk:
                                         a crash mid-save leaves the previous checkpoint as the one to resume

A run of several students (``--students``) keeps one tag per save too, each student's DeepSpeed files and
RNG streams in ``step_N/<name>/``; ``complete`` and ``latest`` commit them all at once.

``gather_state_dict`` reads the files, not a live engine: DeepSpeed's zero_to_fp32 does not know expert files,
and reading them lets any checkpoint become an ep_size-1 student (``minimoe.export``) in one plain process.
"""
from __future__ import annotations

import errno
import glob
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from . import reshard, runlock
from .config import ConfigError
from .errors import ENVIRONMENT_FAILURE, PeerFailed, UnreadableFile, reading, torch_zip_file

TAG_FORMAT = "step_{:08d}"
_TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "complete"
_RESUME_EARLIER = "; resume from an earlier checkpoint (--resume <output_dir>/checkpoints/step_N)"


def tag_for(step: int) -> str:
    return TAG_FORMAT.format(step)


MODEL_STATES = "mp_rank_00_model_states.pt"


def torch_rng_state() -> dict:
    """torch's generators (CPU, and each GPU's): what a member's own stream of dropout and noise is."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_torch_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), **torch_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    set_torch_rng_state(state)


@dataclass
class Part:
    """One trained model's share of a save: its engine, its folder inside the tag ('' for a one-model run:
    the tag itself), its loop state, and its own RNG streams (None: the process's)."""

    engine: Any
    subdir: str
    client_state: dict
    rng: Optional[dict] = None


# What every checkpoint records of how the experts' parameters are laid out (``experts.StackedExperts``).
EXPERT_LAYOUT_KEY, STACKED = "minimoe_expert_layout", "stacked"


def members_of(tag_dir: str) -> list[str]:
    """The models a tag holds: ``[""]`` for a one-model tag, else the student folders' names."""
    if os.path.isfile(os.path.join(tag_dir, MODEL_STATES)):
        return [""]
    if not os.path.isdir(tag_dir):
        return []
    return sorted(d for d in os.listdir(tag_dir) if os.path.isfile(os.path.join(tag_dir, d, MODEL_STATES)))


def save(parts: list[Part], root: str, step: int, rank: int, keep: int, tag: Optional[str] = None) -> str:
    """Save every part's engine + loop state as tag ``step_N``; keep the newest ``keep`` tags.

    A save that fails (a full disk, a killed rank) leaves no tag that looks complete: the ``complete``
    marker and ``latest`` are written only after every rank's files are on disk, and the rank that
    failed removes what it wrote of the tag, to give the space back. A named ``tag`` (fine-tuning's
    ``best``) is committed the same way but is neither ``latest`` nor rotated."""
    import torch.distributed as dist
    named, tag = tag is not None, tag or tag_for(step)
    tag_dir = os.path.join(root, tag)
    try:
        os.makedirs(tag_dir, exist_ok=True)
        if rank == 0 and os.path.exists(os.path.join(tag_dir, COMPLETE)):
            os.remove(os.path.join(tag_dir, COMPLETE))  # being overwritten: not complete until done again
        for part in parts:
            part_dir = os.path.join(tag_dir, part.subdir)
            os.makedirs(part_dir, exist_ok=True)
            torch.save({**rng_state(), **(part.rng or {})}, os.path.join(part_dir, f"rng_rank_{rank}.pt"))
            # DeepSpeed's rank 0 writes `latest` as soon as *its* files are done; a kill at that moment would
            # point `latest` at a tag missing other ranks' shards. So: save, wait for every rank, then commit.
            save_dir, ds_tag = (tag_dir, part.subdir) if part.subdir else (root, tag)
            part.engine.save_checkpoint(save_dir, tag=ds_tag,
                                        client_state={**part.client_state, EXPERT_LAYOUT_KEY: STACKED},
                                        save_latest=False)
        dist.barrier()
        if rank == 0:
            open(os.path.join(tag_dir, COMPLETE), "w").close()
            if not named:
                tmp = os.path.join(root, "latest.tmp")
                with open(tmp, "w") as fh:
                    fh.write(tag)
                os.replace(tmp, os.path.join(root, "latest"))
                for old in complete_tags(root)[:-keep]:
                    shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    except Exception as e:
        if not os.path.isdir(tag_dir):
            # A partner's save failed first (a full disk) and removed the tag while this rank was writing
            # into it: the partner's line says why; this rank's "no such folder" would hide it.
            raise PeerFailed(None, ENVIRONMENT_FAILURE) from e
        failure = _as_write_error(e, tag_dir)
        shutil.rmtree(tag_dir, ignore_errors=True)
        if failure is not e:
            raise failure from e
        raise
    dist.barrier()
    return tag_dir


# What torch's zip writer raises (a RuntimeError, errno lost) when a write comes up short.
_TORCH_WRITE_ERRORS = ("file write failed", "unexpected pos", "PytorchStreamWriter failed")


def _as_write_error(e: Exception, tag_dir: str) -> Exception:
    """torch.save reports a full disk as a RuntimeError about zip positions: name it for what it is."""
    if isinstance(e, OSError) or not any(m in str(e) for m in _TORCH_WRITE_ERRORS):
        return e
    full = shutil.disk_usage(os.path.dirname(tag_dir)).free < 64 * 2 ** 20
    return OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else "write failed",
                   tag_dir)


def list_tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if _TAG_RE.match(t) and os.path.isdir(os.path.join(root, t)))


def _latest(root: str) -> Optional[str]:
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return fh.read().strip()


def is_complete(root: str, tag: str) -> bool:
    """Finished saves carry the ``complete`` marker; a tag no newer than ``latest`` is complete too
    (checkpoints written before the marker existed)."""
    latest = _latest(root)
    return os.path.isfile(os.path.join(root, tag, COMPLETE)) or (latest is not None and tag <= latest)


def complete_tags(root: str) -> list[str]:
    return [t for t in list_tags(root) if is_complete(root, t)]


def incomplete_tags(root: str) -> list[str]:
    """Tags of saves that did not finish (a full disk, a killed job): never resumed from, removed by the
    next run that saves into ``root``."""
    return [t for t in list_tags(root) if not is_complete(root, t)]


def remove_incomplete(root: str) -> list[str]:
    gone = incomplete_tags(root)
    for tag in gone:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    return gone


def resolve(resume, checkpoints_root: str) -> Optional[tuple[str, str]]:
    """``--resume`` -> (root, tag), or None for a fresh start. Raises if asked for and absent; ``auto``
    resumes from ``latest`` when there is one and starts afresh otherwise."""
    if resume is False or resume in ("", "false", "False"):
        return None
    if resume == "auto":  # a requeued job: continue when there is something to continue, else start
        latest = _latest(checkpoints_root)
        return (checkpoints_root, latest) if latest is not None else None
    if resume is True or resume in ("true", "True", "latest"):
        latest = _latest(checkpoints_root)
        if latest is None:
            broken = incomplete_tags(checkpoints_root)
            why = (f" ({', '.join(broken)}: a save that did not finish; start afresh without --resume)"
                   if broken else " (no 'latest' file)")
            raise ConfigError(f"--resume: no complete checkpoint to resume in {checkpoints_root!r}{why}")
        return checkpoints_root, latest
    path = os.path.normpath(str(resume))
    if _latest(path) is not None:  # a checkpoints root
        return path, _latest(path)
    if members_of(path):  # one tag folder
        root, tag = os.path.dirname(path), os.path.basename(path)
        if not is_complete(root, tag):
            raise ConfigError(f"--resume {resume!r}: this checkpoint's save did not finish (no '{COMPLETE}' "
                              "marker); resume from an earlier one")
        return root, tag
    raise ConfigError(f"--resume {resume!r} is not a checkpoint folder (no 'latest' or "
                      "mp_rank_00_model_states.pt)")


def plan_resume(cfg, global_batch: int, global_batch_fix: str, check_stage=None,
                members: tuple[str, ...] = ("",)) -> tuple[Optional[tuple[str, str]], dict]:
    """``--resume`` checked before any process group: ``(root, tag)`` and the loop state of each of the
    run's ``members`` (``{subdir: client state}``, ``""`` for a one-model run), or ``(None, {})`` for a fresh
    start (refused over an earlier run's checkpoints). What every stage checks: a complete tag holding
    the same members, whole files, every optimizer shard, the same global batch (the data position is
    the step number, which means the same samples only at the same global batch).
    ``check_stage(member, client)`` checks the rest (the stage's student, its target), first."""
    runlock.check(cfg.output_dir)  # a live run may rotate the very checkpoint this one would read
    root = os.path.join(cfg.output_dir, "checkpoints")
    resume = resolve(cfg.resume, root)
    if resume is None:
        if complete_tags(root) and not cfg.launch.dry_run:
            raise ConfigError(f"--output_dir {cfg.output_dir!r} holds checkpoints of an earlier run; "
                              "pass --resume to continue it or choose another --output_dir")
        return None, {}
    tag_dir = os.path.join(*resume)
    held = members_of(tag_dir)
    if sorted(held) != sorted(members):
        def say(names):
            return "one student" if names == [""] else f"students {', '.join(names)}"
        raise ConfigError(f"--resume: checkpoint {tag_dir!r} holds {say(sorted(held))}; this run has "
                          f"{say(sorted(members))} (--students must name the same students)")
    check_whole(tag_dir)
    clients = {}
    for member in members:
        client = clients[member] = client_state(os.path.join(tag_dir, member))
        if not cfg.resume_weights_only:
            check_shards(os.path.join(tag_dir, member), client)
        if check_stage is not None:
            check_stage(member, client)
        if client.get("minimoe_global_batch") != global_batch:
            raise ConfigError(f"--resume: the checkpoint was trained with global batch "
                              f"{client.get('minimoe_global_batch')}, this run has {global_batch} "
                              f"({global_batch_fix}); "
                              "set --micro_batch_size / --grad_accum so that they match")
    return resume, clients


def check_whole(tag_dir: str) -> None:
    """Every file of a checkpoint tag is a whole zip archive (torch's format keeps its directory at the
    end, so a truncated copy or a cut-off download has none): found before the process group starts,
    not by the one rank that reads the damaged shard."""
    for path in sorted(glob.glob(os.path.join(tag_dir, "**", "*.pt"), recursive=True)):
        torch_zip_file(path, _RESUME_EARLIER)


def check_shards(tag_dir: str, client: dict) -> None:
    """Every rank's optimizer shard of a ZeRO checkpoint is there (a copy that lost one would otherwise fail
    on the one rank that reads it, with the tag folder as the only name)."""
    world = client.get("minimoe_world_size")
    if world is None or not glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_optim_states.pt")):
        return  # an older checkpoint (no recorded world), or a ZeRO-0 one (no shards)
    for rank in range(world):
        path = os.path.join(tag_dir, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if not os.path.isfile(path):
            raise UnreadableFile(f"{path!r} is missing: the checkpoint is incomplete; resume from an earlier "
                                 "one, or pass --resume_weights_only to continue with fresh optimizer state")


def _torch_load(path: str):
    with reading(path, _RESUME_EARLIER):
        return torch.load(path, map_location="cpu", weights_only=False)


def load(engine, root: str, tag: str, rank: int, layout, client: dict, weights_only: bool = False,
         subdir: str = "") -> None:
    """Restore engine, optimizer, scheduler and this rank's RNG. ``client`` is the checkpoint's loop
    state (``client_state``, read once when the run was planned).

    A checkpoint of another world size or ep_size, one whose experts were saved before they were stacked,
    or ``weights_only`` goes through ``reshard``: the module weights by DeepSpeed's module load (experts by
    global id), the optimizer state re-partitioned for this layout (or left fresh), the schedule and
    counters restored."""
    tag_dir = os.path.join(root, tag, subdir)
    saved = reshard.saved_layout(tag_dir, client)
    # Checkpoints from before the experts were stacked keep each expert's optimizer state in its own slice of
    # ZeRO's flat buffer: the same size, another order. Loaded as-is they would mix the experts' moments up.
    unstacked = layout.student.num_experts > 1 and client.get(EXPERT_LAYOUT_KEY) != STACKED
    elastic = (weights_only or unstacked
               or (saved.world_size, saved.ep_size) != (layout.world_size, layout.ep_size))
    load_dir, ds_tag = (os.path.join(root, tag), subdir) if subdir else (root, tag)
    with reading(tag_dir, _RESUME_EARLIER):
        path, _ = engine.load_checkpoint(load_dir, ds_tag, load_module_only=elastic,
                                         load_optimizer_states=not elastic,
                                         load_lr_scheduler_states=not elastic)
    if path is None:
        raise ConfigError(f"--resume: DeepSpeed could not load checkpoint {tag_dir!r}")
    if elastic:
        reshard.restore(engine, tag_dir, saved, layout.ep_rank(rank), layout.experts_per_rank,
                        layout.student.num_experts, with_optimizer=not weights_only)
    rng_file = os.path.join(tag_dir, f"rng_rank_{rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming on more ranks than saved: fresh streams then
        set_rng_state(_torch_load(rng_file))


def gather_state_dict(tag_dir: str) -> dict:
    """All student weights of a checkpoint tag, experts under their global ids (an ep_size-1 state)."""
    main = os.path.join(tag_dir, MODEL_STATES)
    if not os.path.isfile(main):
        raise ConfigError(f"{tag_dir!r} is not a DeepSpeed checkpoint tag (no mp_rank_00_model_states.pt)")
    state = dict(_torch_load(main)["module"])
    for f in sorted(glob.glob(os.path.join(tag_dir, "layer_*_expert_*_mp_rank_00_model_states.pt"))):
        state.update(_torch_load(f))
    return state


def client_state(tag_dir: str) -> dict:
    ckpt = _torch_load(os.path.join(tag_dir, MODEL_STATES))
    return {k: v for k, v in ckpt.items() if k.startswith("minimoe_")}
