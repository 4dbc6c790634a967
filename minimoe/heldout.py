"""The held-out distillation loss: how well each student matches the teacher on text it never trained on.

The training loss reads the training stream with dropout and gate noise on; with a small corpus repeated
for epochs it mostly measures how well the students fit that stream. This scores every student, every
``--eval_every`` steps and at the end, on a fixed set of pairs from held-out documents (``--eval_data``,
or the ``--eval_fraction`` of ``--data`` that ``corpus.held_out`` keeps out of training), with dropout,
gate noise and relation dropout off: the relation KL per Q-Q, K-K, V-V and their mean (the training
loss's relation term), and per MoE layer the experts' share of the tokens, the busiest expert's load and
the routing entropy.

The teacher's forward on each held-out batch runs once for all students. Every rank scores its share of
the batches and runs the same number of forwards (the teacher's ZeRO-3 gathers and the experts'
all-to-alls need it): a rank short of a batch repeats one with weight 0. Evaluation draws no random
number and restores the RNG state anyway, so a run with it trains exactly as one without it.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .config import ConfigError
from .data import corpus as corpus_lib, readers
from .data.batches import collate
from .losses import relation_kl

PAIR_SEED = 0  # held-out pairs do not depend on the run's seed: runs of any seed score the same text
KINDS = ("qq", "kk", "vv")


@dataclass
class HeldOutSet:
    examples: list                  # (input_ids, token_type_ids) pairs
    source: str                     # what they were taken from, for summaries and cards

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.examples)


def build(data: str, eval_data: str, eval_fraction: float, text_column: str, tokenizer, max_seq_length: int,
          short_seq_prob: float, recipe: str, max_pairs: int) -> HeldOutSet | None:
    """The first ``max_pairs`` pairs of the held-out documents (``None`` without a held-out source). Only as
    many documents are read and tokenised as those pairs need."""
    if not eval_data and eval_fraction <= 0:
        return None
    template = corpus_lib.PairTemplate.from_tokenizer(tokenizer)
    if eval_data:
        docs, source = readers.iter_documents(eval_data, text_column), f"--eval_data {eval_data}"
    else:
        docs = corpus_lib.select_documents(readers.iter_documents(data, text_column), eval_fraction, "eval")
        source = f"{eval_fraction:g} of --data {data} (documents held out of training)"
    pairs = corpus_lib.iter_examples(docs, tokenizer, template, max_seq_length, short_seq_prob, PAIR_SEED,
                                     recipe=recipe)
    examples = list(itertools.islice(pairs, max_pairs))
    if not examples:
        flag = (f"--eval_data {eval_data!r}" if eval_data
                else f"--eval_fraction {eval_fraction} of --data {data!r}")
        raise ConfigError(f"{flag} gave no held-out pairs (no document, or documents of < 2 tokens); "
                          "give more text or a larger --eval_fraction")
    return HeldOutSet(examples, source)


class HeldOutLoss:
    """Scores members on this rank's share of a ``HeldOutSet`` (see the module docstring)."""

    def __init__(self, held: HeldOutSet, micro_batch: int, rank: int, world_size: int, pad_id: int, dev):
        batches = [held.examples[i:i + micro_batch] for i in range(0, len(held.examples), micro_batch)]
        per_rank = math.ceil(len(batches) / world_size)
        mine = batches[rank::world_size]
        # (batch, weight): a rank short of batches repeats its first (or the set's first) with weight 0
        self.batches = [(collate(b, pad_id), 1.0) for b in mine]
        self.batches += [(collate((mine or batches)[0], pad_id), 0.0)] * (per_rank - len(mine))
        self.dev = dev
        self.held = held

    @torch.no_grad()
    def evaluate(self, members, teacher) -> list[dict]:
        """Per member: ``relation`` (mean of Q-Q, K-K, V-V), ``qq``/``kk``/``vv`` and, for MoE students,
        ``experts`` (per layer: share, max_load, entropy) and the layers' mean ``routing_entropy``."""
        import torch.distributed as dist
        devices = [torch.cuda.current_device()] if self.dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            modes = [m.engine.module.training for m in members]
            for m in members:
                m.engine.eval()
            try:
                sums, counts = self._accumulate(members, teacher)
            finally:
                for m, mode in zip(members, modes):
                    m.engine.train(mode)
        out = []
        for m, s, c in zip(members, sums, counts):
            dist.all_reduce(s)
            tokens = float(s[-1])
            scores = {k: float(v) / tokens for k, v in zip(KINDS, s[:3])}
            scores["relation"] = sum(scores[k] for k in KINDS) / len(KINDS)
            if c is not None:
                dist.all_reduce(c)
                scores.update(routing(c))
            out.append(scores)
        return out

    def _accumulate(self, members, teacher):
        sums = [torch.zeros(4, dtype=torch.float64) for _ in members]
        counts = [None] * len(members)
        for batch, weight in self.batches:
            batch = {k: v.to(self.dev) for k, v in batch.items()}
            mask = batch["attention_mask"]
            t_qkv = teacher.qkv(batch)
            tokens = float(mask.sum()) * weight
            for i, m in enumerate(members):
                out = m.engine(batch["input_ids"], mask, batch["token_type_ids"], output_qkv=True)
                heads = m.cfg.relation_heads
                if weight:  # a repeat batch (a rank short of one) runs the forwards for the collectives only
                    for k, (t, s) in enumerate(zip(t_qkv, out.qkv)):
                        sums[i][k] += float(relation_kl((t,), (s,), mask, heads)) * tokens
                sums[i][3] += tokens
                if out.expert_counts:
                    c = torch.stack([x.float().cpu() for x in out.expert_counts]).double() * weight
                    counts[i] = c if counts[i] is None else counts[i] + c
        return sums, counts


def routing(counts: torch.Tensor) -> dict:
    """From [layers, E] token counts: per layer the experts' shares, the busiest expert's load relative to a
    perfect balance (1 = balanced, E = one expert takes all) and the entropy of the shares over log E (1 =
    balanced, 0 = one expert); ``routing_entropy`` and ``max_load`` over the layers (mean, max)."""
    share = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    e = counts.shape[-1]
    entropy = -(share * share.clamp(min=1e-12).log()).sum(-1) / math.log(e)
    max_load = share.max(-1).values * e
    layers = {f"layer{i}": {"share": [round(float(x), 4) for x in share[i]], "max_load": float(max_load[i]),
                            "entropy": float(entropy[i])} for i in range(counts.shape[0])}
    return {"routing_entropy": float(entropy.mean()), "max_load": float(max_load.max()), "experts": layers}
