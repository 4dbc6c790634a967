"""Does MiniMoE lift the curse of capacity gap here? Distil students of several sizes, dense and MoE-4, from a
small and a larger teacher, with the same token budget for all; score them on held-out text and fine-tuned on
the offline tasks; tabulate and plot.

    make extra-assets tasks                                   # the MPNet teacher, the chat corpus, the tasks
    python experiments/capacity_gap/run.py --quick            # under 30 minutes on 2 CPU cores
    python experiments/capacity_gap/run.py                    # the full grid: hours on 2 cores; resumable

Built only on the public launchers: per teacher and distillation seed one ``launchers/sweep.py --students``
run, which distils every student from one teacher pass (``launchers/distill.py --students``, held-out text
scored every ``--eval_every`` steps) and fine-tunes each on every task and seed (``launchers/finetune.py``).
Run it again after an interruption: finished runs are kept, an interrupted distillation continues from its
last checkpoint. ``results.json``, ``results.md``, ``curse.png`` and ``heldout.png`` are written into the
output folder at the end (``--report_only`` writes them from what is there). ``results.json`` is the
complete record (held-out curves included): ``--reuse`` takes the teachers of an earlier one instead of
running them again.

Teachers: MiniLM-L6 (22.7M parameters) and MPNet-base (109.5M). Corpus:
``packaged:chat`` (15M words of English chat text, so the budget is read once, never repeated), 1% of its
conversations held out by a hash of their text. Students: 2L H128 and 3L H192 (``--quick``: 2L H128 only;
``--sizes s,m,l`` adds 4L H384), dense and MoE-4; with the small teacher also the ablations at 2L H128: random
and hash routers, no load-balance loss, and 2 and 8 experts.

Cost on 2 CPU cores, alone: the quick mode ran in 11 minutes (2026-12-01: MiniLM-L6 teacher and 2
students 1.0 s a step, MPNet-base 3.0 s; 8 fine-tuning runs of 25-40 s). The full grid (400 steps, 9 + 4
students, 3 fine-tuning seeds) is about 4 hours, more than a working session: on 2026-12-02 the MiniLM-L6
pass distilled its 9 students at 10.8 s a step alone (held-out scoring included: about 75 minutes), the
MPNet-base pass its 4 at 10.0 s (69 minutes); a fine-tuning run takes about 65 s (2L H128) to 2 minutes
(3L H192), so 54 and 24 of them about 70 and 37 minutes. Run it teacher by teacher: ``--teachers minilm``,
then ``--reuse <that results.json>``. A GPU runs ``--steps 20000 --sizes s,m,l --distill_seeds 776,777``.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from minimoe.config import ConfigError
from minimoe.flags import coerce

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

TEACHERS = {  # name: (--teacher, label); report.py counts their parameters from the checkpoints
    "minilm": ("packaged:all-MiniLM-L6-v2", "MiniLM-L6"),
    "mpnet": ("packaged:all-mpnet-base-v2", "MPNet-base"),
}
SIZES = {  # name: student flags (FFN 4H; heads of 64 dims)
    "s": dict(num_layers=2, hidden_size=128, num_heads=2, ffn_size=512),
    "m": dict(num_layers=3, hidden_size=192, num_heads=3, ffn_size=768),
    "l": dict(num_layers=4, hidden_size=384, num_heads=6, ffn_size=1536),
}
ABLATIONS = {  # at size s, small teacher: name -> what differs from moe4-s
    "random-s": dict(num_experts=4, router="random"),
    "hash-s": dict(num_experts=4, router="hash"),
    "nolb-s": dict(num_experts=4, load_balance_weight=0.0),
    "moe2-s": dict(num_experts=2),
    "moe8-s": dict(num_experts=8),
}
MODES = {  # steps of a global batch of 32 sequences of up to 128 tokens; fine-tuning seeds
    "quick": dict(sizes="s", steps=80, eval_every=40, eval_pairs=128, seeds="1", distill_seeds="776",
                  ablations=False),
    "full": dict(sizes="s,m", steps=400, eval_every=100, eval_pairs=256, seeds="1,2,3", distill_seeds="776",
                 ablations=True),
}
# Fine-tuning, the same for every student and both tasks. Students this small need a large rate and several
# epochs: at --lr 1e-4 for 2-3 epochs every 2L H128 student tagged no WNUT-16 entity (F1 0.0); at 1e-3 for 5
# epochs the quick mode's MoE-4 student reached F1 30.7 and sentiment 71.5 (56.3 before), 27 s and 40 s a run
# (experiments/finetune_demo/results/probes.json has the WNUT-16 probes). No early stopping: NER scores sit
# at 0.0 for the first epochs before they rise.
FINETUNE = "--lr 1e-3 --num_epochs 5 --patience 0 --max_seq_length 64 --micro_batch_size 32 --wandb disabled"


def students(sizes: list[str], ablations: bool) -> list[dict]:
    out = []
    for size in sizes:
        for kind, experts in (("dense", 1), ("moe4", 4)):
            out.append({"name": f"{kind}-{size}", **SIZES[size], "num_experts": experts})
    if ablations and "s" in sizes:
        out += [{"name": name, **SIZES["s"], **flags} for name, flags in ABLATIONS.items()]
    return out


def main(quick: bool = False, out: str = "", teachers: str = "minilm,mpnet", sizes: str = "", steps: int = 0,
         seeds: str = "", distill_seeds: str = "", ablations: bool | None = None, launcher: str = "python",
         report_only: bool = False, reuse: str = "", only: str = ""):
    """Run the experiment (see the module docstring).

    quick: the quick mode (2L H128 students, 80 steps, sentiment and WNUT-16 once); default the full grid.
    out: output folder (default experiments/capacity_gap/runs/<quick|full>).
    teachers / sizes / steps / seeds / distill_seeds / ablations: override the mode's choice
      (comma-separated).
    only: run only these students of the grid (comma-separated names, e.g. ``dense-s,moe4-s``); with
      ``--seeds 1,2,3,4,5`` over a finished grid, more fine-tuning seeds where the spread demands them (the
      report counts each student's runs).
    launcher: how each launcher run starts ('python', or 'deepspeed --num_gpus 8' on a GPU node).
    report_only: only (re)write results.json, results.md, curse.png and heldout.png from the runs that exist.
    reuse: an earlier results.json of the same budget and seeds (e.g. results/full/results.json): its teachers
      whose runs are not in the output folder are taken from it, not run again, and its students a teacher's
      runs lack stand beside them (``--teachers minilm --sizes m --ablations false`` runs 2 students again,
      ``--report_only --reuse`` reports them beside the rest of a 9-student report); so a grid can be
      finished teacher by teacher, or student by student, on another day or machine.
    """
    mode = dict(MODES["quick" if quick else "full"])
    for key, value in (("sizes", sizes), ("steps", steps), ("seeds", seeds),
                       ("distill_seeds", distill_seeds)):
        if value:  # fire reads "1,2,3" as a tuple
            mode[key] = int(value) if key == "steps" else ",".join(map(str, value)) if isinstance(
                value, (tuple, list)) else str(value)
    if ablations is not None:  # fire reads --noablations as False but "--ablations false" as the text
        try:
            mode["ablations"] = coerce("ablations", ablations, bool)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
    out = out or os.path.join(HERE, "runs", "quick" if quick else "full")
    names = _listed(teachers)
    for t in names:
        if t not in TEACHERS:
            raise SystemExit(f"error: --teachers: unknown teacher {t!r}; allowed {', '.join(TEACHERS)}")
    sizes_ = str(mode["sizes"]).split(",")
    dseeds = [s for s in str(mode["distill_seeds"]).split(",") if s]
    chosen = _listed(only)
    known = [st["name"] for st in students(sizes_, mode["ablations"])]
    for n in chosen:
        if n not in known:
            raise SystemExit(f"error: --only: no student {n!r} in this grid; allowed {', '.join(known)}")
    from report import from_runs, report, reusable
    reused = {t: rows for t, rows in (reusable(reuse, mode) if reuse else {}).items() if t in names}
    if not report_only:
        for t in from_runs(out, names, reused):
            grid = [st for st in students(sizes_, mode["ablations"] and t == "minilm")
                    if not chosen or st["name"] in chosen]
            for seed in dseeds if grid else []:
                _sweep(t, grid, seed, mode, os.path.join(out, t, f"seed{seed}"), launcher)
    print(report(out, names, dseeds, mode, reused))


def _listed(value) -> list[str]:
    """A comma-separated flag's items: fire hands "a,b" over as a tuple, "a" as the text."""
    return [str(v) for v in (value if isinstance(value, (tuple, list)) else str(value).split(",")) if str(v)]


def _sweep(teacher: str, grid: list[dict], seed: str, mode: dict, folder: str, launcher: str) -> None:
    os.makedirs(folder, exist_ok=True)
    spec = os.path.join(folder, "students.json")
    with open(spec, "w") as fh:
        json.dump(grid, fh, indent=1)
    distill = (f"--teacher {TEACHERS[teacher][0]} --data packaged:chat --streaming true --eval_fraction 0.01 "
               f"--eval_pairs {mode['eval_pairs']} "
               f"--eval_every {mode['eval_every']} --max_steps {mode['steps']} --global_batch 32 "
               f"--micro_batch_size 32 --max_seq_length 128 --seed {seed} --save_every {mode['eval_every']} "
               "--log_every 10 --wandb disabled")
    cmd = [sys.executable, os.path.join(REPO, "launchers", "sweep.py"), "--students", spec,
           f"--distill_extra={distill}", "--tasks", "sentiment,wnut16", "--seeds", mode["seeds"],
           "--output_dir", folder, f"--extra={FINETUNE}", "--launcher", launcher]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    code = subprocess.run(cmd).returncode
    if code:
        raise SystemExit(f"error: the sweep for teacher {teacher} (seed {seed}) failed with exit code "
                         f"{code} (its error is above); run the experiment again to continue")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    import fire
    fire.Fire(main)
