"""The authors' MiniMoE distillation step, re-implemented in plain PyTorch at our sizes, against ours.

    python benchmarks/authors_step.py                     # 1 process, 3 timed steps, then our step
    python benchmarks/authors_step.py --two_procs True    # + both at 2 processes (about 2.5 min more)
    python benchmarks/authors_step.py --device cuda       # both on one GPU
    python benchmarks/authors_step.py --precision bf16 --out benchmarks/results/authors_step_bf16.json

What it measures: seconds per step (median of ``steps`` after one warm-up) and tokens/s of the
task-agnostic distillation step of Zhang et al. (ACL 2023) as their public code (GeneZC/MiniMoE) runs it,
timed by phase (teacher forward, student forward, loss, backward, optimizer); then our step
(``distill_step.measure("4")``, the real engines, in a fresh process) in the same run, and the
ratio ours / authors in tokens/s (the project's target: >= 3). Sizes are ours, not theirs: student 4
layers, hidden 384, 12 heads, 4 FFN experts of 1536, 32 relation heads; teacher the packaged
MiniLM-L6 (HF ``AutoModel``, eager attention, frozen, eval); batch 32 x 128 random ids, every token valid.
``--two_procs True`` adds their DDP step (gloo, 2 processes x batch 16) and ours at 2 processes (torchrun,
experts split over the two, the teacher's ZeRO-3 partitions too). Prints a table, writes JSON and a PNG.
Phases do not cut the same work: theirs computes relations inside the forwards (the teacher's, of every
layer, in teacher_fwd; the student's head in student_fwd), ours in loss_fwd; compare step totals.
Not a test: numbers, not asserts. The machine is shared: compare within one run only.
``--device cuda``: both steps on one GPU (theirs moved there whole, ours as ``distill_step.py --device
cuda`` runs it), timings synchronised with the GPU; ``--two_procs`` stays a CPU comparison.
``--precision bf16``: theirs under ``torch.autocast(bfloat16)`` (forwards and loss; fp32 weights and
optimizer, as their fp16 AMP runs), ours with bf16 engines (``distill_step.py --precisions bf16``).

Their model, teacher, loss and optimizer, and which file of theirs each follows: ``authors_model.py``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import fire  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks.device import check_device, clock, describe, peak_device_mib, refuse  # noqa: E402
from benchmarks.report import pyplot, save  # noqa: E402

PHASES = ("teacher_fwd", "student_fwd", "loss", "backward", "optimizer")
OURS_PHASES = ("teacher_fwd", "student_fwd", "loss_fwd", "backward", "optimizer")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from authors_model import AuthorsStudent, RelationTeacher, loss_fn, optimizer_for  # noqa: E402


# ------------------------------------------------------------------------------------------------- step

def _run(batch: int, seq_len: int, steps: int, layers: int, hidden: int, experts: int, teacher: str,
         rank: int = 0, world: int = 1, device: str = "cpu", precision: str = "fp32") -> dict:
    """Warm-up + ``steps`` timed steps of their loop; per-phase seconds of each timed step."""
    from minimoe.data.assets import resolve_model
    torch.manual_seed(776 + rank)  # their default seed
    tch = RelationTeacher(resolve_model(teacher), relation_heads=32)
    tch.model.to(device)
    vocab = tch.model.config.vocab_size
    student = AuthorsStudent(vocab, layers, hidden, 12, 4 * hidden, experts, relation_heads=32).to(device)
    model = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student, find_unused_parameters=True)
    opt, sched = optimizer_for(model)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(1000, 20000, (batch, seq_len), generator=g).to(device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    segments = torch.zeros_like(ids)
    times, losses, loads = [], [], []
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
    for i in range(steps + 1):
        model.train()
        t = [clock(device)]
        with autocast:
            t_rels = tch(ids, mask, segments)
        t.append(clock(device))
        with autocast:
            s_rels, balance = model(ids, mask, segments)
        t.append(clock(device))
        with autocast:
            loss = loss_fn(t_rels, s_rels, balance)
        losses.append(loss.item())  # theirs: train_losses.update(loss.item()) every step
        t.append(clock(device))
        loss.backward()
        t.append(clock(device))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        t.append(clock(device))
        if i:  # step 0 is the warm-up
            times.append([b - a for a, b in zip(t, t[1:])])
            loads += [max(n) * len(n) / sum(n) for n in (layer.last_sizes for layer in student.layers)]
    return {"times": times, "losses": losses, "mean_max_load": sum(loads) / len(loads),
            "params_M": sum(p.numel() for p in student.parameters()) / 1e6,
            "peak_gpu_mb": peak_device_mib(device)}


def _median_phases(times: list) -> dict:
    step = statistics.median(sum(t) for t in times)
    return {"step_s": step, **{k: statistics.median(t[j] for t in times) for j, k in enumerate(PHASES)}}


def _ddp_worker(rank: int, world: int, port: int, kw: dict, out: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    r = _run(rank=rank, world=world, **kw)
    # A step ends when the slowest rank's does: take, per step and phase, the max over ranks.
    t = torch.tensor(r["times"])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"times": t.tolist(), "params_M": r["params_M"]}, fh)
    dist.destroy_process_group()


def _ours(steps: int, procs: int = 1, device: str = "cpu", precision: str = "fp32") -> dict:
    """Our step (real engines, E=4) as distill_step.py measures it, in fresh processes."""
    from distill_step import measure
    return measure("4", steps=steps, procs=procs, device=device, precision=precision)["rows"][0]


def bench(steps: int = 3, ours_steps: int = 3, batch: int = 32, seq_len: int = 128, layers: int = 4,
          hidden: int = 384, experts: int = 4, teacher: str = "packaged:all-MiniLM-L6-v2",
          two_procs: bool = False, device: str = "cpu", precision: str = "fp32", check: bool = False,
          out: str = "benchmarks/results/authors_step.json") -> dict:
    """Time their step (1 process, optionally 2) and ours on ``--device`` cpu or cuda, at ``--precision``
    fp32 or bf16; print a table; write JSON and PNG. ``--check True``: validate the flags and exit."""
    check_device(device, check)
    if precision not in ("fp32", "bf16"):
        refuse(f"--precision {precision!r} is invalid: choose fp32 or bf16")
    if two_procs and device != "cpu":
        refuse("--two_procs True compares 2 CPU processes (gloo); with --device cuda leave it out")
    if check:
        print(f"authors_step.py: flags resolve ({device}, two_procs {two_procs})")
        return {}
    kw = dict(batch=batch, seq_len=seq_len, steps=steps, layers=layers, hidden=hidden, experts=experts,
              teacher=teacher, precision=precision)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    one = _run(**kw, device=device)
    authors = _median_phases(one["times"])
    two = None
    if two_procs:
        import torch.multiprocessing as mp
        from minimoe.distributed import _free_port
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            mp.spawn(_ddp_worker, args=(2, _free_port(), {**kw, "batch": batch // 2}, tmp.name), nprocs=2)
            two = _median_phases(json.load(open(tmp.name))["times"])
    ours = _ours(ours_steps, device=device, precision=precision)
    ours_two = _ours(ours_steps, procs=2, precision=precision) if two_procs else None
    tokens = batch * seq_len
    a_tps, o_tps = tokens / authors["step_s"], ours["tokens_per_s"]
    result = {"authors_step_s": authors["step_s"], "authors_tokens_per_s": a_tps,
              "ours_step_s": ours["step_s"], "ours_tokens_per_s": o_tps, "ratio": o_tps / a_tps,
              "target_ratio": 3.0, "precision": precision,
              "authors_phases_s": {k: authors[k] for k in PHASES},
              "ours_phases_s": {k: ours[k] for k in OURS_PHASES},
              "authors_2procs": None if two is None else {
                  "step_s": two["step_s"], "tokens_per_s": tokens / two["step_s"],
                  "phases_s": {k: two[k] for k in PHASES}, "per_process_batch": batch // 2},
              "ours_2procs": None if ours_two is None else {
                  "step_s": ours_two["step_s"], "tokens_per_s": ours_two["tokens_per_s"],
                  "phases_s": {k: ours_two[k] for k in OURS_PHASES},
                  "ratio": ours_two["tokens_per_s"] / (tokens / two["step_s"])},
              "sizes": {"batch": batch, "seq_len": seq_len, "student_layers": layers, "hidden": hidden,
                        "heads": 12,
                        "ffn_per_expert": 4 * hidden, "experts": experts, "relation_heads": 32,
                        "authors_student_params_M": one["params_M"],
                        "ours_student_params_M": ours["params_M"],
                        "teacher": teacher},
              "steps": steps, "ours_steps": ours_steps,
              "authors_step_times_s": [sum(t) for t in one["times"]],
              "authors_losses": one["losses"], "authors_mean_max_load": one["mean_max_load"],
              "ours_mean_max_load": ours["mean_max_load"],
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              **({"device": device, "gpu": describe(device, 0), "authors_peak_gpu_mb": one["peak_gpu_mb"],
                  "ours_peak_gpu_mb": ours["peak_gpu_mb"]} if device == "cuda" else {}),
              "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
              "wall_s": time.perf_counter() - t0}
    print(f"batch {batch} x {seq_len}, {precision}, {describe(device, torch.get_num_threads())}, "
          f"torch {torch.__version__}; "
          f"median of {steps} (authors) / mean of {ours_steps} (ours) steps; load avg {load_before:.1f}")
    head = ["step", "procs"] + list(PHASES) + ["step_s", "tokens_per_s"]
    print(" | ".join(head))
    rows = [("authors", 1, [authors[k] for k in PHASES], authors["step_s"])]
    if two:
        rows.append(("authors", 2, [two[k] for k in PHASES], two["step_s"]))
    rows.append(("ours", 1, [ours[k] for k in OURS_PHASES], ours["step_s"]))
    if ours_two:
        rows.append(("ours", 2, [ours_two[k] for k in OURS_PHASES], ours_two["step_s"]))
    for name, procs, ph, s in rows:
        print(" | ".join([name, str(procs)] + [f"{v:.3f}" for v in ph] + [f"{s:.3f}", f"{tokens / s:.0f}"]))
    if ours_two:
        print(f"2 processes: ours / authors tokens/s {result['ours_2procs']['ratio']:.2f}x")
    print(f"ours / authors tokens/s: {result['ratio']:.2f}x (target >= 3); mean max expert load: authors "
          f"{one['mean_max_load']:.2f}, ours {ours['mean_max_load']:.2f}")
    save(result, out, lambda res, path: _plot(rows, res, path))
    return result


def _plot(rows: list, result: dict, path: str) -> None:
    """Stacked step time by phase, one bar per step (ours' loss_fwd stacked as loss)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{name}\n{procs} proc" for name, procs, _, _ in rows]
    bottom = [0.0] * len(rows)
    for j, phase in enumerate(PHASES):
        values = [ph[j] for _, _, ph, _ in rows]
        ax.bar(labels, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds per step")
    s = result["sizes"]
    where = result.get("gpu") or f"{result['threads']} CPU threads"
    ax.set_title(f"authors' step vs ours, batch {s['batch']} x {s['seq_len']}, E={s['experts']}, "
                 f"{where} (ours {result['ratio']:.2f}x)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: the bars reach the top
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(**kw) -> None:
    bench(**kw)  # returns nothing, so that fire does not print the result dict after the table


if __name__ == "__main__":
    fire.Fire(main)
