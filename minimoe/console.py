"""What a rank prints: the plan, one progress bar, the summary and real warnings. Messages of the libraries
that are known to be harmless in a minimoe run go to ``output_dir/logs/console-rank<N>.log`` instead, each
listed in ``KNOWN_NOISE`` with the reason it is harmless; anything not listed still reaches the terminal.

Installed once per process by the launchers' shared front (``cli.main``), before DeepSpeed is imported, so
DeepSpeed's logger binds to the filtered stream. The kept lines are written to the run's ``logs/`` folder
when the process ends, and only when the run created that folder (a run refused at validation leaves
nothing behind).
"""
from __future__ import annotations

import io
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Noise:
    pattern: str  # a regular expression searched in the line
    why: str      # why it is harmless here


KNOWN_NOISE = (
    Noise(r"Setting accelerator to CPU\. If you have GPU",
          "DeepSpeed found no GPU and runs on the CPU; the plan's 'world' line says where the run is"),
    Noise(r"Attempting to get learning rate from scheduler before it has started",
          "DeepSpeed reads the warm-up schedule's rate once while building each engine"),
    Noise(r"No existing process group found, creating a new group named: ep_size_",
          "DeepSpeed's MoE layer creates the expert-parallel groups the plan lists"),
    Noise(r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully",
          "DeepSpeed's CPU communication op loaded (built once into TORCH_EXTENSIONS_DIR)"),
    Noise(r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
          "DeepSpeed 0.19's ZeRO gathers call it; torch still runs it unchanged"),
    Noise(r"^(begin|end) bf16_optimizer$|^MA [\d.]+ GB +Max_MA|^CPU Virtual Memory: +used =",
          "DeepSpeed's bf16 optimizer prints the memory in use when it is built (the plan states the "
          "budget)"),
    Noise(r"Token indices sequence length is longer than the specified maximum sequence length",
          "documents are tokenised whole, then cut into pairs of at most --max_seq_length tokens"),
)
_NOISE = re.compile("|".join(f"(?:{n.pattern})" for n in KNOWN_NOISE))

_kept: list[str] = []
_installed = False


def is_noise(line: str) -> bool:
    return bool(_NOISE.search(line))


class _LineFilter(io.TextIOBase):
    """A text stream that holds each line until it ends and drops the known-noise ones (kept for the log)."""

    def __init__(self, stream):
        self._stream, self._pending = stream, ""

    def write(self, text: str) -> int:
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            if is_noise(line):
                _kept.append(line)
            else:
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and not is_noise(self._pending):  # a prompt or a line written in pieces
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, buffer...: the real stream's
        return getattr(self._stream, name)


def install() -> None:
    """Filter this process's stdout, Python warnings and the transformers logger (once)."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.stdout = _LineFilter(sys.stdout)
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if is_noise(text):
            _kept.append(text.rstrip("\n"))
        else:
            show(message, category, filename, lineno, file, line)
    warnings.showwarning = showwarning
    import logging

    class _Drop(logging.Filter):  # transformers' and DeepSpeed's loggers: records are filtered at the logger
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            if is_noise(text):
                _kept.append(f"[{record.name} {record.levelname}] {text}")
                return False
            return True
    for name in ("DeepSpeed", "transformers.tokenization_utils_base", "transformers"):
        logging.getLogger(name).addFilter(_Drop())


def save(output_dir: Optional[str]) -> Optional[str]:
    """Append the kept lines to ``output_dir/logs/console-rank<N>.log`` if the run created that folder."""
    if not _kept or not output_dir or not os.path.isdir(output_dir):
        return None
    rank = os.environ.get("RANK", "0")
    path = os.path.join(output_dir, "logs", f"console-rank{rank}.log")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as fh:
            fh.writelines(line + "\n" for line in _kept)
    except OSError:  # a full or read-only disk: these lines are not worth a failure
        return None
    _kept.clear()
    return path
