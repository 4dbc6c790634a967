"""Per-rank micro-batches, from the cached corpus (random access) or from a stream.

Both give ``micro_batches(step)``: the ``grad_accum`` micro-batches a rank feeds at global optimizer
step ``step``. Every rank runs the same number of steps (expert-parallel all-to-alls need it).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from ..config import ConfigError
from .corpus import TokenizedCorpus


def collate(examples: list[tuple], pad_id: int, pad_to: Optional[int] = None) -> dict:
    """(ids, types) pairs -> padded ``input_ids``, ``attention_mask``, ``token_type_ids`` (long)."""
    length = pad_to or max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(examples), length), dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, types) in enumerate(examples):
        n = len(ids)
        input_ids[row, :n] = torch.as_tensor(ids)
        token_type_ids[row, :n] = torch.as_tensor(types)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


@dataclass
class GlobalBatches:
    """One global order per epoch; global batch ``g`` of an epoch is split over ranks and micro-steps.

    A rank's micro-batch ``m`` of global step ``s`` holds the samples
    ``perm[s*G + (m*W + r)*B : ... + B]`` with G = B*A*W. The data position of a run is just the
    global step, and with the same global batch it means the same samples on any world size.
    """

    corpus: TokenizedCorpus
    micro_batch: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int
    pad_id: int
    _perm: Optional[tuple] = field(default=None, repr=False)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.corpus) // self.global_batch

    def total_steps(self, max_steps: int, num_epochs: float, what: str) -> int:
        """The run's optimizer steps: ``max_steps``, or ``num_epochs`` passes when it is -1. ``what`` names
        the data in the error raised when it holds less than one global batch."""
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{what}: {len(self.corpus)} examples are fewer than one global batch of "
                              f"{self.global_batch}; lower --micro_batch_size or add data")
        return max_steps if max_steps > 0 else math.ceil(num_epochs * self.steps_per_epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.corpus), generator=g))
        return self._perm[1]

    def indices(self, step: int) -> list[list[int]]:
        """The example indices of this rank's ``grad_accum`` micro-batches at global step ``step``."""
        epoch, s = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        out = []
        for m in range(self.grad_accum):
            start = s * self.global_batch + (m * self.world_size + self.rank) * self.micro_batch
            out.append(perm[start:start + self.micro_batch].tolist())
        return out

    def micro_batches(self, step: int) -> list[dict]:
        return [collate([self.corpus.example(i) for i in idx], self.pad_id) for idx in self.indices(step)]


class StreamingBatches:
    """Micro-batches from a document stream, tokenised on the fly: for corpora larger than memory.

    Documents are dealt round-robin to ranks (document ``i`` to rank ``i % W``); each rank packs its
    own segment pairs, shuffles them in a seeded buffer and restarts its stream (next epoch, new
    shuffle) when it runs dry, so every rank can always run the next step. The position is the step:
    a resume replays the stream up to it (exact for the same world size and batch sizes).
    """

    def __init__(self, make_examples: Callable[[int, int, int], Iterator[tuple]], micro_batch: int,
                 grad_accum: int, world_size: int, rank: int, seed: int, pad_id: int,
                 shuffle_buffer: int = 10_000):
        self.make_examples = make_examples  # (epoch, rank, world_size) -> iterator of (ids, types)
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.world_size, self.rank, self.seed, self.pad_id = world_size, rank, seed, pad_id
        self.shuffle_buffer = shuffle_buffer
        self._epoch, self._next_step, self._it = 0, 0, None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def _examples(self) -> Iterator[tuple]:
        while True:
            rng = random.Random(self.seed * 1_000_003 + self._epoch * 7919 + self.rank)
            buf, produced = [], 0
            for ex in self.make_examples(self._epoch, self.rank, self.world_size):
                produced += 1
                if len(buf) < self.shuffle_buffer:
                    buf.append(ex)
                    continue
                j = rng.randrange(len(buf))
                buf[j], ex = ex, buf[j]
                yield ex
            rng.shuffle(buf)
            yield from buf
            if produced == 0:
                raise ConfigError(f"rank {self.rank} got no training pairs from the stream "
                                  f"(fewer documents than the {self.world_size} ranks?)")
            self._epoch += 1

    def micro_batches(self, step: int) -> list[dict]:
        if self._it is None:
            self._it = self._examples()
            for _ in range(step * self.grad_accum * self.micro_batch):  # resume: replay up to ``step``
                next(self._it)
            self._next_step = step
        if step != self._next_step:
            raise RuntimeError(f"a stream is read in order: asked for step {step}, next is {self._next_step}")
        self._next_step += 1
        return [collate([next(self._it) for _ in range(self.micro_batch)], self.pad_id)
                for _ in range(self.grad_accum)]
