"""Pictures of a run, written next to its metrics (matplotlib, no display needed)."""
from __future__ import annotations

import json
import os


def relation_curves(metrics_path: str, out_png: str, title: str) -> bool:
    """The relation loss over the steps of a distillation's ``metrics.jsonl``: the training loss (dropout and
    gate noise on) and, where the run scored held-out text, the held-out loss (off). False when there is
    nothing to draw."""
    train, held = [], []
    if not os.path.isfile(metrics_path):
        return False
    with open(metrics_path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:  # a row cut short by a kill
                continue
            if "relation" in row:
                train.append((row["step"], row["relation"]))
            if "heldout_relation" in row:
                held.append((row["step"], row["heldout_relation"]))
    if not train and not held:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for points, label, style in ((train, "training (dropout, gate noise on)", "-"),
                                 (held, "held-out (off)", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("relation KL (mean of Q-Q, K-K, V-V)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True
