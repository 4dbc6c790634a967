"""Elastic resume: a checkpoint written by 2 ranks with the experts split over them (ep_size 2) continues
on 1 rank (ep_size 1), and the other way round, at the same global batch; dropout and gate noise off so
the runs are comparable step for step. The resumed losses and weights equal the uninterrupted run's."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, flag_dict, read_jsonl, run_ok, spawn

pytestmark = pytest.mark.slow
STEPS, SAVE_AT = 12, 6


def _run_worker(rank, flags):
    from minimoe.config import DistillConfig
    from minimoe.flags import from_flags
    from minimoe.distill import run
    run(from_flags(DistillConfig, flags))


def _flags(assets, out, world, **extra):
    # Global batch 8 either way: 2 ranks x 4, or 1 rank x 4 x 2 micro-steps (the same samples per micro-step).
    layout = {"ep_size": 2, "micro_batch_size": 4, "grad_accum": 1} if world == 2 else \
        {"ep_size": 1, "micro_batch_size": 4, "grad_accum": 2}
    return flag_dict(assets, out, max_steps=STEPS, save_every=SAVE_AT, hidden_dropout=0.0,
                     attention_dropout=0.0, **layout, **extra)


def _resume_from(ref, out):
    """A fresh run folder holding only the reference run's checkpoint at step SAVE_AT."""
    tag = f"step_{SAVE_AT:08d}"
    shutil.copytree(ref / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag)


@pytest.fixture(scope="module")
def references(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    refs = {}
    for world in (2, 1):
        refs[world] = tmp / f"ref{world}"
        spawn(_run_worker, world, _flags(assets, refs[world], world))
    return tmp, refs


@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)])
def test_resume_at_another_world_and_ep_size_continues_exactly(assets, references, saved, resumed):
    tmp, refs = references
    out = tmp / f"from{saved}_on{resumed}"
    _resume_from(refs[saved], out)
    spawn(_run_worker, resumed, _flags(assets, out, resumed, resume=True))
    want = {m["step"]: m for m in read_jsonl(refs[saved] / "metrics.jsonl")}
    got = {m["step"]: m for m in read_jsonl(out / "metrics.jsonl")}
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    worst_rel = max(abs(got[s]["relation"] - want[s]["relation"]) / abs(want[s]["relation"]) for s in got)
    for step in got:
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-6), step
    a, b = (load_file(refs[saved] / "student" / "model.safetensors"),
            load_file(out / "student" / "model.safetensors"))
    # Weights in units of fp32 rounding of each reference weight (eps x |w|): an absolute bound fails on
    # one rounding of a weight near 1 (6e-8), which is what reordered sums give.
    rounding = {k: torch.finfo(torch.float32).eps * a[k].abs().clamp(min=1e-3) for k in a}
    worst_roundings = max(float(((b[k] - a[k]).abs() / rounding[k]).max()) for k in a)
    # Measured: losses 1.04e-6 relative, weights 2.6 roundings (both directions); ~6-10x margin.
    assert worst_rel <= 1e-5, worst_rel
    assert worst_roundings <= 16, worst_roundings


def test_weights_only_resume_restarts_the_optimizer(assets, references):
    """--resume_weights_only: same weights, step and schedule at the start, fresh Adam moments: the first
    resumed step's loss (computed before the update) is the reference's, later ones drift."""
    tmp, refs = references
    out = tmp / "weights_only"
    _resume_from(refs[2], out)
    spawn(_run_worker, 1, _flags(assets, out, 1, resume=True, resume_weights_only=True))
    want = {m["step"]: m for m in read_jsonl(refs[2] / "metrics.jsonl")}
    got = {m["step"]: m for m in read_jsonl(out / "metrics.jsonl")}
    assert got[SAVE_AT + 1]["relation"] == pytest.approx(want[SAVE_AT + 1]["relation"], abs=1e-5, rel=1e-5)
    assert got[SAVE_AT + 1]["lr"] == pytest.approx(want[SAVE_AT + 1]["lr"], rel=1e-6)
    assert got[STEPS]["relation"] != pytest.approx(want[STEPS]["relation"], abs=1e-7, rel=1e-6)


# The last commit whose experts were a ModuleList of modules (before ``experts.StackedExperts``).
BEFORE_STACKING = "1296d7f"


def _launch(code_root, assets, out, **extra):
    flag_list = [f"--{k}={v}" for k, v in _flags(assets, out, 1, **extra).items()]
    run_ok([sys.executable, os.path.join(code_root, "launchers", "distill.py"), *flag_list],
           PYTHONPATH=code_root)


def test_a_checkpoint_from_before_the_experts_were_stacked_resumes_exactly(assets, tmp_path):
    """A run of the old code saved at step 6; the new code resumes it (its optimizer state re-laid out by
    name, not loaded as a flat buffer in the old order) and ends where the old code's own run ends."""
    if not os.path.isdir(os.path.join(REPO, ".git")) or shutil.which("git") is None:
        pytest.skip("needs this checkout's git history (the code before the stacking)")
    old = tmp_path / "old_code"
    old.mkdir()
    archive = subprocess.run(["git", "-C", REPO, "archive", BEFORE_STACKING, "minimoe", "launchers",
                              "ds_configs"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    ref, out = tmp_path / "old_run", tmp_path / "resumed"
    _launch(str(old), assets, ref)
    _resume_from(ref, out)
    _launch(REPO, assets, out, resume=True)
    want = {m["step"]: m for m in read_jsonl(ref / "metrics.jsonl")}
    got = {m["step"]: m for m in read_jsonl(out / "metrics.jsonl")}
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    worst_rel = max(abs(got[s]["relation"] - want[s]["relation"]) / abs(want[s]["relation"]) for s in got)
    a, b = load_file(ref / "student" / "model.safetensors"), load_file(out / "student" / "model.safetensors")
    assert a.keys() == b.keys()  # the exported student's keys are unchanged
    rounding = {k: torch.finfo(torch.float32).eps * a[k].abs().clamp(min=1e-3) for k in a}
    worst_roundings = max(float(((b[k] - a[k]).abs() / rounding[k]).max()) for k in a)
    assert worst_rel <= 1e-5, worst_rel
    assert worst_roundings <= 16, worst_roundings
