"""Task evaluation: task examples -> token ids and padded batches, predictions and their scores.

``encode`` tokenises a split once, ``collate`` pads a batch of it, ``predict`` runs a model over a split
(on every rank at once, the predictions gathered) and ``evaluate`` scores each dev split. The fine-tuning
loop (finetune.py) evaluates with them every ``eval_every`` steps; ``evaluate_folder`` scores a fine-tuned
model folder in one process (launchers/evaluate.py).
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from .data.tasks import Task, get_task, load_split, offline_dir
from .heads import check_positions, load_task_model, tokenizer_folder, tokenizer_for

# The label of positions no loss or score reads (NER's non-first WordPieces, padding): torch's
# cross_entropy ignore_index default, and how predict finds each word's first WordPiece.
IGNORE = -100


# ---------------------------------------------------------------------- data


def encode(task: Task, examples: list[dict], tokenizer, max_len: int) -> list[dict]:
    """Tokenise once. NER labels sit on each word's first WordPiece (``IGNORE`` elsewhere); ``words``
    maps those positions back to word indices, so predictions are scored on the original words."""
    if task.kind == "ner":
        enc = tokenizer([ex["tokens"] for ex in examples], is_split_into_words=True, truncation=True,
                        max_length=max_len, return_token_type_ids=True)
        tag_id = {t: i for i, t in enumerate(task.labels)}
        out = []
        for i, ex in enumerate(examples):
            labels, words, prev = [], [], None
            for w in enc.word_ids(i):
                first = w is not None and w != prev
                labels.append(tag_id[ex["tags"][w]] if first else IGNORE)
                if first:
                    words.append(w)
                prev = w
            out.append({"ids": enc["input_ids"][i], "types": enc["token_type_ids"][i], "label": labels,
                        "words": words, "gold": ex["tags"]})
        return out
    pairs = [ex["text_pair"] for ex in examples] if examples[0]["text_pair"] is not None else None
    enc = tokenizer([ex["text"] for ex in examples], pairs, truncation=True, max_length=max_len,
                    return_token_type_ids=True)
    return [{"ids": enc["input_ids"][i], "types": enc["token_type_ids"][i], "label": ex["label"],
             "gold": ex["label"]}
            for i, ex in enumerate(examples)]


def collate(batch: list[dict], pad_id: int, kind: str, dev) -> dict:
    length = max(len(ex["ids"]) for ex in batch)
    out = {"input_ids": torch.full((len(batch), length), pad_id, dtype=torch.long),
           "token_type_ids": torch.zeros((len(batch), length), dtype=torch.long),
           "attention_mask": torch.zeros((len(batch), length), dtype=torch.long)}
    for r, ex in enumerate(batch):
        n = len(ex["ids"])
        out["input_ids"][r, :n] = torch.tensor(ex["ids"])
        out["token_type_ids"][r, :n] = torch.tensor(ex["types"])
        out["attention_mask"][r, :n] = 1
    if kind == "ner":
        labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
        for r, ex in enumerate(batch):
            labels[r, :len(ex["label"])] = torch.tensor(ex["label"])
    else:
        labels = torch.tensor([ex["label"] for ex in batch],
                              dtype=torch.float if kind == "regression" else torch.long)
    out["labels"] = labels
    return {k: v.to(dev) for k, v in out.items()}


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(engine, task: Task, data: list[dict], micro: int, rank: int, world: int, pad_id: int,
            dev) -> list:
    """Predictions for every example, the same list on every rank.

    Each rank runs the same number of batches (expert-parallel all-to-alls need every rank to take part):
    its share of the examples is padded with repeats of its last one, whose predictions are dropped.
    """
    mine = list(range(rank, len(data), world))
    per_rank = math.ceil(len(data) / world)
    padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
    was_training = engine.training
    engine.eval()
    preds = []
    for s in range(0, per_rank, micro):
        idx = padded[s:s + micro]
        batch = collate([data[i] for i in idx], pad_id, task.kind, dev)
        logits, _ = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = logits.float().cpu()
        for j, i in enumerate(idx):
            if s + j >= len(mine):
                continue
            if task.kind == "regression":
                preds.append((i, float(logits[j, 0])))
            elif task.kind == "classification":
                preds.append((i, int(logits[j].argmax())))
            else:
                ex = data[i]
                first = (batch["labels"][j] != IGNORE).nonzero().flatten().cpu()
                tags = ["O"] * len(ex["gold"])
                for w, pos in zip(ex["words"], first.tolist()):
                    tags[w] = task.labels[int(logits[j, pos].argmax())]
                preds.append((i, tags))
    engine.train(was_training)
    gathered = [preds]
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, preds)
    by_index = dict(p for part in gathered for p in part)
    return [by_index[i] for i in range(len(data))]


def evaluate(engine, task: Task, splits: dict, micro: int, rank: int, world: int, pad_id: int, dev) -> dict:
    return {name: task.score(predict(engine, task, data, micro, rank, world, pad_id, dev),
                             [ex["gold"] for ex in data])
            for name, data in splits.items()}


def evaluate_folder(folder: str, split: str, data_dir, max_len: int, batch_size: int) -> dict:
    """Score a fine-tuned model folder on one split in this process (no process group needed)."""
    model, meta = load_task_model(folder)
    check_positions(model.encoder.config, max_len, f"--model {folder!r}")
    task = get_task(meta["task"])
    tok = tokenizer_for(tokenizer_folder(folder))
    if data_dir is None and task.hub is None:
        data_dir = offline_dir(task)
    hub_split = {"dev": task.dev_splits[0]}.get(split, split) if data_dir is None else split
    data = encode(task, load_split(task, hub_split, data_dir), tok, max_len)
    t = time.perf_counter()
    scores = task.score(predict(model, task, data, batch_size, 0, 1, tok.pad_token_id, torch.device("cpu")),
                        [ex["gold"] for ex in data])
    return {"task": task.name, "model": folder, "split": split, "examples": len(data), "scores": scores,
            "main_metric": task.main_metric, "seconds": time.perf_counter() - t}
