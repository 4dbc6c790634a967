"""Where a distillation step's time goes, MoE student vs its dense twin, against this machine's limit.

    python benchmarks/distill_step.py                       # E=4 (4L H384), the dense twin without and with
                                                            # the relation projection (1, 1p)
    python benchmarks/distill_step.py --experts 1,4,8 --micro_batch 16 --teacher_zero 0
    python benchmarks/distill_step.py --experts 1,4 --procs 2 \
        --out benchmarks/results/distill_step_2procs.json
    python benchmarks/distill_step.py --experts 4 --precisions fp32,bf16-teacher,bf16 \
        --out benchmarks/results/distill_step_bf16.json     # what bf16 buys, teacher alone and whole step
    python benchmarks/distill_step.py --device cuda --experts 1p,4 --out runs/gpu/distill_step.json

Runs the real engines in one process (ZeRO-2 student, ZeRO-3 or ZeRO-0 teacher) on a fixed batch of
full-length sequences, times each phase, and compares the useful FLOP rate with a large fp32 matmul
measured in the same run. Prints a table and writes JSON (``--out``). Not a test: numbers, not asserts.
``--device cuda``: the same on one GPU per process (DeepSpeed's FusedAdam, as a run there uses; timings
synchronised with the GPU; ``peak_gpu_mb``: torch's peak allocated device memory).
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import fire  # noqa: E402
import torch  # noqa: E402
from torch.profiler import record_function  # noqa: E402

from benchmarks.device import check_device, clock, describe, peak_device_mib, refuse  # noqa: E402
from benchmarks.report import pyplot, save  # noqa: E402


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def matmul_peak(n: int = 2048, reps: int = 10, device: str = "cpu") -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    t = clock(device)
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (clock(device) - t) / 1e9


def measure(student: str, layers: int = 4, hidden: int = 384, micro_batch: int = 32, seq_len: int = 128,
            teacher: str = "packaged:all-MiniLM-L6-v2", teacher_zero: int = 3, steps: int = 4,
            fused_adam: bool = True, procs: int = 1, device: str = "cpu", precision: str = "fp32",
            profile: str = "") -> dict:
    """One student's step (``"4"``: 4 experts; ``"1p"``: the dense twin with the MoE students' relation
    projection) in a fresh process: a second model in the same process ran its loss 2x slower (allocator
    state left by the first engine), which would bias the comparison. ``procs`` 2: two processes under
    torchrun sharing the cores, ``micro_batch`` split between them, experts split over them (``ep_size``
    2), the teacher's ZeRO-3 partitions too. ``profile``: a path for the last step's op table (torch's
    profiler, rank 0). Returns the child's result (rank 0's file)."""
    import subprocess
    import tempfile
    start = [sys.executable] if procs == 1 else [
        os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(procs),
        "--master_port", str(_free_port())]
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        p = subprocess.run([*start, os.path.abspath(__file__), "--experts", str(student), "--layers",
                            str(layers), "--hidden", str(hidden), "--micro_batch", str(micro_batch),
                            "--seq_len", str(seq_len), "--teacher", teacher, "--teacher_zero",
                            str(teacher_zero), "--steps", str(steps), "--fused_adam", str(fused_adam),
                            "--device", device, "--precision", precision, "--profile", profile, "--out",
                            tmp.name, "--_child", "True"],
                           capture_output=True, text=True, env=dict(os.environ, DS_ACCELERATOR=device))
        if p.returncode:
            raise SystemExit(f"student {student} at {micro_batch} x {seq_len} failed:\n{p.stderr[-2000:]}")
        return json.load(open(tmp.name))


def bench(experts: str = "1,1p,4", layers: int = 4, hidden: int = 384, micro_batch: int = 32,
          seq_len: int = 128, teacher: str = "packaged:all-MiniLM-L6-v2", teacher_zero: int = 3,
          steps: int = 4, fused_adam: bool = True, procs: int = 1, device: str = "cpu",
          precisions: str = "fp32", profile: bool = False, check: bool = False,
          out: str = "benchmarks/results/distill_step.json") -> None:
    """Time teacher forward, student forward, relation loss, backward and optimizer step per student
    (``--experts 1,1p,4``: ``1p`` is the dense twin with the relation projection), in 1 or 2 processes,
    on ``--device`` cpu or cuda, at each of ``--precisions`` (fp32; bf16: student and teacher;
    bf16-teacher: an fp32 student, a bf16 teacher). ``--profile``: also the last step's ops by self CPU
    time, per student, beside ``--out`` (``<out>.E=4.bf16.profile.txt``). ``--check True``: validate the
    flags and exit."""
    # fire: "1,4" -> (1, 4)
    counts = experts if isinstance(experts, (tuple, list)) else str(experts).split(",")
    bad = [e for e in counts if not str(e).rstrip("p").isdigit() or int(str(e).rstrip("p")) < 1]
    if bad:
        refuse(f"--experts {bad} is invalid: expert counts >= 1, a 'p' after one for the projected twin")
    kinds = precisions if isinstance(precisions, (tuple, list)) else str(precisions).split(",")
    unknown = [k for k in kinds if k not in PRECISIONS]
    if unknown:
        refuse(f"--precisions {','.join(unknown)} is invalid: allowed {', '.join(PRECISIONS)}")
    check_device(device, check, procs)
    if check:
        print(f"distill_step.py: flags resolve (experts {list(counts)}, precisions {kinds}, "
              f"{procs} process(es), {device})")
        return
    result = None
    for kind in kinds:
        for e in counts:
            table = f"{os.path.splitext(out)[0]}.E={e}.{kind}.profile.txt" if profile else ""
            one = measure(str(e), layers, hidden, micro_batch, seq_len, teacher, teacher_zero, steps,
                          fused_adam, procs, device, kind, table)
            if result is None:
                result = one
            else:
                result["rows"] += one["rows"]
    where = result.get("gpu") or f"{result['threads']} threads"
    print(f"fp32 matmul peak {result['machine_matmul_gflops']:.0f} GFLOP/s ({where}); "
          f"batch {micro_batch} x {seq_len} over {procs} process(es); teacher ZeRO-{teacher_zero}")
    head = ["student", "precision", "params_M", "active_M", "teacher_fwd", "student_fwd", "loss_fwd",
            "backward", "optimizer", "step_s", "tokens_per_s", "useful_gflops_per_s",
            "fraction_of_matmul_peak", "mean_max_load", "peak_rss_mb"]
    head += ["peak_gpu_mb"] if device == "cuda" else []
    print(" | ".join(head))
    for r in result["rows"]:
        print(" | ".join(f"{r[h]:.3g}" if isinstance(r[h], float) else str(r[h]) for h in head))
    # The target: an MoE step <= 1.10x its dense twin's. Against the twin as the paper trains it (no
    # projection) and against the twin that also trains the projection (what the experts alone cost).
    twins = {"step_ratio": "E=1", "step_ratio_vs_projected_twin": "E=1+proj"}
    for key, name in twins.items():
        for r in result["rows"]:
            twin = next((t for t in result["rows"]
                         if t["student"] == name and t["precision"] == r["precision"]), None)
            r[key] = r["step_s"] / twin["step_s"] if twin else None
            if twin and r["experts"] > 1:
                print(f"{r['student']} {r['precision']}: step {r[key]:.2f}x {name}'s (target <= 1.10); "
                      "extra time by phase: "
                      + ", ".join(f"{k} {r[k] - twin[k]:+.3f} s" for k in PHASES))
    # What bf16 buys: each row's step against the fp32 row of the same student.
    for r in result["rows"]:
        base = next((b for b in result["rows"]
                     if b["student"] == r["student"] and b["precision"] == "fp32"), None)
        r["speedup_vs_fp32"] = base["step_s"] / r["step_s"] if base else None
        if base and r["precision"] != "fp32":
            print(f"{r['student']} {r['precision']}: {r['speedup_vs_fp32']:.2f}x the fp32 step; by phase: "
                  + ", ".join(f"{k} {base[k] / r[k]:.2f}x" for k in PHASES if r[k] > 0))
    save(result, out, _plot)


# fp32; bf16: student (DeepSpeed's bf16 engine, fp32 master weights) and teacher; bf16-teacher: the
# teacher only.
PRECISIONS = ("fp32", "bf16", "bf16-teacher")
PHASES = ("teacher_fwd", "student_fwd", "loss_fwd", "backward", "optimizer")


def _plot(result: dict, path: str) -> None:
    """Stacked step time by phase, one bar per student."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [r["student"] + ("" if r["precision"] == "fp32" else f"\n{r['precision']}")
              for r in result["rows"]]
    bottom = [0.0] * len(labels)
    for phase in PHASES:
        values = [r[phase] for r in result["rows"]]
        ax.bar(labels, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds per step")
    ax.set_title(f"distillation step, batch {result['micro_batch']} x {result['seq_len']}, "
                 f"{result.get('gpu') or str(result['threads']) + ' CPU threads'}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@contextlib.contextmanager
def _profiled(on: bool, path: str, device: str):
    """With ``on``, torch's profiler over the block: the ops by self CPU time, per phase and in all, to
    ``path``."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
    events = prof.key_averages()
    with open(path, "w") as fh:
        fh.write(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _one(experts: str, layers: int, hidden: int, micro_batch: int, seq_len: int, teacher: str,
         teacher_zero: int, steps: int, fused_adam: bool, device: str, precision: str, profile: str,
         out: str) -> None:
    from minimoe import MiniMoEModel, StudentConfig, flops_per_sequence, count_parameters
    from minimoe.data.assets import resolve_model
    from minimoe.distributed import init_distributed
    from minimoe.engine import build_student_engine
    from minimoe.losses import relation_kl
    from minimoe.teacher import Teacher

    import torch.distributed as dist
    info = init_distributed()
    world, rank = info.world_size, info.rank
    local = micro_batch // world  # this rank's share of the batch
    torch.manual_seed(0)
    # the ranks measure at once, each on its share of the cores (or its own GPU): their sum
    peak = torch.tensor(matmul_peak(device=device), device=device)
    dist.all_reduce(peak)
    peak = float(peak)
    t_ds = {"train_micro_batch_size_per_gpu": local, "train_batch_size": micro_batch,
            "zero_optimization": {"stage": teacher_zero}}
    if precision != "fp32":
        t_ds["bf16"] = {"enabled": True}
    tch = Teacher(resolve_model(teacher), t_ds, dtype=torch.bfloat16 if precision != "fp32" else None)
    t_cfg = tch.engine.module.config
    # The teacher is an encoder of its own shape: count its forward like a dense student's.
    t_flops = flops_per_sequence(StudentConfig(num_layers=tch.layer + 1, hidden_size=t_cfg.hidden_size,
                                               num_heads=t_cfg.num_attention_heads,
                                               ffn_size=t_cfg.intermediate_size, num_experts=1),
                                 seq_len)["forward_flops"]
    ids = torch.randint(1000, 20000, (micro_batch, seq_len))[rank * local:(rank + 1) * local].to(device)
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    rows = []
    for e, projected in ((int(str(experts).rstrip("p")), str(experts).endswith("p")),):
        cfg = StudentConfig(num_layers=layers, hidden_size=hidden, num_experts=e, vocab_size=t_cfg.vocab_size,
                            relation_projection=True if projected else None)
        ep = min(world, e) if e > 1 else 1  # experts split over the ranks, as a distillation run does
        model = MiniMoEModel(cfg, ep_size=ep, ep_rank=rank % ep)
        model.pooler.requires_grad_(False)
        # On CUDA, fused: DeepSpeed's FusedAdam, what minimoe's ds_config merge leaves a GPU run; unfused:
        # torch's for-each AdamW. On CPU, torch's AdamW with or without its fused CPU kernel (as the merge).
        adam = ({"torch_adam": True, "fused": fused_adam} if device == "cpu"
                else {} if fused_adam else {"torch_adam": True})
        ds = {"train_micro_batch_size_per_gpu": local, "gradient_accumulation_steps": 1,
              "train_batch_size": micro_batch, "gradient_clipping": 5.0, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, **adam}}}
        if precision == "bf16":
            ds["bf16"] = {"enabled": True}
        engine = build_student_engine(model, ds)
        phases = {"teacher_fwd": 0.0, "student_fwd": 0.0, "loss_fwd": 0.0, "backward": 0.0, "optimizer": 0.0}
        max_load = []
        for i in range(steps + 1):
            with _profiled(bool(profile) and i == steps and rank == 0, profile, device):
                t = [clock(device)]
                with record_function("teacher_fwd"):
                    tq = tch.qkv(batch)
                t.append(clock(device))
                with record_function("student_fwd"):
                    o = engine(ids, mask, output_qkv=True)
                t.append(clock(device))
                with record_function("loss_fwd"):
                    loss = relation_kl(tq, o.qkv, mask, 32) + 0.01 * o.aux_loss
                t.append(clock(device))
                with record_function("backward"):
                    engine.backward(loss)
                t.append(clock(device))
                with record_function("optimizer"):
                    engine.step()
                t.append(clock(device))
            if i == 0:
                continue  # warm-up
            for k, (a, b) in zip(phases, zip(t, t[1:])):
                phases[k] += (b - a) / steps
            max_load += [float(c.max() * len(c) / c.sum()) for c in o.expert_counts]
        # a step ends when the slowest rank's does
        slowest = torch.tensor(list(phases.values()), device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        phases = dict(zip(phases, slowest.tolist()))
        step_s = sum(phases.values())
        s_flops = flops_per_sequence(cfg, seq_len)["forward_flops"]
        useful = micro_batch * (3 * s_flops + t_flops)  # student fwd + bwd (2x), teacher fwd
        c = count_parameters(cfg)
        rows.append({"student": f"E={e}" + ("+proj" if projected else ""), "precision": precision,
                     "experts": e, "procs": world, "loss": float(loss),
                     "params_M": c["total"] / 1e6, "active_M": c["active"] / 1e6,
                     **{k: round(v, 4) for k, v in phases.items()}, "step_s": step_s,
                     "tokens_per_s": micro_batch * seq_len / step_s,
                     "useful_gflops_per_s": useful / step_s / 1e9,
                     "fraction_of_matmul_peak": useful / step_s / 1e9 / peak,
                     "mean_max_load": sum(max_load) / len(max_load) if max_load else 1.0,
                     "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     **({"peak_gpu_mb": peak_device_mib(device)} if device == "cuda" else {})})
    if rank:
        return
    result = {"machine_matmul_gflops": peak, "threads": torch.get_num_threads() * world,
              "micro_batch": micro_batch, "fused_adam": fused_adam,
              "seq_len": seq_len, "teacher": teacher, "teacher_zero_stage": teacher_zero,
              "teacher_gflops_per_seq": t_flops / 1e9, "rows": rows,
              **({"device": device, "gpu": describe(device, 0)} if device == "cuda" else {})}
    with open(out, "w") as fh:
        json.dump(result, fh)


def main(_child: bool = False, **kw) -> None:
    (_one if _child else bench)(**kw)


if __name__ == "__main__":
    fire.Fire(main)
