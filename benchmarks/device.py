"""The device a benchmark measures on: the CPU (the default, where every committed number comes from) or
CUDA (``--device cuda``, what ``make gpu-check`` runs). On CUDA a timing waits for the device's queued
work (``clock``), and memory is torch's peak of allocated device memory (``peak_device_mib``).

``--check True`` (``--check`` for argparse scripts) validates a benchmark's flags and exits before any
measurement, even for ``--device cuda`` on a machine without CUDA: how ``make gpu-check`` makes sure,
where no GPU is lent, that every step it would run still resolves.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch

DEVICES = ("cpu", "cuda")


def refuse(message: str) -> None:
    """Bad input: one line on stderr, exit 2 (the house rule, minimoe.errors)."""
    print(message, file=sys.stderr)
    sys.exit(2)


def check_device(device: str, check: bool = False, procs: int = 1) -> str:
    """``device`` validated; with ``check`` only its name (no device is needed to check flags)."""
    if device not in DEVICES:
        refuse(f"--device {device!r} is invalid: choose {' or '.join(DEVICES)}")
    if device == "cuda" and not check:
        if not torch.cuda.is_available():
            refuse("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
        if procs > torch.cuda.device_count():
            refuse(f"{procs} processes on --device cuda need {procs} GPUs; this machine has "
                   f"{torch.cuda.device_count()}")
    return device


def use_accelerator(device: str) -> None:
    """Point DeepSpeed at ``device`` for this process and its children, before its accelerator is first
    asked for (the scripts default it to the CPU at import)."""
    os.environ["DS_ACCELERATOR"] = device


def clock(device: str) -> float:
    """``time.perf_counter()`` once the device has finished what was queued: CUDA kernels run
    asynchronously, so an unsynchronised timestamp measures the launch, not the work."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_device_mib(device: str) -> Optional[float]:
    """Peak device memory torch allocated in this process (MiB); None on the CPU (see peak RSS)."""
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None


def describe(device: str, threads: int) -> str:
    """What the numbers ran on, for titles: the GPU's name, or the CPU threads."""
    return torch.cuda.get_device_name() if device == "cuda" else f"{threads} CPU threads"
