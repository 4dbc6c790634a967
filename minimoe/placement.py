"""Where the frozen teacher's weights live: a full copy on every rank, or ZeRO-3 partitions (1/N per
rank, gathered one layer at a time), optionally offloaded to host memory on GPU machines.

The choice is pure (``choose``): teacher bytes against the memory each rank has. What the choice
means for DeepSpeed (``apply``) and how a partitioned teacher is built without any rank ever holding
the whole of it (``partitioned_construction``, ``local_partition``) live here too; what the teacher
*is* (its layers, its checkpoint, its Q/K/V) lives in ``teacher.py``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

from .config import TEACHER_PLACEMENTS as PLACEMENTS, ConfigError

# auto keeps a replicated teacher to this share of a rank's memory: the rest is for the student, its
# optimizer and the activations. A partitioned teacher may take the same share, per rank.
TEACHER_SHARE = 0.3
GiB = 1024 ** 3


@dataclass(frozen=True)
class Placement:
    kind: str           # replicated | zero3 | zero3_offload
    reason: str         # one line: why (printed at start, recorded in run_config.json)

    @property
    def partitioned(self) -> bool:
        return self.kind != "replicated"

    def bytes_per_rank(self, teacher_bytes: int, world_size: int) -> dict:
        """Teacher bytes each rank keeps between forwards, on the device and in host memory."""
        if self.kind == "replicated":
            return {"device": teacher_bytes, "host": 0}
        share = -(-teacher_bytes // world_size)
        return {"device": 0, "host": share} if self.kind == "zero3_offload" else {"device": share, "host": 0}


def file_placement(ds: dict) -> Optional[str]:
    """The placement a teacher ds_config states, if it states a ZeRO stage at all."""
    zero = ds.get("zero_optimization", {})
    if "stage" not in zero:
        return None
    if zero["stage"] == 3:
        return "zero3_offload" if zero.get("offload_param", {}).get("device", "none") != "none" else "zero3"
    if zero["stage"] == 0:
        return "replicated"
    raise ConfigError(f"--teacher_ds_config: zero_optimization.stage {zero['stage']} is not an inference "
                      "placement; allowed 0 (replicated) or 3 (partitioned), or leave it out")


def choose(requested: str, from_file: Optional[str], teacher_bytes: int, world_size: int, accelerator: str,
           memory_per_rank: int, host_per_rank: int) -> Placement:
    """--teacher_placement -> a Placement. A value given on the command line wins; ``auto`` keeps the
    ds_config's stage when it states one, and otherwise chooses by size."""
    if requested not in PLACEMENTS:
        raise ConfigError(f"--teacher_placement {requested!r} is invalid: allowed {', '.join(PLACEMENTS)}")
    size = f"teacher {teacher_bytes / GiB:.2f} GiB"
    if requested == "zero3_offload" or (requested == "auto" and from_file == "zero3_offload"):
        if accelerator == "cpu":
            raise ConfigError("--teacher_placement zero3_offload moves a GPU teacher's partitions to host "
                              "memory; on a CPU-only machine they already live there: use zero3")
    if requested != "auto":
        return Placement(requested, f"--teacher_placement {requested} ({size}, {world_size} ranks)")
    if from_file:
        return Placement(from_file, f"auto: the teacher ds_config's ZeRO stage says {from_file} ({size})")
    budget = TEACHER_SHARE * memory_per_rank
    where = f"{TEACHER_SHARE:.0%} of the {memory_per_rank / GiB:.1f} GiB each rank has"
    if teacher_bytes <= budget:
        return Placement("replicated", f"auto: {size} fits in {where}: replicated (no gathers, fastest)")
    share = teacher_bytes / world_size
    if world_size > 1 and share <= budget:
        return Placement("zero3", f"auto: {size} is over {where}; 1/{world_size} of it fits: zero3")
    if accelerator != "cpu" and share <= TEACHER_SHARE * host_per_rank:
        return Placement("zero3_offload", f"auto: 1/{world_size} of the {size} is over {where}; it fits in "
                                          f"host memory ({host_per_rank / GiB:.1f} GiB per rank): "
                                          f"zero3_offload")
    raise ConfigError(f"the {size} does not fit: 1/{world_size} of it is {share / GiB:.2f} GiB per rank, "
                      f"over {where}; add ranks (more nodes) or use a smaller --teacher_layer / "
                      f"--teacher_precision")


def apply(ds: dict, placement: Placement) -> dict:
    """Write the placement into the teacher's ds_config (the file keeps every other DeepSpeed knob)."""
    zero = ds.setdefault("zero_optimization", {})
    if placement.kind == "replicated":
        ds["zero_optimization"] = {"stage": 0}
        return ds
    zero["stage"] = 3
    if placement.kind == "zero3_offload":
        offload = zero.setdefault("offload_param", {})
        if offload.get("device", "none") == "none":
            offload["device"] = "cpu"
        offload.setdefault("pin_memory", True)
        if offload["device"] == "nvme":
            raise ConfigError("--teacher_ds_config: offload_param to nvme is not supported for the teacher "
                              "yet; use device cpu")
    else:
        zero.pop("offload_param", None)
    return ds


def memory_per_rank(local_world_size: int) -> tuple[int, int]:
    """(accelerator memory per rank, host memory per rank) on this node. On CPU both are host memory
    shared by the node's ranks."""
    import os
    from deepspeed.accelerator import get_accelerator
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_world_size)
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return host, host
    return int(accel.total_memory(0)), host


@contextlib.contextmanager
def partitioned_construction(ds_config: dict):
    """Build a model whose parameters are ZeRO-3 partitions from the start, without any rank holding a
    whole weight: DeepSpeed's ``zero.Init`` broadcasts rank 0's freshly initialised values into a
    full-size buffer on every rank; ours come from the checkpoint right after, so each parameter is
    only partitioned (``transformers``' ``no_init_weights`` leaves the full-size buffers untouched,
    so they never become resident memory)."""
    import deepspeed
    from transformers.initialization import no_init_weights

    class _PartitionOnly(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    with no_init_weights(), _PartitionOnly(config_dict_or_path=ds_config):
        yield


def local_partition(param) -> tuple[object, int, int]:
    """(this rank's partition tensor, its first element in the flattened weight, elements it holds)."""
    from deepspeed import comm
    part = param.ds_tensor
    start = part.ds_numel * comm.get_rank(group=param.ds_process_group)
    return part, start, max(0, min(part.ds_numel, param.ds_numel - start))
