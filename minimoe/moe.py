"""Minimal experts on DeepSpeed MoE: the paper's top-1 gate, the expert FFN, and the "moefy" init.

DeepSpeed's ``MoE`` layer gives us expert parallelism (all-to-all dispatch over ``ep_size`` ranks,
per-expert checkpoint files, MoE-aware optimizer groups). Where the paper differs from DeepSpeed's
defaults we follow the paper and say so:

* gate: ``Linear(H, E)`` *with bias*; in training, uniform noise U(-eps, eps) is added to the logits
  (DeepSpeed's gate has no bias and offers only multiplicative jitter or Gumbel noise);
* dropless routing by default (DeepSpeed drops tokens past ``capacity_factor``);
* padding tokens are masked out of routing and out of the load-balance statistics (DeepSpeed
  divides its balance terms by all tokens, padding included);
* no random token selection: when dropping, an expert keeps its tokens first come, first served.

The gate also computes the expert *capacity* itself (``agreed_capacity``) instead of DeepSpeed's
``top1gating``: every rank of an expert-parallel group must enter the all-to-all with ``[E, C, H]``
buffers of one ``C``, and DeepSpeed 0.19 derives ``C`` from the local token count (a bug when ranks
hold micro-batches of different lengths, see ``docs/upstream/deepspeed-top1-capacity.md``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from .dropout import Dropout
from .experts import StackedExperts, ffn


class ExpertFFN(nn.Module):
    """One minimal expert: the dense student's FFN, ``H -> F -> H`` with GELU and output dropout."""

    def __init__(self, hidden_size: int, ffn_size: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_size)
        self.fc2 = nn.Linear(ffn_size, hidden_size)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.dropout)


class Top1(NamedTuple):
    """One top-1 routing decision for ``S`` tokens."""

    prob: torch.Tensor      # [S] fp32, the chosen expert's gate probability (carries the gate's gradient)
    expert: torch.Tensor    # [S] long, the chosen expert; ``E`` for a token that is not routed (padding)
    counts: torch.Tensor    # [E] long, routed tokens per expert on this rank


def top1(logits: torch.Tensor, used: Optional[torch.Tensor]) -> Top1:
    """Top-1 of the softmax; tokens with ``used == 0`` get the out-of-range expert ``E``."""
    num_experts = logits.shape[-1]
    prob, expert = F.softmax(logits, dim=-1).max(dim=-1)
    if used is not None:
        expert = expert.masked_fill(~used.bool(), num_experts)
    counts = torch.bincount(expert, minlength=num_experts + 1)[:num_experts]
    return Top1(prob, expert, counts)


def fixed_top1(expert: torch.Tensor, used: Optional[torch.Tensor], num_experts: int) -> Top1:
    """A routing decided without a gate (``fixed_route``): every chosen expert's output has weight 1."""
    if used is not None:
        expert = expert.masked_fill(~used.bool(), num_experts)
    counts = torch.bincount(expert, minlength=num_experts + 1)[:num_experts]
    return Top1(torch.ones(expert.shape, device=expert.device), expert, counts)


_MASK32 = 1 << 32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, two rounds: every output bit depends on every input bit) of
    int64 values in [0, 2^32). Shifts are floor divisions and no product exceeds 2^59, so torch, the exported
    remote code and an ONNX graph (Div, Mul, Mod, BitwiseXor) compute the same integers."""
    for _ in range(2):
        x = (torch.bitwise_xor(x // 65536, x) * 0x45D9F3B) % _MASK32
    return torch.bitwise_xor(x // 65536, x)


def fixed_route(router: str, token_ids: torch.Tensor, layer: int, num_experts: int, seed: int = 0,
                salt: int = 0) -> torch.Tensor:
    """The expert of every token of ``token_ids`` [B, L] (flattened) under a router without a gate.

    ``hash``: a fixed function of the token id (and the layer), as in Hash Layers (Roller et al., 2021): every
    occurrence of a token, on any rank, in training and at inference, goes to the same expert. ``random``: a
    uniformly random expert per token occurrence (token id, position, layer), drawn from ``seed`` and ``salt``
    (the student's training forward count, so each step draws anew; 0 at inference), again the same on every
    rank and in every process. Both are integer hashes: no random generator is touched.
    """
    ids = token_ids.long()
    key = ids * 0x9E3779B1 + (layer + 1) * 0x85EBCA6B
    if router == "random":
        pos = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        key = key + pos * 0xC2B2AE35 + (seed * 0x27D4EB2F + salt * 0x165667B1) % _MASK32
    elif router != "hash":
        raise ValueError(f"router {router!r} has a gate; fixed_route serves 'random' and 'hash'")
    return _mix32(key.reshape(-1) % _MASK32) % num_experts


def agreed_capacity(counts: torch.Tensor, routed_tokens: torch.Tensor, drop_tokens: bool,
                    capacity_factor: float, min_capacity: int, group=None) -> int:
    """Rows per expert in the dispatch buffer, the same on every rank of ``group`` by construction.

    Dropless: the busiest expert's token count on the busiest rank. Dropping: ``capacity_factor`` x
    the even share of the busiest rank's routed tokens (at least ``min_capacity``). Both come from one
    MAX all-reduce of two integers, so ranks whose micro-batches differ in length (or padding) still
    exchange buffers of one size. At least 1: an all-to-all of empty buffers is a corner we avoid.
    """
    need = torch.stack([counts.max(), routed_tokens.to(counts.dtype)])
    if group is not None and dist.get_world_size(group=group) > 1:
        dist.all_reduce(need, op=dist.ReduceOp.MAX, group=group)
    busiest_expert, busiest_rank = need.tolist()
    if not drop_tokens:
        return max(busiest_expert, 1)
    return max(math.ceil(busiest_rank / counts.numel() * capacity_factor), min_capacity, 1)


# oneDNN, which runs bf16/fp16 matmuls on CPU, compiles a kernel for every new shape (4.0 ms for a
# [M, 1536] x [1536, 384] bf16 matmul, then 0.7 ms for each call of a shape it has seen:
# benchmarks/kernels.py). Top-1 routing gives every expert a new token count each step, so each expert matmul
# would compile: rows are padded to few distinct counts instead (a multiple of 64, or of 1/8 of the count's
# power of two: at most 12.5% more rows, 8 counts per octave). fp32 on CPU (MKL) and CUDA matmuls do not
# compile per shape.
ROW_BUCKET = 64


def bucketed_rows(n: int) -> int:
    """``n`` rounded up to one of few row counts (see ``ROW_BUCKET``)."""
    step = max(ROW_BUCKET, 1 << max(n.bit_length() - 4, 0))
    return -(-n // step) * step


def compiles_per_shape(x: torch.Tensor) -> bool:
    """Whether a matmul on ``x`` goes to a per-shape compiled kernel (oneDNN: half precision on CPU)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def dispatch_routes(choice: Top1, capacity: int):
    """DeepSpeed's sparse routes: per token its expert (-1: dropped or not routed), its row in that
    expert's buffer, and its combine weight. Rows are given first come, first served."""
    num_experts = choice.counts.numel()
    one_hot = F.one_hot(choice.expert, num_experts + 1)[:, :num_experts]
    row = (one_hot.cumsum(0) * one_hot).sum(-1) - 1           # -1 for tokens that are not routed
    keep = (row >= 0) & (row < capacity)
    indices = torch.where(keep, choice.expert, -1)
    weights = choice.prob * keep
    return (indices.to(torch.int32).unsqueeze(0), row.clamp(min=0).to(torch.int32).unsqueeze(0),
            weights.unsqueeze(0))


class NoisyTop1Gate(TopKGate):
    """The paper's gate: biased linear logits + additive uniform noise in training, top-1 of softmax.

    Returns what DeepSpeed's ``MOELayer`` (0.19) expects of a gate asked for sparse routes:
    ``(l_aux, capacity, E, indices, rows, weights, counts)``, with ``l_aux`` over the tokens that are
    really routed (``used_token``) and the capacity agreed across the expert-parallel group.

    With ``learned=False`` (the random and hash routers) it has no parameters: the layer sets ``fixed``, the
    experts of the tokens it is about to dispatch, and the gate only turns them into routes (weight 1, no
    balance loss).
    """

    def __init__(self, hidden_size: int, num_experts: int, noise: float, drop_tokens: bool,
                 capacity_factor: float, learned: bool = True):
        super().__init__(hidden_size, num_experts, k=1, capacity_factor=capacity_factor,
                         eval_capacity_factor=capacity_factor, min_capacity=4 if drop_tokens else 0,
                         noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False)
        self.wg = nn.Linear(hidden_size, num_experts, bias=True) if learned else None
        self.noise = noise
        self.num_experts = num_experts
        self.fixed: Optional[torch.Tensor] = None

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        # Routing runs in fp32 whatever the model dtype, as DeepSpeed's gate does.
        logits = F.linear(tokens.float(), self.wg.weight.float(), self.wg.bias.float())
        if self.training and self.noise > 0:
            logits = logits + torch.empty_like(logits).uniform_(-self.noise, self.noise)
        return logits

    def forward(self, input: torch.Tensor, used_token: Optional[torch.Tensor] = None,
                sparse_routes: bool = True, use_tutel: bool = False):
        if not sparse_routes or use_tutel:
            raise NotImplementedError("NoisyTop1Gate gives DeepSpeed's sparse routes only (MOELayer, 0.19)")
        if self.wg is None:
            choice = fixed_top1(self.fixed, used_token, self.num_experts)
            l_aux = input.new_zeros((), dtype=torch.float32)
        else:
            logits = self.logits(input)
            choice = top1(logits, used_token)
            l_aux = load_balance_loss(logits, choice.counts, used_token)
        routed = choice.counts.sum()
        capacity = agreed_capacity(choice.counts, routed, self.drop_tokens, self.capacity_factor,
                                   self.min_capacity, self.ep_group)
        if not self.drop_tokens and compiles_per_shape(input):  # more zero rows, the same routes
            capacity = bucketed_rows(capacity)
        return (l_aux, capacity, self.num_experts, *dispatch_routes(choice, capacity), choice.counts)


def load_balance_loss(logits: torch.Tensor, exp_counts: torch.Tensor,
                      used_token: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-style balance: ``E * sum_i mean_prob_i * fraction_i`` over the routed tokens.

    ``fraction_i`` comes from the argmax counts (no gradient); ``mean_prob_i`` carries the gradient.
    Equals 1 for perfectly uniform routing and E when one expert takes every token with certainty.
    """
    probs = F.softmax(logits, dim=-1)
    if used_token is None:
        n = torch.tensor(float(logits.shape[0]), device=logits.device)
        mean_prob = probs.mean(0)
    else:
        mask = used_token.to(probs.dtype).unsqueeze(-1)
        n = mask.sum().clamp(min=1.0)
        mean_prob = (probs * mask).sum(0) / n
    fraction = exp_counts.to(probs.dtype) / n
    return probs.shape[-1] * torch.sum(mean_prob * fraction)


class MoEFeedForward(nn.Module):
    """A layer's FFN as ``num_experts`` minimal experts with top-1 routing (DeepSpeed ``MoE``).

    The chosen expert's output is scaled by its gate probability (DeepSpeed's combine does this).
    ``forward`` returns ``(output, l_aux, expert_counts)``; counts are this rank's routed tokens.

    Two dispatch paths over the same gate and stacked experts (same parameters, same checkpoints):
    with ``ep_size > 1`` DeepSpeed's all-to-all, which needs one buffer shape on every rank of the group
    and so pads every expert to the busiest one's token count on the busiest rank (dropless cost:
    ``max_load`` x the dense FFN; ``agreed_capacity``), the experts then one ``bmm`` a projection; with
    ``ep_size == 1`` and no token dropping, a local dispatch that runs each expert on exactly its own tokens
    (one grouped matmul a projection), so the experts cost the dense FFN whatever the balance. The exported
    student always takes the local path.
    """

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, ep_size: int, dropout: float,
                 gate_noise: float, drop_tokens: bool, capacity_factor: float, route_padding: bool,
                 local_dispatch: Optional[bool] = None, router: str = "learned", layer: int = 0,
                 router_seed: int = 0):
        super().__init__()
        self.num_experts = num_experts
        self.route_padding = route_padding
        self.router, self.layer, self.router_seed = router, layer, router_seed
        if router == "random":
            # its training forwards so far: the draws' salt (checkpoints and resumes carry it)
            self.register_buffer("route_draws", torch.zeros((), dtype=torch.long))
        self.local_dispatch = (ep_size == 1 and not drop_tokens) if local_dispatch is None else local_dispatch
        if self.local_dispatch and (ep_size != 1 or drop_tokens):
            raise ValueError("local dispatch needs ep_size 1 and dropless routing")
        # DeepSpeed's MoE would deep-copy an expert module per local expert; it gets a parameterless stand-in
        # and its experts are replaced by one stacked module (``experts.StackedExperts``).
        self.moe = MoE(hidden_size, nn.Identity(), num_experts=num_experts,
                       ep_size=ep_size, k=1, capacity_factor=capacity_factor,
                       eval_capacity_factor=capacity_factor, min_capacity=4 if drop_tokens else 0,
                       drop_tokens=drop_tokens, use_rts=False)
        self.moe.deepspeed_moe.experts = StackedExperts(self.moe.num_local_experts, hidden_size, ffn_size,
                                                        dropout, self.moe.expert_group_name)
        # Swap in the paper's gate before DeepSpeed assigns the expert-parallel group to it.
        self.moe.deepspeed_moe.gate = NoisyTop1Gate(hidden_size, num_experts, gate_noise, drop_tokens,
                                                    capacity_factor, learned=router == "learned")

    @property
    def local_experts(self) -> StackedExperts:
        return self.moe.deepspeed_moe.experts

    @property
    def gate(self) -> NoisyTop1Gate:
        return self.moe.deepspeed_moe.gate

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_ids: Optional[torch.Tensor] = None):
        used = None
        if attention_mask is not None and not self.route_padding:
            used = attention_mask.reshape(-1)
        fixed = None
        if self.router != "learned":
            if token_ids is None:
                raise ValueError(f"the {self.router} router routes by token id: pass token_ids")
            drawing = self.router == "random" and self.training
            fixed = fixed_route(self.router, token_ids, self.layer, self.num_experts, self.router_seed,
                                int(self.route_draws) if drawing else 0)
            if drawing:
                self.route_draws += 1
        if self.local_dispatch:
            return self._local_forward(x, used, fixed)
        self.gate.fixed = fixed
        try:
            out, l_aux, counts = self.moe(x, used)
        finally:
            self.gate.fixed = None
        return out, l_aux, counts

    def _local_forward(self, x: torch.Tensor, used: Optional[torch.Tensor], fixed: Optional[torch.Tensor]):
        """Top-1 routing without capacity buffers: sort tokens by expert, run each on its own slice."""
        tokens = x.reshape(-1, x.shape[-1])
        if fixed is not None:
            prob, expert, counts = fixed_top1(fixed, used, self.num_experts)
            l_aux = tokens.new_zeros((), dtype=torch.float32)
        else:
            logits = self.gate.logits(tokens)
            prob, expert, counts = top1(logits, used)  # unrouted tokens get expert E: sorted last, skipped
            l_aux = load_balance_loss(logits, counts, used)
        order = torch.argsort(expert, stable=True)
        rows_per_expert = counts.tolist()
        routed = order[:sum(rows_per_expert)]
        rows = tokens[routed]
        if compiles_per_shape(tokens):
            # Each expert's rows padded with zero rows to a bucketed count (see ROW_BUCKET); their outputs
            # are dropped, so they change no output or gradient.
            padded = [bucketed_rows(n) if n else 0 for n in rows_per_expert]
            shift = torch.tensor([p - n for p, n in zip(padded, rows_per_expert)], device=tokens.device)
            slot = torch.arange(len(routed), device=tokens.device) + (shift.cumsum(0) - shift)[expert[routed]]
            out_rows = self.local_experts.grouped(
                rows.new_zeros(sum(padded), rows.shape[-1]).index_copy(0, slot, rows), padded)[slot]
        else:
            out_rows = self.local_experts.grouped(rows, rows_per_expert)
        out_rows = (out_rows.float() * prob[routed, None]).to(tokens.dtype)
        return tokens.new_zeros(tokens.shape).index_copy(0, routed, out_rows).view_as(x), l_aux, counts


class DenseFeedForward(nn.Module):
    """``num_experts == 1``: the dense MiniLM student's FFN, same interface, no gate and no balance loss."""

    def __init__(self, hidden_size: int, ffn_size: int, dropout: float):
        super().__init__()
        self.ffn = ExpertFFN(hidden_size, ffn_size, dropout)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_ids: Optional[torch.Tensor] = None):
        return self.ffn(x), x.new_zeros((), dtype=torch.float32), None


@torch.no_grad()
def moefy_(layer: MoEFeedForward, ep_rank: int, shared_fraction: float, std: float) -> None:
    """The paper's expert init: carve experts out of one random FFN ``E`` times wider.

    The wide FFN's first ``shared_fraction * F`` neurons are copied into every expert; each expert's
    remaining neurons are dealt round-robin from the leftover ones, so experts start related but
    distinct. Every rank draws the same wide FFN (same seed) and keeps only its own global experts.
    """
    experts = layer.local_experts
    e_total, e_local = layer.num_experts, experts.num_local_experts
    ffn, hidden = experts.fc1_weight.shape[1:]
    device = experts.fc1_weight.device
    w1 = torch.empty(e_total * ffn, hidden, device=device).normal_(0.0, std)
    w2 = torch.empty(hidden, e_total * ffn, device=device).normal_(0.0, std)
    n_shared = int(round(shared_fraction * ffn))
    n_own = ffn - n_shared
    leftover = torch.arange(n_shared, e_total * ffn, device=device)
    for local in range(e_local):
        g = ep_rank * e_local + local  # DeepSpeed's global expert id on this rank
        own = leftover[g::e_total][:n_own]
        neurons = torch.cat([torch.arange(n_shared, device=device), own])
        experts.fc1_weight[local].copy_(w1[neurons])
        experts.fc2_weight[local].copy_(w2[:, neurons])
    experts.fc1_bias.zero_()
    experts.fc2_bias.zero_()
