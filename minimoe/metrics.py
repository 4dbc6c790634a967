"""Task metrics, as GLUE and conlleval report them: pure functions of predictions and labels.

accuracy (SST-2, QNLI, RTE, MNLI), F1 of the positive class + accuracy (MRPC, QQP), Pearson and
Spearman (STS-B), Matthews correlation (CoLA), entity-level micro F1 (CoNLL-2003, WNUT), with chunks
read by conlleval's rules so IOB1 and IOB2 tags both work.
"""
from __future__ import annotations

import math
from typing import Sequence


def accuracy(pred: Sequence, gold: Sequence) -> float:
    _same_length(pred, gold)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def binary_f1(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    _same_length(pred, gold)
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    _same_length(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    vx = sum((a - mx) ** 2 for a in x)
    vy = sum((b - my) ** 2 for b in y)
    return cov / math.sqrt(vx * vy) if vx and vy else 0.0


def _ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as scipy.stats.spearmanr)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


def matthews(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation for binary labels (CoLA)."""
    _same_length(pred, gold)
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def _split(tag: str) -> tuple[str, str]:
    if tag in ("O", "", None):
        return "O", ""
    prefix, _, typ = tag.partition("-")
    return (prefix, typ) if typ else ("I", prefix)  # a bare type reads as inside (IOB1 data sometimes)


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end_exclusive) chunks by conlleval's rules: a chunk starts at B-X, or at I-X after
    O or another type (IOB1), and ends before O, B-*, or a tag of another type."""
    chunks, start, typ = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, t = _split(tag)
        ends = start is not None and (prefix in ("O", "B") or t != typ)
        if ends:
            chunks.add((typ, start, i))
            start = None
        if prefix != "O" and (prefix == "B" or start is None):
            start, typ = i, t
    return chunks


def entity_f1(pred: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict:
    """Micro precision / recall / F1 over entities of all sentences (conlleval's overall line)."""
    _same_length(pred, gold)
    tp = n_pred = n_gold = 0
    for p, g in zip(pred, gold):
        if len(p) != len(g):
            raise ValueError(f"a sentence has {len(p)} predicted tags for {len(g)} gold tags")
        ep, eg = entities(p), entities(g)
        tp += len(ep & eg)
        n_pred += len(ep)
        n_gold += len(eg)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} labels")
    if not len(b):
        raise ValueError("no examples to score")
