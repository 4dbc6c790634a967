"""DeepSpeed's shared-memory buffers on CPU, and their cleanup (a low module: the process-group start and
the error path both use it)."""
from __future__ import annotations

import glob
import os

SHM_PREFIX = "deepspeed_allreduce_buffer"


def _name(rank) -> str:
    return (f"/dev/shm/{SHM_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def unlink_rank_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce op (0.19) maps a ~69 MB buffer per rank in /dev/shm,
    named by user, MASTER_ADDR, MASTER_PORT and rank, and never unlinks it: every run would leave
    RAM-backed files behind. We never use that op (it serves tensor-parallel inference), so each rank
    removes its own buffer at exit; peers that still map it keep their mapping until they exit."""
    try:
        os.unlink(_name(rank))
    except OSError:
        pass


def unlink_job_buffers() -> None:
    """When a peer rank died (SIGKILL, OOM) it could not remove its buffer: the survivors remove every
    buffer of this job (this node's /dev/shm), since the job is over."""
    for name in glob.glob(_name("*")):
        try:
            os.unlink(name)
        except OSError:
            pass
