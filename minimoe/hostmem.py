"""Give the memory of a partitioned teacher's gathered layers back to the system on CPU.

ZeRO-3 gathers each teacher layer before it runs and frees the gathered weights after. On a CPU host those
weights live in the process's heap, and glibc's malloc keeps what it freed (its mmap threshold adapts upward
to the sizes freed, up to 32 MiB, so a layer's weights come from the heap, not from mmap): a rank's resident
memory grows to the whole gathered teacher and stays there, and ZeRO-3's 1/N saves memory only at load
(BERT-large over 2 ranks: steady 2,655 MiB a rank against 638 kept). ``malloc_trim(0)`` after each layer
returns the freed pages at once (glibc >= 2.8 releases free pages inside the heap, not only its top).

jemalloc or tcmalloc (``LD_PRELOAD``, as the CPU Docker image does) return freed memory themselves: then
nothing is called. On GPUs the gathers live in device memory and nothing is called either.
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Callable, Optional

from torch import nn

OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@functools.lru_cache(maxsize=None)
def glibc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim`` when glibc's malloc is the process's allocator; None otherwise."""
    if any(name in os.environ.get("LD_PRELOAD", "") for name in OTHER_ALLOCATORS):
        return None
    try:
        libc = ctypes.CDLL(None)
        trim, version = libc.malloc_trim, libc.gnu_get_libc_version  # glibc only (not musl, not macOS)
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_gathers_after_each(layers: nn.ModuleList) -> list:
    """Trim glibc's heap after each of ``layers`` runs (a forward hook registered after DeepSpeed's, so the
    layer's gathered weights are already freed). Returns the hook handles; none where nothing is needed."""
    trim = glibc_trim()
    if trim is None:
        return []

    def hook(module, inputs, output) -> None:  # returns nothing: a hook's return value replaces the output
        trim(0)
    return [layer.register_forward_hook(hook) for layer in layers]
