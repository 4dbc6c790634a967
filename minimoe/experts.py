"""A rank's local experts as stacked tensors: one ``[E, F, H]`` / ``[E, H, F]`` weight per projection.

DeepSpeed's ``Experts`` keeps a ``ModuleList`` of expert modules: ``4 E`` parameters a layer, each with its
own gradient hook, gradient copy into ZeRO's flat buffer and optimizer bookkeeping, and one matmul launch per
expert. Stacked, a layer has four expert parameters whatever ``E``, and the experts run as one ``bmm`` on
DeepSpeed's equal-capacity buffers (expert parallelism, token dropping) or as one grouped matmul over each
expert's own rows (the local dropless path, where every expert gets a different row count).

The state dict keeps DeepSpeed's per-expert layout (``deepspeed_experts.{j}.fc1.weight`` ...): DeepSpeed's
MoE checkpoints (one file per expert), elastic resume (``reshard``), the Hugging Face export and checkpoints
written before the experts were stacked all read and write the same keys. (DeepSpeed's own stacked
``moe.ep_experts.GroupedExperts`` is a SwiGLU expert without biases: not the BERT FFN a student's expert is.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout

# name of a stacked parameter -> (the per-expert module, its parameter) in DeepSpeed's state-dict layout
PER_EXPERT = {"fc1_weight": ("fc1", "weight"), "fc1_bias": ("fc1", "bias"),
              "fc2_weight": ("fc2", "weight"), "fc2_bias": ("fc2", "bias")}
LEGACY = "deepspeed_experts"


def ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        dropout: nn.Module) -> torch.Tensor:
    """The minimal FFN an expert is, and the dense student's FFN: ``H -> F -> H`` with GELU, output
    dropout."""
    return dropout(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2))


class GroupedLinear(torch.autograd.Function):
    """``y[rows of expert e] = x[rows of e] @ weight[e].T + bias[e]`` for consecutive row segments.

    One autograd node for all experts: the backward writes each expert's weight gradient into its slice of one
    buffer (indexing ``weight[e]`` under autograd would instead make a full-size zero gradient per expert).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], weight: torch.Tensor, bias: torch.Tensor):
        out = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.addmm(bias[e], x[start:start + n], weight[e].t(), out=out[start:start + n])
            start += n
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, _, need_w, need_b = ctx.needs_input_grad
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None  # zero: an expert without rows gets no gradient
        grad_b = weight.new_zeros(weight.shape[0], weight.shape[1]) if need_b else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                g = grad_out[start:start + n]
                if need_x:
                    torch.mm(g, weight[e], out=grad_x[start:start + n])
                if need_w:
                    torch.mm(g.t(), x[start:start + n], out=grad_w[e])
                if need_b:
                    torch.sum(g, 0, out=grad_b[e])
            start += n
        return grad_x, None, grad_w, grad_b


class StackedExperts(nn.Module):
    """``num_local`` minimal experts (``H -> F -> H``, GELU, output dropout), stacked.

    Called by DeepSpeed's ``MOELayer`` on its dispatch buffers ``[ep_size, E_local, C, H]`` (``forward``), or
    by the local dropless path on rows sorted by expert (``grouped``). The parameters are flagged as
    DeepSpeed flags its experts' (``allreduce=False`` and the expert-parallel group name), so ZeRO reduces
    their gradients over the expert's data-parallel group only and the optimizer puts them in the MoE
    parameter groups.
    """

    def __init__(self, num_local: int, hidden_size: int, ffn_size: int, dropout: float,
                 group_name: Optional[str] = None):
        super().__init__()
        self.num_local_experts = num_local  # the attribute name DeepSpeed's Experts uses
        # Zeros until the owner draws them (``moe.moefy_``): building the layer consumes no random numbers,
        # whatever E_local is, so ranks of every expert-parallel layout build slices of one model.
        self.fc1_weight = nn.Parameter(torch.zeros(num_local, ffn_size, hidden_size))
        self.fc1_bias = nn.Parameter(torch.zeros(num_local, ffn_size))
        self.fc2_weight = nn.Parameter(torch.zeros(num_local, hidden_size, ffn_size))
        self.fc2_bias = nn.Parameter(torch.zeros(num_local, hidden_size))
        self.dropout = Dropout(dropout)
        for p in self.parameters():
            p.allreduce = False
            p.group_name = group_name
        self.register_state_dict_post_hook(_per_expert_state)
        self.register_load_state_dict_pre_hook(_stack_state)

    def forward(self, buffers: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's dispatch buffers ``[G, E_local, C, H]`` -> outputs of the same shape: one bmm a
        projection."""
        g, e, c, h = buffers.shape
        x = buffers.transpose(0, 1).reshape(e, g * c, h)
        x = torch.baddbmm(self.fc1_bias.unsqueeze(1), x, self.fc1_weight.transpose(1, 2))
        x = torch.baddbmm(self.fc2_bias.unsqueeze(1), F.gelu(x), self.fc2_weight.transpose(1, 2))
        return self.dropout(x).reshape(e, g, c, h).transpose(0, 1)

    def grouped(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by expert (``counts[e]`` consecutive rows for expert ``e``) -> their outputs."""
        x = GroupedLinear.apply(rows, counts, self.fc1_weight, self.fc1_bias)
        x = GroupedLinear.apply(F.gelu(x), counts, self.fc2_weight, self.fc2_bias)
        return self.dropout(x)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``x`` (tests, benchmarks): the minimal FFN it is."""
        return ffn(x, self.fc1_weight[e], self.fc1_bias[e], self.fc2_weight[e], self.fc2_bias[e],
                   self.dropout)


def legacy_name(name: str, expert: int) -> Optional[str]:
    """A stacked parameter's name (``...experts.fc1_weight``) -> expert ``expert``'s name in DeepSpeed's
    per-expert layout (``...experts.deepspeed_experts.{expert}.fc1.weight``); None for any other name."""
    head, dot, last = name.rpartition(".")
    if last not in PER_EXPERT or not (head.endswith("experts") or not head):
        return None
    sub, param = PER_EXPERT[last]
    return f"{head}{dot}{LEGACY}.{expert}.{sub}.{param}"


def is_stacked(name: str) -> bool:
    """Whether ``name`` is a stacked expert tensor (``StackedExperts``): all of a rank's experts in one."""
    return legacy_name(name, 0) is not None


def per_expert(named: dict) -> dict:
    """``{name: tensor}`` with each stacked tensor split into its experts under their per-expert names (local
    ids; views), every other entry as it is."""
    out = {}
    for name, t in named.items():
        if is_stacked(name):
            out.update((legacy_name(name, j), t[j]) for j in range(t.shape[0]))
        else:
            out[name] = t
    return out


def _per_expert_state(module: StackedExperts, state: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the stacked tensors as DeepSpeed's per-expert entries. Copies, not views: a view would
    carry (and torch.save would write) the whole stacked storage."""
    for name in PER_EXPERT:
        stacked = state.pop(prefix + name)
        for j in range(stacked.shape[0]):
            state[legacy_name(prefix + name, j)] = stacked[j].clone()


def _stack_state(module: StackedExperts, state: dict, prefix: str, local_metadata, strict, missing,
                 unexpected, errors) -> None:
    """load_state_dict pre-hook: gather the per-expert entries back into the stacked tensors' keys. A missing
    expert is left for load_state_dict to report (its stacked key stays absent)."""
    for name in PER_EXPERT:
        keys = [legacy_name(prefix + name, j) for j in range(module.num_local_experts)]
        if prefix + name not in state and all(k in state for k in keys):
            state[prefix + name] = torch.stack([state.pop(k) for k in keys])
