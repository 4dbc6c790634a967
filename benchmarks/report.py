"""What every benchmark ends with: its result as JSON at ``--out`` and, beside it, the script's plot (PNG)."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional


def save(result: dict, out: str, plot: Optional[Callable[[dict, str], None]] = None) -> None:
    """``result`` to ``out`` (folders made), then ``plot(result, <out without .json>.png)``."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    if plot is not None:
        plot(result, os.path.splitext(out)[0] + ".png")
    print(f"wrote {out}")


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display on a server)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
