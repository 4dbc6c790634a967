"""The two DeepSpeed engines: the student (ZeRO-1/2 + MoE parameter groups, optimizer, schedule) and
the teacher (ZeRO-3 inference, no optimizer), and the one documented merge of a ds_config file with
command-line values.

Merge rule: a flag given on the command line (``--micro_batch_size``, ``--grad_accum``, ``--lr``,
``--weight_decay``, ``--gradient_clipping``, ``--precision``) wins over the file; a flag left out
keeps the file's value. Values the run derives (``train_batch_size``, the schedule's step counts,
``warmup_max_lr``) may be written as ``"auto"`` in the file and are filled in here.
"""
from __future__ import annotations

import copy
import math

import torch

from .config import ConfigError, DistillConfig, TrainConfig, load_json

DEFAULT_MICRO_BATCH = 32
PAPER_GRAD_CLIP = 5.0


def _precision(ds: dict, precision: str, accelerator: str, what: str) -> str:
    if precision == "mixed":
        # the paper trains with fp16 autocast; bf16 where the GPU has it is the safer half
        precision = "fp32" if accelerator == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision != "auto":
        ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
        ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
    bf16 = ds.get("bf16", {}).get("enabled", False)
    fp16 = ds.get("fp16", {}).get("enabled", False)
    if bf16 and fp16:
        raise ConfigError(f"{what} enables both bf16 and fp16; enable one (or pass --precision)")
    if fp16 and accelerator == "cpu":
        raise ConfigError(f"{what}: fp16 is not supported on CPU; use --precision bf16 or fp32")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def dtype_of(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def student_ds_config(cfg: TrainConfig, world_size: int, accelerator: str) -> dict:
    """Load, merge and validate the trained model's ds_config (the schedule's autos: ``fill_schedule``;
    the stage against the experts: ``layout.plan_layout``)."""
    ds = copy.deepcopy(load_json(cfg.ds_config, "--ds_config"))
    what = f"--ds_config {cfg.ds_config}"
    check_shapes(ds, what)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{what}: zero_optimization.stage {stage} is invalid; allowed 0, 1, 2")
    precision = _precision(ds, cfg.precision, accelerator, what)

    micro = (cfg.micro_batch_size or _int_or_none(ds.get("train_micro_batch_size_per_gpu"))
             or DEFAULT_MICRO_BATCH)
    accum = cfg.grad_accum or _int_or_none(ds.get("gradient_accumulation_steps")) or 1
    if cfg.global_batch:
        accum, rest = divmod(cfg.global_batch, micro * world_size)
        if rest or not accum:
            raise ConfigError(f"--global_batch {cfg.global_batch} is not a multiple of micro batch x ranks = "
                              f"{micro} x {world_size}; choose a multiple, or set --micro_batch_size")
    stated = ds.get("train_batch_size", "auto")
    if stated != "auto" and stated != micro * accum * world_size:
        raise ConfigError(f"{what}: train_batch_size {stated} is not micro batch x grad accum x ranks = "
                          f"{micro} x {accum} x {world_size}; write \"auto\" (or leave it out) and minimoe "
                          "derives it")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * world_size

    opt = ds.get("optimizer")
    if not opt or "type" not in opt:
        raise ConfigError(f"{what} has no optimizer block; the student needs one "
                          "(see ds_configs/zero2_moe.json)")
    params = opt.setdefault("params", {})
    if cfg.lr is not None:
        params["lr"] = cfg.lr
    if cfg.weight_decay is not None:
        params["weight_decay"] = cfg.weight_decay
    if accelerator == "cpu" and opt["type"].lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)  # FusedAdam is a GPU kernel; on CPU it only JIT-compiles
        # torch's fused CPU kernel: one vectorised pass per flat ZeRO partition instead of a chain of
        # elementwise ops (7-9x faster on 48M parameters, equal within fp32 rounding).
        params.setdefault("fused", True)
    if cfg.gradient_clipping is not None:
        ds["gradient_clipping"] = cfg.gradient_clipping
    ds.setdefault("gradient_clipping", PAPER_GRAD_CLIP)  # DeepSpeed's silent default would be 1.0

    # Validate now, schedule filled with a stand-in length: a leftover "auto" or a key DeepSpeed does not
    # know fails before any work.
    check_deepspeed_keys(fill_schedule(copy.deepcopy(ds), cfg, 1), what, cfg.strict_ds_config)
    ds["_minimoe_precision"] = precision
    return ds


def fill_schedule(ds: dict, cfg: TrainConfig, total_steps: int) -> dict:
    """Fill the scheduler's ``"auto"`` step counts and peak lr from the run, then reject other autos."""
    sched = ds.get("scheduler")
    if sched is not None:
        sp = sched.setdefault("params", {})
        _fill_auto(sp, "total_num_steps", total_steps)
        _fill_auto(sp, "warmup_num_steps", max(1, math.ceil(cfg.warmup_ratio * total_steps)))
        _fill_auto(sp, "warmup_max_lr", ds["optimizer"]["params"].get("lr"))
        if cfg.lr is not None and "warmup_max_lr" in sp:
            sp["warmup_max_lr"] = cfg.lr
    _reject_auto(ds, f"--ds_config {cfg.ds_config}")
    return ds


def teacher_ds_config(cfg: DistillConfig, world_size: int, micro_batch: int, accelerator: str,
                      layer_params: int) -> dict:
    """Load and validate the teacher's inference config: no optimizer, batch sizes from the student,
    precision from --teacher_precision (auto: the student's). The ZeRO stage is the placement's.

    ZeRO-3 knobs written as ``"auto"`` are sized by the teacher's layer (``layer_params`` weights):
    ``stage3_max_live_parameters`` two layers, ``stage3_prefetch_bucket_size`` one. DeepSpeed's defaults
    (1e9 and 5e7) are sized for training huge models; under them a teacher below a billion weights is
    gathered almost whole at the start of every forward (measured: 90% of BERT-large per rank at N=2),
    which undoes the partitioning."""
    ds = copy.deepcopy(load_json(cfg.teacher_ds_config, "--teacher_ds_config"))
    what = f"--teacher_ds_config {cfg.teacher_ds_config}"
    check_shapes(ds, what)
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{what}: the teacher is frozen; remove its optimizer/scheduler blocks")
    precision = cfg.precision if cfg.teacher_precision == "auto" else cfg.teacher_precision
    precision = _precision(ds, precision, accelerator, what)
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch * world_size
    zero = ds.get("zero_optimization", {})
    _fill_auto(zero, "stage3_max_live_parameters", 2 * layer_params, if_missing=False)
    _fill_auto(zero, "stage3_prefetch_bucket_size", layer_params, if_missing=False)
    _reject_auto(ds, what)
    with_stage = copy.deepcopy(ds)  # the knobs are checked as ZeRO-3 knobs, whatever the placement
    with_stage.setdefault("zero_optimization", {}).setdefault("stage", 3)
    check_deepspeed_keys(with_stage, what, cfg.strict_ds_config)
    ds["_minimoe_precision"] = precision
    return ds


_BLOCKS = ("zero_optimization", "optimizer", "scheduler", "bf16", "fp16")
_POSITIVE_INTS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_shapes(ds: dict, what: str) -> None:
    """The shapes and types DeepSpeed assumes without checking (it would fail deep inside the engine, or
    at the first step, or quietly use another value): blocks are objects, batch sizes positive integers,
    numbers numbers, optimizer and scheduler types ones DeepSpeed can build."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES
    for key in _BLOCKS:
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{what}: {key!r} must be a JSON object ({{...}}), got {ds[key]!r}")
    for key in _POSITIVE_INTS:
        v = ds.get(key, "auto")
        if v != "auto" and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ConfigError(f"{what}: {key} {v!r} is invalid: a positive integer or \"auto\"")
    clip = ds.get("gradient_clipping", 0.0)
    if not _number(clip) or clip < 0:
        raise ConfigError(f"{what}: gradient_clipping {clip!r} is invalid: a number >= 0")
    for block, known, source in (("optimizer", DEEPSPEED_OPTIMIZERS, torch.optim),
                                 ("scheduler", VALID_LR_SCHEDULES, torch.optim.lr_scheduler)):
        spec = ds.get(block)
        if spec is None:
            continue
        if not isinstance(spec.get("params", {}), dict):
            raise ConfigError(f"{what}: {block}.params must be a JSON object, got {spec['params']!r}")
        kind = spec.get("type")
        if kind is not None and (not isinstance(kind, str) or
                                 (kind.lower() not in known and kind not in known
                                  and not hasattr(source, kind))):
            raise ConfigError(f"{what}: {block}.type {kind!r} is not one DeepSpeed can build; allowed "
                              f"{', '.join(sorted(known))} or a "
                              f"torch.{source.__name__.split('.', 1)[1]} class")
    params = (ds.get("optimizer") or {}).get("params", {})
    for key in ("lr", "eps", "weight_decay"):
        if key in params and params[key] != "auto" and (not _number(params[key]) or params[key] < 0):
            raise ConfigError(f"{what}: optimizer.params.{key} {params[key]!r} is invalid: a number >= 0")
    betas = params.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{what}: optimizer.params.betas {betas!r} is invalid: two numbers in [0, 1)")


def check_deepspeed_keys(ds: dict, what: str, strict: bool) -> None:
    """Let DeepSpeed's own parser read the merged config (it needs no process group): its blocks reject
    unknown nested keys, and a top-level key it never reads is unknown to it, most likely misspelt
    (``gradient_clipingg``), which DeepSpeed itself would ignore without a word. Keys starting with
    ``_`` are comments."""
    import difflib
    import warnings
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    class Recording(dict):
        def __init__(self, d):
            super().__init__(d)
            self.read = set()

        def get(self, key, *default):
            self.read.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            self.read.add(key)
            return super().__contains__(key)

    # train_batch_size is ours (micro x accum x world); without a process group DeepSpeed would check it
    # against a world of one, so it is left for DeepSpeed to derive here.
    recorded = Recording({k: v for k, v in ds.items() if not k.startswith("_") and k != "train_batch_size"})
    try:
        DeepSpeedConfig(recorded)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"{what}: {e.title} {where}: {err['msg']} (input {err.get('input')!r})")
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{what}: DeepSpeed rejects it: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    recorded.read.add("train_batch_size")
    for key in sorted(set(recorded) - recorded.read):
        close = difflib.get_close_matches(key, sorted(recorded.read), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"{what}: {key!r} is not a DeepSpeed setting (DeepSpeed never reads it){hint}"
        if strict:
            raise ConfigError(message + " Fix it, or pass --strict_ds_config False to only warn")
        warnings.warn(message, stacklevel=2)


def _int_or_none(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _fill_auto(d: dict, key: str, value, if_missing: bool = True) -> None:
    """Fill ``key`` when it says "auto" (and, with ``if_missing``, when it is absent)."""
    if d.get(key, "auto" if if_missing else None) == "auto":
        d[key] = value


def _reject_auto(d, what: str, path: str = "") -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            _reject_auto(v, what, f"{path}.{k}" if path else k)
    elif d == "auto":
        raise ConfigError(f"{what}: {path} is 'auto' but minimoe does not derive it; give a value")


def pop_precision(ds: dict) -> str:
    return ds.pop("_minimoe_precision")


def zero_stage(ds: dict) -> int:
    return ds.get("zero_optimization", {}).get("stage", 0)


def optimizer_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm; experts split into their own groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # stacked experts' biases are [E, F]: 2-D, still biases
            (no_decay if p.ndim < 2 or name.endswith("_bias") else decay).append(p)
    groups = [{"name": "decay", "params": decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_student_engine(model: torch.nn.Module, ds_config: dict, what: str = "--ds_config"):
    """The DeepSpeed engine. What ``check_shapes`` cannot see before (an optimizer argument its class does
    not take: ``"lrr"``) DeepSpeed finds here, with a TypeError or an assertion: said as the config's
    fault."""
    import deepspeed
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model),
                                               config=ds_config)
    except (TypeError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what}: DeepSpeed cannot build the engine from it: {first}") from e
    return engine
