"""One error path for every launcher and every rank: whatever stops a run ends in one line on stderr that
names the culprit and what to do, an exit code that says whose fault it was (2: the user's input,
1: the environment: files, disk, a peer rank), and the full traceback in a log file, not on the terminal.
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile
import traceback
from typing import Optional

from .config import ConfigError

USER_ERROR, ENVIRONMENT_FAILURE = 2, 1

# What gloo / NCCL / the TCP store say when the rank at the other end is gone.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
              "NCCL communicator was aborted", "Socket Timeout", "recvValue failed", "Stop_waiting response")


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception that stopped a run."""
    if isinstance(exc, ConfigError):
        return USER_ERROR, str(exc)
    if isinstance(exc, OSError):
        where = f" {exc.filename!r}" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return ENVIRONMENT_FAILURE, (f"no space left on device writing{where}: free space (or choose another "
                                         "--output_dir), then continue with --resume")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return ENVIRONMENT_FAILURE, f"cannot write{where}: {exc.strerror}; choose a writable --output_dir"
        return ENVIRONMENT_FAILURE, f"{exc.strerror or exc}{where}"
    text = str(exc)
    if "No space left on device" in text or "file write failed" in text:  # torch.save wraps ENOSPC this way
        return ENVIRONMENT_FAILURE, ("no space left on device while saving: free space (or choose another "
                                     "--output_dir), then continue with --resume")
    if peer_lost(exc):
        return ENVIRONMENT_FAILURE, ("another rank of this job stopped (it failed or was killed: its own log "
                                     "says why); continue with --resume from the last checkpoint")
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
    """Print the one line (on the rank that should say it) and return the exit code."""
    code, line = classify(exc)
    rank = int(os.environ.get("RANK", "0"))
    if code == USER_ERROR:
        # Every rank validates the same input and raises the same error: rank 0 says it.
        if rank == 0:
            print(f"error: {line}", file=sys.stderr)
        return code
    if peer_lost(exc):
        from .distributed import unlink_job_shm_buffers
        unlink_job_shm_buffers()
    log = write_traceback(exc, output_dir, rank)
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    prefix = f"error (rank {rank})" if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else "error"
    print(f"{prefix}: {line}" + (f" [traceback: {log}]" if log and not debug else ""), file=sys.stderr)
    return code
