"""Metrics on rank 0: a JSONL file, wandb (offline by default), a tqdm bar; expert utilisation."""
from __future__ import annotations

import json
import os
import resource
from typing import Optional, Sequence

import torch


def member_folder(name: str) -> str:
    """Where a member of a run of several students keeps its files (student/, metrics.jsonl, summary.json),
    relative to the run folder; a single-student run ("") keeps them in the run folder itself."""
    return os.path.join("students", name) if name else ""


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
        out[f"layer{i}"] = {"share": [round(float(s), 4) for s in share],
                            "max_load": float(share.max() * len(c))}
    return out


class Monitor:
    """Writes metrics on the main rank only; every other rank gets a no-op monitor. A run of several
    students (``members``) has one metrics.jsonl per student (``students/<name>/``, the keys of a single
    run), one progress bar, and one wandb run whose keys are prefixed ``<name>/``."""

    def __init__(self, output_dir: str, enabled: bool, total_steps: int, start_step: int, wandb_mode: str,
                 wandb_project: str, run_config: dict, desc: str = "distill", members: Sequence[str] = ("",)):
        self.enabled = enabled
        self._files: dict = {}
        self._bar = None
        self._wandb = None
        self._postfix: dict = {}
        # wandb keeps what an interrupted run sent it: the steps up to this one are not sent again, so its
        # curves hold each step once too (metrics.jsonl drops and rewrites them instead)
        self._wandb_after = 0
        if not enabled:
            return
        for name in members:
            folder = os.path.join(output_dir, member_folder(name))
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "metrics.jsonl")
            self._wandb_after = max(self._wandb_after, _last_step(path))
            _drop_rows_after(path, start_step)
            self._files[name] = open(path, "a")
        if wandb_mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            import wandb
            # wandb's own banner (five lines at start, four at the end) gives way to one line of ours
            self._wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=output_dir,
                                     config=run_config, resume="allow", id=_run_id(output_dir),
                                     settings=wandb.Settings(silent=True))
            where = self._wandb.dir.removesuffix(os.sep + "files")
            print(f"wandb: {wandb_mode} run {self._wandb.id} in {where}"
                  + (f" (upload: wandb sync {where})" if wandb_mode == "offline" else ""), flush=True)
        from tqdm import tqdm  # after wandb's start, so nothing is printed under the bar
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict, utilisation: Optional[dict] = None, member: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if utilisation:
            record["experts"] = utilisation
        fh = self._files[member]
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        prefix = f"{member}/" if member else ""
        shown = {f"{prefix}{k}": f"{v:.4g}" for k, v in metrics.items()
                 if k in ("loss", "relation", "train_loss") or (k == "tokens_per_s" and not member)}
        if shown:
            self._postfix.update(shown)
            self._bar.set_postfix(self._postfix)
        if self._wandb is not None and step > self._wandb_after:
            flat = dict(metrics)
            for layer, u in (utilisation or {}).items():
                flat[f"experts/{layer}/max_load"] = u["max_load"]
                for e, s in enumerate(u["share"]):
                    flat[f"experts/{layer}/e{e}"] = s
            self._wandb.log({f"{prefix}{k}": v for k, v in flat.items()}, step=step)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, message: str) -> None:
        """A line above the bar; once the bar is full it is closed first, so it is drawn once, above the
        summary (tqdm.write would draw it again under every line, and close() once more)."""
        if not self.enabled:
            return
        if self._bar is not None and self._bar.total is not None and self._bar.n >= self._bar.total:
            self._bar.close()
            self._bar = None
        if self._bar is None:
            print(message, flush=True)
        else:
            from tqdm import tqdm
            tqdm.write(message)

    def close(self, summary: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        if summary and self._wandb is not None:
            self._wandb.summary.update(summary)
        if self._bar is not None:
            self._bar.close()
        for fh in self._files.values():
            fh.close()
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


def _last_step(path: str) -> int:
    """The last step a metrics file logged (0 if none)."""
    last = 0
    if os.path.isfile(path):
        with open(path) as fh:
            for line in fh:
                try:
                    last = max(last, int(json.loads(line).get("step", 0)))
                except (ValueError, AttributeError):  # a row cut short by a kill
                    continue
    return last


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
