"""One live run per output folder.

Rank 0 holds ``output_dir/.minimoe-lock`` (host, pid and the process's start time) for the run's life
and touches it every step. A second run, or a ``--resume``, into a folder a live run holds is refused in
one line naming the holder; a lock whose holder is gone (killed, its host rebooted) is taken over, and the
run says so. On the holder's own host "gone" is exact (``/proc``: the pid with the same start time); a
holder on another host (a shared filesystem) is presumed gone once it has not touched the lock for
``STALE_S`` seconds.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Optional

from .config import ConfigError

LOCK_NAME = ".minimoe-lock"
STALE_S = 1800
_held: Optional[str] = None
_created_dir: Optional[str] = None


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22); None once it is gone.
    A zombie counts as gone: a killed rank whose launcher exited first waits for PID 1 to reap it, and in a
    container started without an init process that may never happen."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _holder(path: str) -> Optional[dict]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):  # being written, or cut short by a kill: judged by its age below
        return None


def _alive(holder: Optional[dict], path: str) -> bool:
    if holder and holder.get("host") == socket.gethostname() and os.path.isdir("/proc"):
        return _start_time(int(holder.get("pid", -1))) == holder.get("start")
    try:
        return time.time() - os.path.getmtime(path) < STALE_S
    except OSError:
        return False


def _refusal(output_dir: str, path: str, holder: Optional[dict]) -> ConfigError:
    who = (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
           if holder else "a run starting up")
    return ConfigError(f"--output_dir {output_dir!r} is in use by a live run ({who}); wait for it to end or "
                       f"choose another --output_dir (a lock whose run is dead is taken over; remove "
                       f"{path!r} only if you know that run is gone)")


def check(output_dir: str) -> None:
    """Before the process group: refuse a folder that a live run holds (read only; ``acquire`` takes it)."""
    path = os.path.join(output_dir, LOCK_NAME)
    if os.path.exists(path):
        holder = _holder(path)
        if _alive(holder, path):
            raise _refusal(output_dir, path, holder)


def acquire(output_dir: str) -> str:
    """Take the folder's lock for this process; returns a line to print when a dead run's lock was taken
    over ("" otherwise). Raises ConfigError naming the holder when a live run holds it."""
    global _held, _created_dir
    if not os.path.isdir(output_dir):
        os.makedirs(output_dir)
        _created_dir = output_dir
    path = os.path.join(output_dir, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    note = ""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if _alive(holder, path):
                raise _refusal(output_dir, path, holder) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            note = (f"took over {path!r}: its run "
                    f"(host {holder.get('host')}, pid {holder.get('pid')}) is gone"
                    if holder else f"took over {path!r}: its run is gone")
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        _held = path
        return note
    raise ConfigError(f"--output_dir {output_dir!r}: could not take {path!r} "
                      "(other runs keep starting there)")


def touch() -> None:
    """Tell runs on other hosts that the holder is alive."""
    if _held:
        with contextlib.suppress(FileNotFoundError):
            os.utime(_held)


def release() -> None:
    """Give the lock back (only ours: a run that took over a lock we lost keeps it); a folder this run
    created and left empty goes too."""
    global _held, _created_dir
    if _held is None:
        return
    holder = _holder(_held)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_held)
    if _created_dir and os.path.isdir(_created_dir) and not os.listdir(_created_dir):
        os.rmdir(_created_dir)
    _held = _created_dir = None
