"""Checkpoints: DeepSpeed engine state (experts included) plus our loop state, resume, and export.

Layout of ``output_dir/checkpoints``::

    step_00000050/                       one DeepSpeed tag per save
        mp_rank_00_model_states.pt       non-expert weights + client state (loop position, config)
        layer_{l}_expert_{e}_mp_rank_00_model_states.pt   one file per global expert
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt       optimizer shards
        rng_rank_{r}.pt                  each rank's RNG streams (gate noise, dropout)
    latest                               written (atomically) once every rank's files are on disk:
                                         a crash mid-save leaves the previous checkpoint as the one to resume

Export reads the files, not a live engine: DeepSpeed's zero_to_fp32 does not know expert files, and
reading them lets any checkpoint become an ep_size-1 student folder in one plain process.
"""
from __future__ import annotations

import contextlib
import glob
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

from . import reshard
from .config import ConfigError

TAG_FORMAT = "step_{:08d}"
_TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return TAG_FORMAT.format(step)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(engine, root: str, step: int, client_state: dict, rank: int, keep: int) -> str:
    """Save engine + loop state as tag ``step_N``; keep the newest ``keep`` tags."""
    import torch.distributed as dist
    tag = tag_for(step)
    os.makedirs(os.path.join(root, tag), exist_ok=True)
    torch.save(rng_state(), os.path.join(root, tag, f"rng_rank_{rank}.pt"))
    # DeepSpeed's rank 0 writes `latest` as soon as *its* files are done; a kill at that moment would
    # point `latest` at a tag missing other ranks' shards. So: save, wait for every rank, then commit.
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if rank == 0:
        tmp = os.path.join(root, "latest.tmp")
        with open(tmp, "w") as fh:
            fh.write(tag)
        os.replace(tmp, os.path.join(root, "latest"))
        for old in list_tags(root)[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return os.path.join(root, tag)


def list_tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if _TAG_RE.match(t) and os.path.isdir(os.path.join(root, t)))


def resolve(resume, checkpoints_root: str) -> Optional[tuple[str, str]]:
    """``--resume`` -> (root, tag), or None for a fresh start. Raises if asked for and absent."""
    if resume is False or resume in ("", "false", "False"):
        return None
    if resume is True or resume in ("true", "True", "latest"):
        latest = os.path.join(checkpoints_root, "latest")
        if not os.path.isfile(latest):
            raise ConfigError(f"--resume: no checkpoint to resume in {checkpoints_root!r} (no 'latest' file)")
        with open(latest) as fh:
            return checkpoints_root, fh.read().strip()
    path = os.path.normpath(str(resume))
    if os.path.isfile(os.path.join(path, "latest")):  # a checkpoints root
        with open(os.path.join(path, "latest")) as fh:
            return path, fh.read().strip()
    if os.path.isfile(os.path.join(path, "mp_rank_00_model_states.pt")):  # one tag folder
        return os.path.dirname(path), os.path.basename(path)
    raise ConfigError(f"--resume {resume!r} is not a checkpoint folder (no 'latest' or mp_rank_00_model_states.pt)")


def load(engine, root: str, tag: str, rank: int, layout, client: dict, weights_only: bool = False) -> None:
    """Restore engine, optimizer, scheduler and this rank's RNG. ``client`` is the checkpoint's loop
    state (``client_state``, read once when the run was planned).

    A checkpoint of another world size or ep_size (or ``weights_only``) goes through ``reshard``: the
    module weights by DeepSpeed's module load (experts by global id), the optimizer state
    re-partitioned for this layout (or left fresh), the schedule and counters restored."""
    tag_dir = os.path.join(root, tag)
    saved = reshard.saved_layout(tag_dir, client)
    elastic = weights_only or (saved.world_size, saved.ep_size) != (layout.world_size, layout.ep_size)
    path, _ = engine.load_checkpoint(root, tag, load_module_only=elastic, load_optimizer_states=not elastic,
                                     load_lr_scheduler_states=not elastic)
    if path is None:
        raise ConfigError(f"--resume: DeepSpeed could not load checkpoint {tag_dir!r}")
    if elastic:
        reshard.restore(engine, tag_dir, saved, layout.ep_rank(rank), layout.experts_per_rank,
                        layout.student.num_experts, with_optimizer=not weights_only)
    rng_file = os.path.join(tag_dir, f"rng_rank_{rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming on more ranks than saved: fresh streams then
        set_rng_state(torch.load(rng_file, weights_only=False))


def gather_state_dict(tag_dir: str) -> dict:
    """All student weights of a checkpoint tag, experts under their global ids (an ep_size-1 state)."""
    main = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(main):
        raise ConfigError(f"{tag_dir!r} is not a DeepSpeed checkpoint tag (no mp_rank_00_model_states.pt)")
    state = dict(torch.load(main, map_location="cpu", weights_only=False)["module"])
    for f in sorted(glob.glob(os.path.join(tag_dir, "layer_*_expert_*_mp_rank_00_model_states.pt"))):
        state.update(torch.load(f, map_location="cpu", weights_only=False))
    return state


def client_state(tag_dir: str) -> dict:
    ckpt = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt.items() if k.startswith("minimoe_")}


def export_student(tag_dir: str, out_dir: str, student_config, tokenizer=None) -> str:
    """Write an exported student folder (config + safetensors (+ tokenizer)) from a checkpoint tag.

    Weights are written in fp32 whatever the training precision. The folder is assembled next to
    ``out_dir`` and moved into place, so a crash never leaves a half-written student.
    """
    from .student import MiniMoEModel
    state = {k: v.float() if v.is_floating_point() else v for k, v in gather_state_dict(tag_dir).items()}
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ConfigError(f"checkpoint {tag_dir!r} holds non-finite weights ({len(broken)} tensors, e.g. "
                          f"{broken[:2]}): not exported")
    model = MiniMoEModel(student_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {tag_dir!r} does not match the student config: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    with staged_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


@contextlib.contextmanager
def staged_folder(out_dir: str):
    """Yield a sibling folder to fill; on success it replaces ``out_dir``, so readers never see a
    half-written export and a crash leaves the previous one in place."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
