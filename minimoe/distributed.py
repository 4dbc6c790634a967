"""One way to start the process group, whether launched by ``deepspeed``, ``torchrun`` or plain ``python``."""
from __future__ import annotations

import atexit
import os
import socket
import uuid
from dataclasses import dataclass

from . import shm


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """World size as the launcher announced it: known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_world_size() -> int:
    """Processes on this node: torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_port_free(port: int) -> None:
    """A second job on a busy port would end in gloo's EADDRINUSE, or worse, meet the first job's store and
    its shared-memory buffers (named by address and port): refuse it in one line before anything starts."""
    import errno
    from .config import ConfigError
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to use
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"--master_port {port} is in use on this machine (another job?): "
                                  f"start this one with another port (deepspeed --master_port P, "
                                  f"torchrun --master_port P)")


def init_distributed() -> DistInfo:
    """Start (or join) the default process group and pin CPU threads to this rank's share of cores."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # plain `python`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if os.environ.get("RANK") == "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        _check_port_free(int(os.environ["MASTER_PORT"]))  # rank 0 hosts the rendezvous store (not torchrun)
    local_world = env_local_world_size()
    accel = get_accelerator()
    if accel.device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N ranks on one host share its cores; oversubscribing threads slows every rank down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    import torch.distributed as dist
    atexit.register(shm.unlink_rank_buffer, dist.get_rank())
    # One id per job, the same on every rank: it names the job's failure record (errors.report).
    job = [uuid.uuid4().hex[:12]]
    dist.broadcast_object_list(job, src=0)
    os.environ["MINIMOE_JOB_ID"] = job[0]
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world)


def agree(fn, main_only: bool = False):
    """Call ``fn`` on every rank (or on rank 0 only) so that a failure anywhere stops every rank at once,
    instead of leaving the others waiting in the next collective until gloo gives up on them.

    A user error (ConfigError) is raised on every rank, and rank 0 says it. Any other failure is raised
    on the rank that met it, which reports it; the others stop with ``PeerFailed``, silently, so that
    the line a user reads is the cause and not a partner's lost connection."""
    import torch.distributed as dist
    from .config import ConfigError
    from .errors import PeerFailed, classify
    result, failure = None, None
    if not main_only or dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            failure = e
    said = None if failure is None else (isinstance(failure, ConfigError), classify(failure)[0], str(failure))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, said)
    first = next(((r, s) for r, s in enumerate(everyone) if s), None)
    if first is None:
        return result
    rank, (user_error, code, text) = first
    if user_error:
        raise ConfigError(text)
    if rank == dist.get_rank():
        raise failure
    raise PeerFailed(rank, code)


def shutdown(wait: bool = True) -> None:
    """Leave the process group (together, with ``wait``): a rank that exits while gloo's group is
    alive can abort at interpreter exit instead of returning its exit code."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def device():
    from deepspeed.accelerator import get_accelerator
    import torch
    return torch.device(get_accelerator().current_device_name())


def accelerator_name() -> str:
    """The accelerator of the run, asked for before any process group: one that DS_ACCELERATOR names but
    this machine lacks is refused here (DeepSpeed takes the name on trust, and fails later, inside)."""
    from deepspeed.accelerator import get_accelerator
    from .config import ConfigError
    asked = os.environ.get("DS_ACCELERATOR", "")
    fix = "unset DS_ACCELERATOR (DeepSpeed then uses what the machine has) or set DS_ACCELERATOR=cpu"
    try:
        accel = get_accelerator()
    except ValueError as e:  # DeepSpeed's own check of the other names (xpu, npu, mps, ...)
        raise ConfigError(f"DS_ACCELERATOR={asked} was asked for, but {str(e).splitlines()[0]}; "
                          f"{fix}") from None
    if asked and asked != "cpu" and not accel.is_available():
        import torch
        why = ("this torch is built without CUDA" if asked == "cuda" and not torch.version.cuda
               else "this machine has no such device")
        raise ConfigError(f"DS_ACCELERATOR={asked} was asked for, but {why}; {fix}")
    return accel.device_name()
