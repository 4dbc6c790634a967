"""Elastic resume: continue a checkpoint saved at N ranks / ep_size e on M ranks / ep_size e'.

DeepSpeed 0.19 refuses to load ZeRO-1/2 optimizer shards at another data-parallel size, and its
converters (``zero_to_fp32``, ``ds_to_universal``) skip our legacy-MoE expert files. What a checkpoint
holds is enough to redo the partitioning ourselves:

- module weights: one file for the shared weights, one per *global* expert, which DeepSpeed's module
  load already deals to the new ranks by their new ``ep_rank``;
- optimizer shards: each rank's flat fp32 master partition and Adam moments per parameter group, with
  ``param_slice_mappings`` saying which parameter (by its local name) occupies which slice. Expert
  names are local (``deepspeed_experts.{j}``); rank r held global expert ``(r % e) * E/e + j``. Since the
  experts are stacked, one parameter (``experts.fc1_weight``) holds a rank's ``E/e`` experts: split here.

``gather_optimizer_state`` rebuilds every parameter's full fp32 master and moments under global names (an
expert's under its per-expert name, whichever layout wrote it: checkpoints from before the stacking included)
(fragments of one parameter come from consecutive ranks of its data-parallel group, in rank order);
``restore`` writes each new rank's share with DeepSpeed's ``safe_set_full_*`` (which know the new
partitioning), then the step counts, schedule and engine counters. Every rank reads every shard: the
whole optimizer state of a student (hundreds of MB at most), not of a teacher.
"""
from __future__ import annotations

import glob
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from .config import ConfigError
from .errors import reading
from .experts import is_stacked, legacy_name

_EXPERT = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")
_SHARD = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


@dataclass(frozen=True)
class SavedLayout:
    world_size: int
    ep_size: int


def saved_layout(tag_dir: str, client: dict) -> SavedLayout:
    """World and ep_size a checkpoint was written with (older checkpoints: read from its files)."""
    if "minimoe_world_size" in client:
        return SavedLayout(client["minimoe_world_size"], client["minimoe_ep_size"])
    shards = glob.glob(os.path.join(tag_dir, _SHARD.format("*")))
    world = len(shards) or 1
    ep = 1
    if shards:
        groups = _load(os.path.join(tag_dir, _SHARD.format(0)))["base_optimizer_state"]["param_groups"]
        ep = max([int(g["name"].rpartition("_")[2]) for g in groups if g.get("moe")] or [1])
    return SavedLayout(world, ep)


def to_global(name: str, ep_rank: int, experts_per_rank: int) -> str:
    """A local expert parameter name -> the same name with its global expert id."""
    return _EXPERT.sub(lambda m: f"{m[1]}{ep_rank * experts_per_rank + int(m[2])}{m[3]}", name)


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: {path!r} is missing: the checkpoint is incomplete")
    with reading(path, "; resume from an earlier checkpoint, or pass --resume_weights_only"):
        return torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]


def gather_optimizer_state(tag_dir: str, saved: SavedLayout, num_experts: int) -> tuple[dict, torch.Tensor]:
    """{global parameter name: {"fp32": flat, <optimizer state key>: flat, ...}} and the optimizer's step."""
    per_rank = num_experts // saved.ep_size
    pieces: dict = defaultdict(lambda: defaultdict(list))
    step = None
    for rank in range(saved.world_size):
        osd = _load(os.path.join(tag_dir, _SHARD.format(rank)))
        if "param_slice_mappings" not in osd:
            raise ConfigError("--resume: this checkpoint's optimizer shards carry no parameter map (an older "
                              "DeepSpeed wrote them), so they cannot be re-partitioned; pass "
                              "--resume_weights_only to continue with fresh optimizer state")
        base = osd["base_optimizer_state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            expert = bool(base["param_groups"][g].get("moe"))
            state = base["state"].get(g, {})
            step = state.get("step", step)
            flats = {"fp32": osd["single_partition_of_fp32_groups"][g],
                     **{k: v for k, v in state.items()
                        if k != "step" and torch.is_tensor(v) and v.dim() == 1}}
            for name, frag in mapping.items():
                key = name
                if expert:  # a stacked name is the same on every ep_rank: keyed by both until split below
                    key = ((name, rank % saved.ep_size) if is_stacked(name)
                           else to_global(name, rank % saved.ep_size, per_rank))
                for k, flat in flats.items():
                    pieces[key][k].append(flat.narrow(0, frag.start, frag.numel))
    full = {}
    for key, parts in pieces.items():
        flats = {k: torch.cat(v) for k, v in parts.items()}
        if isinstance(key, tuple):  # an ep_rank's stacked experts -> each expert under its global name
            name, ep_rank = key
            for j in range(per_rank):
                full[legacy_name(name, ep_rank * per_rank + j)] = {k: v.chunk(per_rank)[j]
                                                                   for k, v in flats.items()}
        else:
            full[key] = flats
    return full, step


def restore(engine, tag_dir: str, saved: SavedLayout, ep_rank: int, experts_per_rank: int,
            num_experts: int, with_optimizer: bool = True) -> None:
    """After a module-only load on the new layout: the optimizer state (unless ``with_optimizer`` is off),
    the learning-rate schedule and the engine's step counters of the checkpoint."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    if with_optimizer:
        full, step = gather_optimizer_state(tag_dir, saved, num_experts)
        zero = engine.optimizer
        flats = getattr(zero, "single_partition_of_fp32_groups", None)
        if flats is None:
            raise ConfigError("--resume: re-partitioning the optimizer state needs a ZeRO-1/2 student "
                              "(ds_config zero_optimization.stage 1 or 2); pass --resume_weights_only "
                              "otherwise")
        # Adam creates its state at the first step and ZeRO-1/2 link each parameter to its slice of it
        # then (DeepSpeed 0.19, stage_1_and_2): create it now, with the checkpoint's step, and link.
        keys = {k for parts in full.values() for k in parts} - {"fp32"}
        for flat in flats:
            state = zero.optimizer.state[flat]
            for k in keys:
                state.setdefault(k, torch.zeros_like(flat))
            state["step"] = _step_value(zero.optimizer, step)
        zero._lazy_init_hp_params_optimizer_state()
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            keys = ([legacy_name(name, ep_rank * experts_per_rank + j) for j in range(experts_per_rank)]
                    if is_stacked(name) else [to_global(name, ep_rank, experts_per_rank)])
            for key in keys:
                if key not in full:
                    raise ConfigError(f"--resume: the checkpoint has no optimizer state for {key}; pass "
                                      "--resume_weights_only to continue with fresh optimizer state")
            for k in full[keys[0]]:
                flat = torch.cat([full[key][k] for key in keys])
                if flat.numel() != p.numel():
                    raise ConfigError(f"--resume: {name} has {flat.numel()} elements in the checkpoint's "
                                      f"optimizer state, the model {p.numel()}")
                value = flat.view(p.shape).to(p.device)
                (safe_set_full_fp32_param(p, value) if k == "fp32"
                 else safe_set_full_optimizer_state(p, value, k))
    model_states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                              weights_only=False)
    if engine.lr_scheduler is not None and model_states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
        last = getattr(engine.lr_scheduler, "last_batch_iteration", None)
        if last is not None:  # set the optimizer's lr to the schedule's value at that step
            engine.lr_scheduler.step(last)
    engine.global_steps = model_states.get("global_steps", engine.global_steps)
    engine.global_samples = model_states.get("global_samples", engine.global_samples)
    engine.skipped_steps = model_states.get("skipped_steps", engine.skipped_steps)


def _step_value(optimizer, step):
    """The step in the form the optimizer keeps it: a float tensor for torch's Adam, an int for
    DeepSpeed's fused and CPU Adam."""
    value = float(step) if step is not None else 0.0
    return torch.tensor(value) if type(optimizer).__module__.startswith("torch.optim") else int(value)
