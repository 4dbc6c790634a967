"""One error path for every launcher and every rank: whatever stops a run ends in one line on stderr that
names the culprit and what to do, an exit code that says whose fault it was (2: the user's input,
1: the environment: files, disk, a peer rank), and the full traceback in a log file, not on the terminal.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
import time
import traceback
from typing import Optional

from . import shm
from .config import ConfigError

USER_ERROR, ENVIRONMENT_FAILURE = 2, 1


class UnreadableFile(Exception):
    """A file that exists but cannot be read as what it should be: truncated, corrupt, not UTF-8. The
    flags are fine, the file is not (exit 1); the message names the file and what to do."""


class CheckFailed(Exception):
    """Work that ran to its end but whose result failed its own check (an exported graph that does not
    reproduce the model): exit 1, the line says by how much and what was kept."""


class Unavailable(Exception):
    """Something the work needs could not be fetched (no network, no package index): exit 1; the line
    names it, what the fetcher said, and what to do."""


class PeerFailed(Exception):
    """Raised on the ranks whose partner in a collective failed with an error that the partner reports
    itself: these ranks stop with its exit code and print nothing, so the cause is the line one reads."""

    def __init__(self, rank: Optional[int], code: int):
        who = f"rank {rank}" if rank is not None else "another rank"
        super().__init__(f"{who} failed (exit code {code}); its own line says why")
        self.rank, self.code = rank, code


class Stopped(Exception):
    """The run stopped on purpose, cleanly: a stop signal (SIGTERM, SIGUSR1: what a scheduler sends before
    preemption) after a committed checkpoint, or Ctrl-C. Rank 0 says it in one line (no "error"), every
    rank exits with ``code`` (128 + the signal, the shell's convention)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class ChildFailed(Exception):
    """A child process (one run of a sweep) failed and printed its own line; this one says which run,
    and the sweep exits with the child's code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code if code in (USER_ERROR, ENVIRONMENT_FAILURE) else ENVIRONMENT_FAILURE


def torch_zip_file(path: str, fix: str = "") -> bool:
    """Whether ``path`` is in torch's zip format (pre-1.6 files are pickles); a zip whose directory, kept at
    its end, is gone (a truncated copy or download) raises ``UnreadableFile``, naming it and what to do."""
    import zipfile
    with open(path, "rb") as fh:
        zip_format = fh.read(4) == b"PK\x03\x04"
    if zip_format and not zipfile.is_zipfile(path):
        raise UnreadableFile(f"{path!r} is truncated or corrupt (a zip archive without its directory){fix}")
    return zip_format


@contextlib.contextmanager
def reading(path: str, fix: str = ""):
    """Turn whatever a reader raises on a damaged file (a decode error, a truncated zip or pickle, a bad
    safetensors or parquet footer) into one ``UnreadableFile`` line naming ``path``; ``fix`` says what to
    do about it."""
    try:
        yield
    except (ConfigError, UnreadableFile, MemoryError):
        raise
    except UnicodeDecodeError as e:
        raise UnreadableFile(f"{path!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x})"
                             f"{fix or '; save it as UTF-8'}") from e
    except Exception as e:  # noqa: BLE001 - each reader (torch, pickle, arrow, safetensors) has its own types
        # An OSError without errno is a format's complaint, not the system's: gzip's "Not a gzipped file",
        # bz2's "Invalid data stream".
        if isinstance(e, OSError) and e.errno is not None:
            if e.errno in (errno.ENOENT, errno.EACCES, errno.EIO):
                raise UnreadableFile(f"cannot read {path!r}: {e.strerror}{fix}") from e
            raise
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UnreadableFile(f"{path!r} is truncated or corrupt ({first}){fix}") from e

# What gloo / NCCL / the TCP store say when the rank at the other end is gone.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
              "NCCL communicator was aborted", "Socket Timeout", "recvValue failed", "Stop_waiting response")
_RESUME = "continue with --resume from the last checkpoint"
_FREE_SPACE = ("free space (or choose another --output_dir) and run again; --resume continues from the last "
               "complete checkpoint")


def _cache_folders() -> list[tuple[str, str]]:
    """(folder, what it is and the variable that moves it) for the caches a run writes besides its output
    folder: a read-only one must be named with that variable, not blamed on --output_dir."""
    home = os.path.expanduser("~")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    from .data.assets import default_cache_dir
    return [
        (os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(cache, "torch_extensions"),
         "where DeepSpeed compiles its ops: set TORCH_EXTENSIONS_DIR to a writable folder"),
        (default_cache_dir(""),
         "minimoe's corpus cache: set MINIMOE_CACHE (or --cache_dir) to a writable folder"),
        (os.environ.get("HF_HOME") or os.path.join(cache, "huggingface"),
         "the Hugging Face cache: set HF_HOME to a writable folder"),
        (os.environ.get("TRITON_CACHE_DIR") or os.path.join(home, ".triton"),
         "triton's cache: set TRITON_CACHE_DIR to a writable folder"),
        (cache,
         "the cache folder of torch, Hugging Face and minimoe: set XDG_CACHE_HOME to a writable folder"),
    ]


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _unwritable(exc: OSError, output_dir: Optional[str]) -> str:
    """The line for a folder the run may not write: the setting that chose that folder, which is
    --output_dir only when the folder is in it."""
    where = f" {exc.filename!r}" if exc.filename else ""
    head = f"cannot write{where}: {exc.strerror}"
    if not exc.filename or (output_dir and _under(exc.filename, output_dir)):
        return f"{head}; choose a writable --output_dir"
    known = [(folder, how) for folder, how in _cache_folders() if _under(exc.filename, folder)]
    if known:
        folder, how = max(known, key=lambda k: len(os.path.realpath(k[0])))  # the most specific
        if os.path.realpath(folder) == os.path.realpath(exc.filename):
            return f"{head}; that is {how}"
        return f"{head}; it is in {folder!r}, {how}"
    if output_dir:
        return f"{head}; it is outside --output_dir {output_dir!r}: make that folder writable"
    return f"{head}; choose a writable --output_dir"


def classify(exc: BaseException, output_dir: Optional[str] = None) -> tuple[int, str]:
    """(exit code, one line) for an exception that stopped a run (``output_dir``: the run's folder, to
    tell a folder it may not write from the caches it writes elsewhere)."""
    if isinstance(exc, ConfigError):
        return USER_ERROR, str(exc)
    if isinstance(exc, (UnreadableFile, CheckFailed, Unavailable)):
        return ENVIRONMENT_FAILURE, str(exc)
    if isinstance(exc, PeerFailed):
        return exc.code, ""
    if isinstance(exc, Stopped):
        return exc.code, str(exc)
    if isinstance(exc, ChildFailed):
        return exc.code, str(exc)
    if isinstance(exc, OSError):
        where = f" {exc.filename!r}" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return ENVIRONMENT_FAILURE, f"no space left on device writing{where}: {_FREE_SPACE}"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return ENVIRONMENT_FAILURE, _unwritable(exc, output_dir)
        return ENVIRONMENT_FAILURE, f"{exc.strerror or exc}{where}"
    text = str(exc)
    if "No space left on device" in text or "file write failed" in text:  # torch.save wraps ENOSPC this way
        return ENVIRONMENT_FAILURE, f"no space left on device while saving: {_FREE_SPACE}"
    if peer_lost(exc):
        return ENVIRONMENT_FAILURE, f"another rank of this job stopped; {_RESUME}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return ENVIRONMENT_FAILURE, f"internal error: {type(exc).__name__}: {first}"


def peer_lost(exc: BaseException) -> bool:
    return type(exc).__name__ == "DistBackendError" or any(m in str(exc) for m in _PEER_LOST)


def write_traceback(exc: BaseException, output_dir: Optional[str], rank: int) -> str:
    """The full traceback into ``output_dir/logs/`` when that folder exists (a run never creates its
    output folder just to report that it could not start), else into the temp folder."""
    if output_dir and os.path.isdir(output_dir):
        folder = os.path.join(output_dir, "logs")
    else:
        folder = tempfile.gettempdir()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for where in (folder, tempfile.gettempdir()):
        path = os.path.join(where, f"minimoe-error-rank{rank}-{os.getpid()}.log")
        try:
            os.makedirs(where, exist_ok=True)
            with open(path, "w") as fh:
                fh.write(text)
            return path
        except OSError:  # a full or read-only disk: try the temp folder, then give up quietly
            continue
    return ""


def report(exc: BaseException, output_dir: Optional[str], debug: bool) -> int:
    """Print the one line (on the rank that should say it) and return the exit code.

    Who says it: before the process group starts every rank does the same work and meets the same
    error, so rank 0 speaks for all; after it, user errors are raised on every rank (``agree``) and rank
    0 says them, and any other failure is said by the rank that met it (its partners in a collective
    stop with ``PeerFailed`` and stay quiet)."""
    code, line = classify(exc, output_dir)
    rank = int(os.environ.get("RANK", "0"))
    if isinstance(exc, PeerFailed):
        return _quietly(code)
    if isinstance(exc, Stopped):  # every rank stopped at the same step, on purpose: rank 0 says so
        if rank == 0:
            _close_progress_bars()
            print(line, file=sys.stderr)
        return code
    if code == USER_ERROR or not _process_group_started():
        if rank != 0:
            return _quietly(code)
    if peer_lost(exc):
        shm.unlink_job_buffers()
        line = peer_lost_line(output_dir)
    _close_progress_bars()
    if isinstance(exc, ChildFailed):  # the child's own line, just above, is the error
        print(f"stopped: {line}", file=sys.stderr)
        return code
    if code == USER_ERROR:
        print(f"error: {line}", file=sys.stderr)
        return code
    log = write_traceback(exc, output_dir, rank)
    if not _first_to_report(output_dir, rank, line):
        return code
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    several = os.environ.get("WORLD_SIZE", "1") != "1" and _process_group_started()
    prefix = f"error (rank {rank})" if several else "error"
    print(f"{prefix}: {line}" + (f" [traceback: {log}]" if log and not debug else ""), file=sys.stderr)
    return code


# How long a rank that leaves the line to another waits before it exits: the deepspeed launcher and torchrun
# kill every rank as soon as one exits with an error, so a quiet rank that is quicker than the speaking one
# (both meet the same bad input at once) would end the job before its line is printed. The speaking rank
# ends the job when it exits, so this wait is cut short in every launcher but a plain spawn.
QUIET_RANK_GRACE_S = 3.0


def _quietly(code: int) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(QUIET_RANK_GRACE_S)
    return code


def _first_to_report(output_dir: Optional[str], rank: int, line: str) -> bool:
    """The first rank of a job to fail claims the terminal by creating the job's failure record in the
    (shared) output folder; partners that fail after it (a lost connection, the same full disk) keep to
    their log files, so the line one reads is the cause. With no output folder yet, every rank speaks."""
    job = os.environ.get("MINIMOE_JOB_ID")
    if not job or not output_dir or not os.path.isdir(output_dir):
        return True
    path = os.path.join(output_dir, "logs", f"failure-{job}.txt")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    except OSError:  # a full or read-only disk: speak rather than stay silent
        return True
    try:
        os.write(fd, f"rank {rank}: {line}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)
    return True


def _close_progress_bars() -> None:
    """A progress bar left open redraws itself at exit, after (and over) the error line."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()


def _process_group_started() -> bool:
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------- ranks that die in native code

NATIVE_LOG = "native-rank{rank}-{job}.log"


def arm_native_crash_log(output_dir: str, rank: int) -> Optional[str]:
    """A rank that dies in native code (gloo's ``terminate`` on a collective mismatch, a segfault) runs
    no Python handler: the runtime prints its own error, and ``faulthandler`` writes every thread's
    Python stack into ``output_dir/logs/native-rank<R>-<job>.log``, so the partners that lose it can
    say who died and where its stack is. The file is removed at a normal exit when nothing was written."""
    import atexit
    import faulthandler
    job = os.environ.get("MINIMOE_JOB_ID", "nojob")
    path = os.path.join(output_dir, "logs", NATIVE_LOG.format(rank=rank, job=job))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fh = open(path, "w")
    except OSError:  # a read-only or full disk: the run's own checks say so where it matters
        return None
    faulthandler.enable(file=fh, all_threads=True)

    def disarm():
        faulthandler.disable()
        fh.close()
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == 0:
                os.unlink(path)
                os.rmdir(os.path.dirname(path))  # only when empty: a run that went well leaves no logs/

    atexit.register(disarm)
    return path


def peer_lost_line(output_dir: Optional[str]) -> str:
    """What a rank whose partner vanished can say: which rank crashed in native code and where its
    stack is, or that it stopped without a word (killed from outside). Never a log that does not exist."""
    job = os.environ.get("MINIMOE_JOB_ID")
    crashed = []
    if job and output_dir and os.path.isdir(os.path.join(output_dir, "logs")):
        import glob
        import re
        for path in sorted(glob.glob(os.path.join(output_dir, "logs", NATIVE_LOG.format(rank="*", job=job)))):
            with contextlib.suppress(OSError):
                if os.path.getsize(path) > 0:
                    crashed.append((int(re.search(r"native-rank(\d+)-", path).group(1)), path))
    if crashed:
        rank, path = crashed[0]
        return (f"rank {rank} crashed in native code (its runtime error is printed above; its Python stack "
                f"is in {path}); {_RESUME}")
    return (f"another rank of this job stopped without reporting why (killed from outside: out of memory, "
            f"the scheduler or kill -9?); {_RESUME}")
