"""Task-specific data: GLUE, CoNLL-2003, and two offline real tasks (movie-review sentiment, WNUT-16 NER).

A task reads from local files when ``--data DIR`` is given (the GLUE TSV layout, CoNLL's column format)
and from the ``datasets`` hub otherwise. Every reader returns plain examples:
``{"text": str, "text_pair": str | None, "label": int | float}`` for sentence tasks and
``{"tokens": [str], "tags": [str]}`` for NER.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError
from ..config.base import REPO
from ..errors import reading
from .. import metrics as M


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                                  # "classification", "regression" or "ner"
    labels: tuple = ()                         # label names (classification, NER); () for regression
    text_fields: tuple = ("sentence",)         # hub columns (one or two texts)
    hub: Optional[tuple] = None                # datasets.load_dataset args
    dev_splits: tuple = ("validation",)
    tsv_columns: tuple = ()                    # GLUE TSV: (text, text_pair or None, label) column names
    main_metric: str = "accuracy"

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels)

    def score(self, pred: list, gold: list) -> dict:
        if self.kind == "ner":
            return {f"entity_{k}": v for k, v in M.entity_f1(pred, gold).items()}
        if self.kind == "regression":
            return {"pearson": M.pearson(pred, gold), "spearman": M.spearman(pred, gold)}
        out = {"accuracy": M.accuracy(pred, gold)}
        if self.main_metric == "f1":
            out["f1"] = M.binary_f1(pred, gold)
        if self.main_metric == "matthews":
            out["matthews"] = M.matthews(pred, gold)
        return out


BIN = ("0", "1")
GLUE = "nyu-mll/glue"  # the hub's current name of GLUE ("glue" is a redirect left by the move)
CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
WNUT_TYPES = ("company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product",
              "sportsteam", "tvshow")
WNUT_TAGS = ("O",) + tuple(f"{p}-{t}" for t in WNUT_TYPES for p in ("B", "I"))

TASKS = {t.name: t for t in [
    Task("sst2", "classification", BIN, ("sentence",), (GLUE, "sst2"),
         tsv_columns=("sentence", None, "label")),
    Task("mrpc", "classification", BIN, ("sentence1", "sentence2"), (GLUE, "mrpc"),
         tsv_columns=("#1 String", "#2 String", "Quality"), main_metric="f1"),
    Task("stsb", "regression", (), ("sentence1", "sentence2"), (GLUE, "stsb"),
         tsv_columns=("sentence1", "sentence2", "score"), main_metric="pearson"),
    Task("qqp", "classification", BIN, ("question1", "question2"), (GLUE, "qqp"),
         tsv_columns=("question1", "question2", "is_duplicate"), main_metric="f1"),
    Task("mnli", "classification", ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
         (GLUE, "mnli"), ("validation_matched", "validation_mismatched"),
         tsv_columns=("sentence1", "sentence2", "gold_label")),
    Task("qnli", "classification", ("entailment", "not_entailment"), ("question", "sentence"), (GLUE, "qnli"),
         tsv_columns=("question", "sentence", "label")),
    Task("rte", "classification", ("entailment", "not_entailment"), ("sentence1", "sentence2"), (GLUE, "rte"),
         tsv_columns=("sentence1", "sentence2", "label")),
    Task("cola", "classification", BIN, ("sentence",), (GLUE, "cola"), tsv_columns=(3, None, 1),
         main_metric="matthews"),
    Task("conll2003", "ner", CONLL_TAGS, hub=("conll2003",), main_metric="entity_f1"),
    # Offline real tasks, prepared from PyPI packages by `make tasks` (minimoe.data.prepare_tasks).
    Task("sentiment", "classification", BIN, tsv_columns=("sentence", None, "label")),
    Task("wnut16", "ner", WNUT_TAGS, main_metric="entity_f1"),
]}

OFFLINE_TASKS = ("sentiment", "wnut16")
# In the minimoe checkout, as ds_configs/ is (config.base.REPO): `make tasks` writes there, and a run started
# from another folder must find it.
DEFAULT_TASK_DIR = os.path.join(REPO, "data", "tasks")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"--task {name!r} is unknown; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def offline_dir(task: Task) -> str:
    """Where `make tasks` puts an offline task."""
    path = os.path.join(DEFAULT_TASK_DIR, task.name)
    if not os.path.isdir(path):
        raise ConfigError(f"task {task.name} is prepared offline and {path!r} is not there: run `make tasks` "
                          "or pass --data DIR")
    return path


def split_file(task: Task, data_dir: str, split: str) -> str:
    """The local file of ``split`` ('train', 'dev', 'test', or MNLI's 'dev_matched'/'dev_mismatched')."""
    ext = ".txt" if task.kind == "ner" else ".tsv"
    path = os.path.join(data_dir, split + ext)
    if not os.path.isfile(path):
        raise ConfigError(f"--data {data_dir!r} has no {split + ext} for task {task.name}")
    return path


def dev_split_names(task: Task, local: bool) -> list[str]:
    if not local:
        return list(task.dev_splits)
    return ["dev_matched", "dev_mismatched"] if task.name == "mnli" else ["dev"]


def load_split(task: Task, split: str, data_dir: Optional[str]) -> list[dict]:
    """Examples of one split from ``data_dir`` (local layout) or the hub (split names as on the hub)."""
    if data_dir is None and task.hub is None:
        data_dir = offline_dir(task)
    if data_dir is not None:
        path = split_file(task, data_dir, split)
        with reading(path, "; re-create the task files (make tasks, or your own export)"):
            examples = read_conll(path) if task.kind == "ner" else read_tsv(task, path)
    else:
        examples = _hub_split(task, split)
    if not examples:
        raise ConfigError(f"task {task.name}: split {split!r} is empty")
    _check_labels(task, examples, split)
    return examples


def _check_labels(task: Task, examples: list[dict], split: str) -> None:
    if task.kind == "ner":
        seen = {t for ex in examples for t in ex["tags"]}
        unknown = sorted(seen - set(task.labels))
        if unknown:
            raise ConfigError(f"task {task.name}: {split} has tags {unknown[:5]} outside the label set "
                              f"{list(task.labels)}")
    elif task.kind == "classification":
        bad = sorted({ex["label"] for ex in examples if not 0 <= ex["label"] < task.num_labels})
        if bad:
            raise ConfigError(f"task {task.name}: {split} has labels {bad[:5]}; "
                              f"allowed 0..{task.num_labels - 1}")


def read_tsv(task: Task, path: str) -> list[dict]:
    """GLUE's TSV layout: a header row naming the columns (CoLA has none: columns by index)."""
    a, b, y = task.tsv_columns
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = None if isinstance(a, int) else next(reader, None)
        cols = {name: i for i, name in enumerate(header or [])}
        for name in (a, b, y):
            if name is not None and header is not None and name not in cols:
                raise ConfigError(f"{path}: no column {name!r} (found {header})")
        idx = (lambda c: c) if header is None else cols.__getitem__
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                label = row[idx(y)]
                rows.append({"text": row[idx(a)], "text_pair": row[idx(b)] if b is not None else None,
                             "label": _label(task, label)})
            except (IndexError, ValueError):
                raise ConfigError(f"{path} line {n}: cannot read a {task.name} example from {row[:4]}")
    return rows


def _label(task: Task, raw: str):
    if task.kind == "regression":
        return float(raw)
    if raw in task.labels:
        return task.labels.index(raw)
    return int(raw)


def read_conll(path: str) -> list[dict]:
    """CoNLL column format: one token per line, the tag in the last column, blank line between sentences."""
    sents, tokens, tags = [], [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.strip().split()
            if not parts or parts[0] == "-DOCSTART-":
                if tokens:
                    sents.append({"tokens": tokens, "tags": tags})
                    tokens, tags = [], []
                continue
            if len(parts) < 2:
                raise ConfigError(f"{path}: line {line.strip()!r} has no tag column")
            tokens.append(parts[0])
            tags.append(parts[-1])
    if tokens:
        sents.append({"tokens": tokens, "tags": tags})
    return sents


def _hub_split(task: Task, split: str) -> list[dict]:
    import datasets
    try:
        ds = datasets.load_dataset(*task.hub, split=split)
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise ConfigError(f"task {task.name}: cannot load {task.hub} split {split!r} from the hub "
                          f"({str(e).splitlines()[0]}); pass --data DIR with local files")
    if task.kind == "ner":
        names = ds.features["ner_tags"].feature.names
        return [{"tokens": r["tokens"], "tags": [names[t] for t in r["ner_tags"]]} for r in ds]
    a, b = (task.text_fields + (None,))[:2]
    return [{"text": r[a], "text_pair": r[b] if b else None, "label": r["label"]} for r in ds]
