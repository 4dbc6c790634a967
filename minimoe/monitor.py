"""Metrics on rank 0: a JSONL file, wandb (offline by default), a tqdm bar; expert utilisation."""
from __future__ import annotations

import json
import os
import resource
from typing import Optional

import torch


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gather_peak_rss() -> list[float]:
    """Every rank's peak RSS (MiB), on every rank."""
    import torch.distributed as dist
    rss = [None] * dist.get_world_size()
    dist.all_gather_object(rss, round(peak_rss_mib(), 1))
    return rss


def expert_utilisation(counts: list[torch.Tensor]) -> dict:
    """Per MoE layer: the share of routed tokens each expert took, and the busiest expert's load
    relative to a perfect balance (1.0 = balanced; E = one expert takes all). Dropless dispatch runs
    every expert on the busiest one's token count, so ``max_load`` is also the FFN's slowdown."""
    out = {}
    for i, c in enumerate(counts):
        c = c.double()
        share = c / c.sum().clamp(min=1)
        out[f"layer{i}"] = {"share": [round(float(s), 4) for s in share], "max_load": float(share.max() * len(c))}
    return out


class Monitor:
    """Writes metrics on the main rank only; every other rank gets a no-op monitor."""

    def __init__(self, output_dir: str, enabled: bool, total_steps: int, start_step: int, wandb_mode: str,
                 wandb_project: str, run_config: dict, desc: str = "distill"):
        self.enabled = enabled
        self._file = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        _drop_rows_after(path, start_step)
        self._file = open(path, "a")
        from tqdm import tqdm
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
        if wandb_mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            import wandb
            self._wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=output_dir, config=run_config,
                                     resume="allow", id=_run_id(output_dir))

    def log(self, step: int, metrics: dict, utilisation: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if utilisation:
            record["experts"] = utilisation
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "relation", "tokens_per_s", "train_loss")})
        if self._wandb is not None:
            flat = dict(metrics)
            for layer, u in (utilisation or {}).items():
                flat[f"experts/{layer}/max_load"] = u["max_load"]
                for e, s in enumerate(u["share"]):
                    flat[f"experts/{layer}/e{e}"] = s
            self._wandb.log(flat, step=step)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(message)

    def close(self, summary: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        if summary and self._wandb is not None:
            self._wandb.summary.update(summary)
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _run_id(output_dir: str) -> str:
    """One wandb run per output_dir, so a resumed job continues its own curves."""
    path = os.path.join(output_dir, "wandb_run_id")
    if os.path.isfile(path):
        with open(path) as fh:
            return fh.read().strip()
    import uuid
    rid = uuid.uuid4().hex[:12]
    with open(path, "w") as fh:
        fh.write(rid)
    return rid


def _drop_rows_after(path: str, step: int) -> None:
    """A run resumed at ``step`` logs the steps after it again: the rows an interrupted run wrote for them
    go (atomically), so the file holds each step once."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        lines = fh.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a row cut short by a kill
            continue
        if row.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) == len(lines):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)
