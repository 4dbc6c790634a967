"""The per-rank half of teacher_scaling.py: what each of the N spawned processes does, and the spawner.

``rank_main`` runs in every rank: it loads the whole teacher under one placement (or the pre-lazy-loader
path, ``BeforeTeacher``), times its forwards and writes the rank's RSS and timings to ``rank<r>.json``.
``spawn_watched`` starts the ranks (gloo, as tests/helpers.py does) and kills them when memory runs low or
time runs out. The driver (flags, table, JSON, plot) is teacher_scaling.py; the numbers are explained in
its docstring. Kept apart so that the code each rank runs reads on its own, and imports nothing of the
driver's (spawned processes pickle ``rank_main`` and ``_child`` by this module's name).
"""
from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import sys
import time
import traceback

from minimoe.teacher import Teacher
from benchmarks.device import clock

MiB, GiB = 1024 ** 2, 1024 ** 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The ZeRO-3 knobs minimoe's teacher config had before the layer-sized "auto" values (DeepSpeed's defaults).
BEFORE_ZERO3_KNOBS = {"stage3_param_persistence_threshold": 10000, "stage3_prefetch_bucket_size": 50_000_000,
                      "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000}


def teacher_params(folder: str) -> int:
    """Parameters of the teacher as Teacher builds it (all layers, no pooler), on the meta device."""
    from minimoe.teacher import parameter_count, teacher_info, truncated_config
    return parameter_count(truncated_config(folder, teacher_info(folder).num_layers - 1))


# ------------------------------------------------------------------------------------- one rank's work

def status_kib() -> dict:
    with open("/proc/self/status") as fh:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in fh)
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")}


class BeforeTeacher:
    """minimoe's Teacher as it was before the lazy loader (the zero3 case): from_pretrained under a live
    HfDeepSpeedConfig, then deepspeed.initialize. qkv and bytes_per_rank are Teacher's own."""

    def __init__(self, name: str, ds_config: dict, layer: int = -1):
        import inspect
        import deepspeed
        from transformers import AutoModel
        from transformers.integrations import HfDeepSpeedConfig
        from torch import nn
        from minimoe.teacher import QKVCapture, find_layer_stack, resolve_layer, teacher_info
        info = teacher_info(name)
        self.layer = resolve_layer(layer, info.num_layers)
        self._hf_ds_config = HfDeepSpeedConfig(ds_config)  # kept alive: from_pretrained partitions under it
        model = AutoModel.from_pretrained(name)
        model.eval().requires_grad_(False)
        # the layers above the distilled one were dropped after the whole model had loaded
        parent, attr, stack = find_layer_stack(model, info.num_layers)
        setattr(parent, attr, nn.ModuleList(list(stack)[:self.layer + 1]))
        self.capture = QKVCapture(getattr(parent, attr)[self.layer])
        self._accepts_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        self.engine.eval()

    qkv, bytes_per_rank = Teacher.qkv, Teacher.bytes_per_rank


def rank_main(rank: int, world: int, folder: str, placement: str, micro_batch: int, seq_len: int, reps: int,
              zero_extra: dict, result_dir: str, device: str = "cpu") -> None:
    import logging
    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig  # noqa: F401  (imported before the baseline)
    from minimoe import placement as placement_lib
    from minimoe.distributed import init_distributed
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    t0 = time.perf_counter()
    init_distributed()
    init_s = time.perf_counter() - t0
    n_params = teacher_params(folder)  # imports the model code: not part of the load
    if placement == "before":  # the old path with the old ds_configs/zero3_teacher.json knobs
        ds = {"train_micro_batch_size_per_gpu": micro_batch, "train_batch_size": micro_batch * world,
              "zero_optimization": {**BEFORE_ZERO3_KNOBS, **zero_extra}}
    else:  # what a distillation run uses: ds_configs/teacher.json, its "auto" knobs sized by the layer
        from minimoe.config import DistillConfig
        from minimoe.engine import pop_precision, teacher_ds_config
        from minimoe.teacher import teacher_info
        ds = teacher_ds_config(DistillConfig(teacher_ds_config=os.path.join(REPO, "ds_configs/teacher.json")),
                               world, micro_batch, device, n_params // teacher_info(folder).num_layers)
        pop_precision(ds)
        ds["zero_optimization"].update(zero_extra)
    dist.barrier()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    before = status_kib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    if placement == "before":
        teacher = BeforeTeacher(folder, placement_lib.apply(dict(ds),
                                                            placement_lib.Placement("zero3", "bench")))
    elif placement == "untrimmed":
        teacher = Teacher(folder, ds, layer=-1, dtype=None,
                          placement=placement_lib.Placement("zero3", "bench"))
        for hook in teacher._trims:
            hook.remove()
    else:
        teacher = Teacher(folder, ds, layer=-1, dtype=None,
                          placement=placement_lib.Placement(placement, "bench"))
    load_s = clock(device) - t
    loaded = status_kib()
    gpu_load_peak = torch.cuda.max_memory_allocated() / MiB if device == "cuda" else None
    kept = teacher.bytes_per_rank()

    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(1000, 20000, (micro_batch, seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": torch.zeros_like(ids)}
    times = []
    for i in range(1 + reps):
        t = clock(device)
        q, k, v = teacher.qkv(batch)
        if i:
            times.append(clock(device) - t)
    assert q.shape[:2] == (micro_batch, seq_len) and torch.isfinite(q).all()
    steady = status_kib()
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what of the steady RSS is glibc keeping freed memory
    trimmed = status_kib()
    result = {"rank": rank, "params": n_params, "threads": torch.get_num_threads(),
              "init_distributed_s": init_s, "load_s": load_s,
              "rss_before_mib": before["VmRSS"] / 1024,
              "load_peak_mib": (loaded["VmHWM"] - before["VmRSS"]) / 1024,
              "after_load_mib": (loaded["VmRSS"] - before["VmRSS"]) / 1024,
              "steady_mib": (steady["VmRSS"] - before["VmRSS"]) / 1024,
              "steady_trimmed_mib": (trimmed["VmRSS"] - before["VmRSS"]) / 1024,
              "run_peak_mib": (steady["VmHWM"] - before["VmRSS"]) / 1024,
              "steady_rss_file_mib": steady["RssFile"] / 1024,
              "steady_rss_anon_mib": steady["RssAnon"] / 1024,
              "bytes_per_rank": kept, "fwd_s": statistics.median(times), "fwd_all_s": times}
    if device == "cuda":
        result.update(gpu_load_peak_mib=gpu_load_peak,
                      gpu_run_peak_mib=torch.cuda.max_memory_allocated() / MiB,
                      gpu_steady_mib=torch.cuda.memory_allocated() / MiB)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


# ------------------------------------------------------------------------------- spawning the ranks

def _child(rank, world, port, threads, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=str(threads))
    import torch
    from minimoe.distributed import shutdown
    torch.set_num_threads(threads)
    try:
        fn(rank, world, *args)
        shutdown()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_watched(fn, world: int, args: tuple, min_free_gib: float, timeout_s: float) -> str:
    """tests/helpers.py's spawn, plus a watchdog: ``fn(rank, world, *args)`` in ``world`` processes; they
    are killed if available memory falls under ``min_free_gib`` or they run past ``timeout_s``.
    Returns ("" or why it failed, the share of the machine's CPU time other processes used meanwhile)."""
    import multiprocessing
    import psutil
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // world)
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, threads, fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    busy0, kids0 = _busy_cpu_s(), _children_cpu_s()
    start, low = time.monotonic(), None
    while any(p.is_alive() for p in procs):
        avail = psutil.virtual_memory().available / GiB
        if avail < min_free_gib:
            low = f"killed: available memory fell to {avail:.1f} GiB"
        elif time.monotonic() - start > timeout_s:
            low = f"killed: over {timeout_s:.0f} s"
        if low or any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.join()
    wall = time.monotonic() - start
    other = max(0.0, (_busy_cpu_s() - busy0) - (_children_cpu_s() - kids0)) / (wall * (os.cpu_count() or 1))
    if low:
        return low, other
    bad = [f"rank {r} exit code {p.exitcode}" for r, p in enumerate(procs) if p.exitcode != 0]
    return "; ".join(bad), other


def _busy_cpu_s() -> float:
    import psutil
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _children_cpu_s() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
