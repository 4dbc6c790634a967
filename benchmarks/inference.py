"""Inference latency of an exported MiniMoE student against its dense twin, in one plain process.

    python benchmarks/inference.py                        # 4L H384, E=4 vs E=1, batch 1 and 32 x 128
    python benchmarks/inference.py --experts 4,8 --quick
    python benchmarks/inference.py --runtime onnx --out benchmarks/results/inference_onnx.json
    python benchmarks/inference.py --device cuda --experts 4,8 --out runs/gpu/inference.json

What a deployed student costs per forward: the same module an export loads (``MiniMoEModel``, ep_size 1,
eval mode, no DeepSpeed engine), randomly initialised (latency does not depend on the weights' values,
only on how tokens spread over experts, which the table reports). MoE and dense forwards alternate, so
that the machine's noise falls on both; the median of the repetitions is reported. Prints a table and
writes JSON with a ``latency_ratio`` (MoE / dense) per shape. Not a test: numbers, not asserts.

The physical limit next to each MoE latency (``limit_ms``): the dense twin's latency plus the bytes the
MoE forward must read beyond it (every expert that gets a token reads its FFN weights, the dense twin
reads one FFN a layer) at this machine's memory bandwidth, measured in the same run by a large copy
(``bandwidth_gbps``, bytes read + written per second). ``limit_ratio`` is the MoE latency over that limit.

``--runtime onnx`` times the same two models as ONNX graphs in onnxruntime instead (each written by
``launchers/export.py``'s code from a saved student folder, and checked against PyTorch there).

``--device cuda`` times the forwards on one GPU (synchronised; ``peak_gpu_mb``: torch's peak allocated device
memory); with ``--runtime onnx`` in onnxruntime's CUDA provider (``onnxruntime-gpu``), refused without it.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire  # noqa: E402
import torch  # noqa: E402

from benchmarks.device import check_device, clock, describe, peak_device_mib, refuse  # noqa: E402
from benchmarks.report import pyplot, save  # noqa: E402

TARGETS = {1: 1.10, 32: 1.03}  # latency ratio targets by batch size (issue: benchmarks)
LIMIT_TARGET = 1.15  # MoE latency over its bytes-bound limit (issue: speed, round two)


def memory_bandwidth_gbps(mib: int = 256, reps: int = 8) -> float:
    """Bytes read + written per second by the best of ``reps`` copies of a ``mib`` MiB tensor (far larger than
    the caches), in GB/s: what moving weights through memory costs here."""
    src = torch.ones(mib * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def extra_weight_bytes(model, counts_per_layer) -> int:
    """Weight bytes a MoE forward reads beyond its dense twin's: per layer, every expert given a token reads
    its own FFN, where the dense twin reads one."""
    experts = model.layers[0].ffn.local_experts
    per_expert = sum(p.numel() * p.element_size() for p in experts.parameters()) // experts.num_local_experts
    return sum(per_expert * (int((c > 0).sum()) - 1) for c in counts_per_layer)


def _model(experts: int, layers: int, hidden: int):
    from minimoe import MiniMoEModel, StudentConfig
    torch.manual_seed(0)
    cfg = StudentConfig(num_layers=layers, hidden_size=hidden, num_heads=hidden // 64, ffn_size=4 * hidden,
                        num_experts=experts, relation_projection=False)
    return MiniMoEModel(cfg).eval()


def _inputs(batch: int, seq_len: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(batch * 1000 + seq_len)
    ids = torch.randint(1000, 20000, (batch, seq_len), generator=g).to(device)
    return ids, torch.ones_like(ids), torch.zeros_like(ids)


ONNX_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _onnx_runner(model, folder: str, device: str = "cpu"):
    """``model`` saved as a student folder, exported to ONNX, and an onnxruntime session over it."""
    import onnxruntime as ort
    from minimoe.export.onnx import GRAPH_NAME, INPUTS, export_onnx
    model.save_pretrained(folder)
    export_onnx(folder, os.path.join(folder, "onnx"))
    graph = os.path.join(folder, "onnx", GRAPH_NAME)
    session = ort.InferenceSession(graph, providers=[ONNX_PROVIDERS[device]])
    return lambda *inputs: session.run(None, {k: v.cpu().numpy() for k, v in zip(INPUTS, inputs)})


def _time(model, inputs, reps: int, device: str = "cpu") -> list[float]:
    out = []
    with torch.inference_mode():
        for _ in range(reps):
            t = clock(device)
            model(*inputs)
            out.append(clock(device) - t)
    return out


def bench(experts: str = "4", layers: int = 4, hidden: int = 384, shapes: str = "1x128,32x128",
          reps: int = 30, quick: bool = False, runtime: str = "torch", device: str = "cpu",
          check: bool = False, out: str = "benchmarks/results/inference.json") -> dict:
    """Median forward latency of each MoE student and the dense twin (E=1) at each batch x length, in
    PyTorch (``--runtime torch``) or onnxruntime (``--runtime onnx``), on ``--device`` cpu or cuda.
    ``--check True``: validate the flags and exit."""
    import tempfile
    if runtime not in ("torch", "onnx"):
        raise SystemExit(f"--runtime {runtime!r} is invalid: choose torch or onnx")
    check_device(device, check)
    try:
        counts = [int(e) for e in (experts if isinstance(experts, (tuple, list))
                                   else str(experts).split(","))]
        shape_list = [tuple(int(v) for v in s.split("x"))
                      for s in (shapes if isinstance(shapes, (tuple, list)) else str(shapes).split(","))]
    except ValueError:
        refuse(f"--experts {experts!r} / --shapes {shapes!r}: write counts as 4,8 and shapes as 1x128,32x128")
    if runtime == "onnx" and device == "cuda" and not check:
        import onnxruntime as ort
        if ONNX_PROVIDERS[device] not in ort.get_available_providers():
            refuse(f"--runtime onnx --device cuda needs onnxruntime's CUDA provider (onnxruntime-gpu); this "
                   f"onnxruntime {ort.__version__} has {ort.get_available_providers()}")
    if check:
        print(f"inference.py: flags resolve (experts {counts}, shapes {shape_list}, {runtime}, {device})")
        return {}
    tmp = tempfile.mkdtemp(prefix="minimoe-bench-")
    run = ((lambda m, name: _onnx_runner(m, os.path.join(tmp, name), device)) if runtime == "onnx"
           else (lambda m, name: m.to(device)))
    reps = max(5, reps // 3) if quick else reps
    bandwidth = memory_bandwidth_gbps()
    dense = run(_model(1, layers, hidden), "dense")
    rows = []
    for e in counts:
        moe_model = _model(e, layers, hidden)
        moe = run(moe_model, f"moe{e}")
        moe_model.to(device)  # the module also counts the experts' tokens below (onnx: the graph was saved)
        for batch, seq_len in shape_list:
            inputs = _inputs(batch, seq_len, device)
            _time(dense, inputs, 3, device), _time(moe, inputs, 3, device)  # warm-up: allocator, thread pool
            d, m = [], []
            for _ in range(reps):  # alternate, one forward each, so that drift hits both
                d += _time(dense, inputs, 1, device)
                m += _time(moe, inputs, 1, device)
            with torch.inference_mode():
                counts_per_layer = moe_model(*inputs).expert_counts
            loads = [float(c.max() * len(c) / c.sum()) for c in counts_per_layer]
            d_ms, m_ms = 1e3 * statistics.median(d), 1e3 * statistics.median(m)
            extra = extra_weight_bytes(moe_model, counts_per_layer)
            limit_ms = d_ms + extra / (bandwidth * 1e9) * 1e3
            rows.append({"experts": e, "batch": batch, "seq_len": seq_len, "dense_ms": d_ms, "moe_ms": m_ms,
                         "latency_ratio": m_ms / d_ms, "target": TARGETS.get(batch),
                         "extra_weight_mb": extra / 1e6, "limit_ms": limit_ms, "limit_ratio": m_ms / limit_ms,
                         "limit_target": LIMIT_TARGET, "mean_max_load": sum(loads) / len(loads)})
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    result = {"runtime": runtime, "threads": torch.get_num_threads(), "layers": layers, "hidden": hidden,
              "reps": reps, "torch": torch.__version__, "bandwidth_gbps": bandwidth, "rows": rows,
              **({"device": device, "gpu": describe(device, 0), "peak_gpu_mb": peak_device_mib(device)}
                 if device == "cuda" else {})}
    if runtime == "onnx":
        import onnxruntime
        result["onnxruntime"] = onnxruntime.__version__
    print(f"memory bandwidth {bandwidth:.1f} GB/s (read + write, a {256} MiB copy)")
    print(f"{'experts':>7} {'batch x len':>12} {'dense ms':>9} {'MoE ms':>9} {'ratio':>6} {'target':>6} "
          f"{'extra MB':>8} {'limit ms':>8} {'/ limit':>7} {'max load':>8}")
    for r in rows:
        print(f"{r['experts']:>7} {str(r['batch']) + ' x ' + str(r['seq_len']):>12} {r['dense_ms']:>9.2f} "
              f"{r['moe_ms']:>9.2f} {r['latency_ratio']:>6.2f} {r['target'] or '-':>6} "
              f"{r['extra_weight_mb']:>8.1f} "
              f"{r['limit_ms']:>8.2f} {r['limit_ratio']:>7.2f} {r['mean_max_load']:>8.2f}")
    save(result, out, _plot)


def _plot(result: dict, path: str) -> None:
    """Dense vs MoE latency, one group per experts x shape, the ratio written over the MoE bar."""
    plt = pyplot()
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, small in zip(axes, (True, False)):
        part = [r for r in rows if (r["batch"] == 1) == small]
        labels = [f"E={r['experts']}\n{r['batch']}x{r['seq_len']}" for r in part]
        x = range(len(part))
        ax.bar([i - 0.2 for i in x], [r["dense_ms"] for r in part], 0.4, label="dense twin")
        bars = ax.bar([i + 0.2 for i in x], [r["moe_ms"] for r in part], 0.4, label="MoE")
        for bar, r in zip(bars, part):
            ax.annotate(f"{r['latency_ratio']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
            if "limit_ms" in r:  # the bytes-bound limit: the dense latency plus the extra weights' read time
                ax.hlines(r["limit_ms"], bar.get_x(), bar.get_x() + bar.get_width(), colors="black",
                          label="bytes-bound limit" if bar is bars[0] and ax is axes[0] else None)
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("ms per forward (median)")
        ax.margins(y=0.3)  # room above the bars for the ratios and the legend
    axes[0].legend(fontsize=8)
    fig.suptitle(f"exported student inference ({result['runtime']}), "
                 f"{result['layers']}L H{result['hidden']}, "
                 f"{result.get('gpu') or str(result['threads']) + ' threads'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(**kw) -> None:
    bench(**kw)


if __name__ == "__main__":
    fire.Fire(main)
