"""Read a Hugging Face checkpoint lazily: any tensor, or any flat range of one, without loading the rest.

This is what lets a ZeRO-3 teacher load with memory that scales with 1/N: each rank reads only the
bytes of its own partition of each weight, straight into the partition. Safetensors files
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``: the hub's standard) are
read with plain positioned reads at the offsets their header gives, not memory-mapped, so no file
pages stay mapped and counted against the process. Torch ``pytorch_model.bin`` files (sharded too)
are opened with ``mmap=True`` and sliced, which reads on demand as well.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .config import ConfigError
from .errors import UnreadableFile, reading, torch_zip_file

_REFETCH = "; download or copy the model again"

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


def checkpoint_files(folder: str) -> dict[str, str]:
    """{tensor name: file} of the checkpoint in ``folder``; safetensors preferred, as transformers does."""
    for index, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as fh:
                weight_map = json.load(fh).get("weight_map") or {}
            return {k: os.path.join(folder, f) for k, f in weight_map.items()}
        if os.path.isfile(os.path.join(folder, single)):
            return {k: os.path.join(folder, single) for k in _keys_of(os.path.join(folder, single))}
    raise ConfigError(f"{folder!r} holds no model weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, "
                      f"{BIN_SINGLE} or {BIN_INDEX}")


def check_files(folder: str) -> None:
    """Every weight file of ``folder`` is whole: safetensors headers read and their sizes checked (a few
    KiB of reads), so a truncated download stops the run before any process group, on one line."""
    for path in sorted(set(checkpoint_files(folder).values())):
        if path.endswith(".safetensors"):
            _SafetensorsFile(path)
        else:
            _load_bin(path)  # memory-mapped: reads the pickle, not the tensors


def local_folder(name: str) -> str:
    """A local folder for a local path or a hub name (downloaded once into the HF cache, weights included)."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name,
                                 allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"])
    except Exception as e:  # the hub's errors are many; the message is what the user needs
        raise ConfigError(f"--teacher {name!r}: cannot fetch its weights: {str(e).splitlines()[0]}")


def _keys_of(path: str) -> list[str]:
    if path.endswith(".safetensors"):
        return list(_SafetensorsFile(path).entries)
    return list(_load_bin(path))


# safetensors dtype names -> torch dtypes (the format's spec: https://github.com/huggingface/safetensors)
_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool}


class _SafetensorsFile:
    """One safetensors file: an 8-byte little-endian header size, a JSON header giving each tensor's
    dtype, shape and byte range, then the raw bytes. Ranges are read with ``os.pread``."""

    def __init__(self, path: str):
        self.path = path
        with reading(path, _REFETCH):
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if size > os.fstat(fh.fileno()).st_size:
                    raise ValueError(f"its header claims {size} bytes, more than the file holds")
                header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        self.entries = header
        end = self.data_start + max((e["data_offsets"][1] for e in header.values()), default=0)
        if os.path.getsize(path) < end:  # every rank sees this at open, before reading its own slices
            raise UnreadableFile(f"{path!r} is truncated: it holds {os.path.getsize(path)} bytes, its header "
                                 f"describes {end}{_REFETCH}")
        self.fd: Optional[int] = None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Elements ``[start, start + out.numel())`` of the flattened tensor into the 1-D ``out``."""
        entry = self.entries[key]
        dtype = _SAFE_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ConfigError(f"{self.path!r}: {key} has dtype {entry['dtype']}, which minimoe cannot read")
        buf = out if out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu" else \
            torch.empty(out.numel(), dtype=dtype)
        view = memoryview(buf.view(torch.uint8).numpy())
        itemsize = buf.element_size()
        offset = self.data_start + entry["data_offsets"][0] + start * itemsize
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise UnreadableFile(f"{self.path!r} is truncated: {key} ends past the end of the "
                                     f"file{_REFETCH}")
            done += n
        if buf is not out:
            out.copy_(buf)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _load_bin(path: str) -> dict:
    if not torch_zip_file(path, _REFETCH):  # pre-1.6 torch files are pickles: they cannot be memory-mapped
        raise ConfigError(f"{path!r} cannot be read lazily (not a zip-format torch file); re-save it with "
                          "save_pretrained (safetensors)")
    with reading(path, _REFETCH):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class LazyCheckpoint:
    """Tensors of one checkpoint folder, read on demand. Use as a context manager (closes the files)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files = checkpoint_files(folder)
        self._open: dict[str, object] = {}

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._open.values():
            if isinstance(handle, _SafetensorsFile):
                handle.close()
        self._open.clear()  # memory-mapped torch state dicts unmap when dropped

    def keys(self) -> list[str]:
        return list(self.files)

    def _handle(self, key: str):
        path = self.files[key]
        if path not in self._open:
            self._open[path] = _SafetensorsFile(path) if path.endswith(".safetensors") else _load_bin(path)
        return self._open[path]

    def shape(self, key: str) -> tuple[int, ...]:
        h = self._handle(key)
        return tuple(h[key].shape) if isinstance(h, dict) else h.shape(key)

    def read_into(self, key: str, out: torch.Tensor, start: int = 0) -> None:
        """Elements ``[start, start + out.numel())`` of the flattened tensor ``key`` into ``out``
        (converted to its dtype). Only those bytes are read."""
        h = self._handle(key)
        flat = out.view(-1)
        if isinstance(h, dict):  # a memory-mapped torch state dict: a slice touches only its pages
            flat.copy_(h[key].reshape(-1)[start:start + flat.numel()])
        else:
            h.read_into(key, start, flat)
