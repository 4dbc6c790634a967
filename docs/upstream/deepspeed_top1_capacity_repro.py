"""Minimal reproduction for an upstream DeepSpeed report (0.19.8): top-1 MoE with expert parallelism
breaks when the ranks of an expert-parallel group hold different token counts.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 docs/upstream/deepspeed_top1_capacity_repro.py [--drop]

Rank 0 routes 20 tokens, rank 1 routes 6 (micro-batches padded to their own longest sequence).
Dropless (default): ``top1gating`` agrees on the busiest expert's count with a MAX all-reduce over the
expert-parallel group, then caps it at the *local* token count, so the ranks enter the all-to-all
with [E, C, H] buffers of different C. ``--drop``: the capacity is ``ceil(S / E * capacity_factor)``
with the local S, the same mismatch. On CPU gloo aborts ("op.preamble.length <= op.nbytes ...
collective mismatch"); with NCCL the mismatch can hang or exchange wrong data.
"""
import sys

import deepspeed
import torch
from deepspeed.moe.layer import MoE

drop = "--drop" in sys.argv
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
torch.manual_seed(0)
hidden = 8
layer = MoE(hidden, torch.nn.Linear(hidden, hidden), num_experts=2, ep_size=2, k=1, min_capacity=0,
            drop_tokens=drop, use_rts=False)
layer.set_deepspeed_parallelism()
# Route every token to expert 0, so the busiest expert holds all of rank 0's tokens.
with torch.no_grad():
    layer.deepspeed_moe.gate.wg.weight.zero_()
    layer.deepspeed_moe.gate.wg.weight[0].fill_(1.0)
tokens = 20 if rank == 0 else 6
x = torch.ones(1, tokens, hidden)
out, _, counts = layer(x)
print(f"rank {rank}: ok, {tokens} tokens, counts {counts.tolist()}", flush=True)
