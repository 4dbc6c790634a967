#!/usr/bin/env bash
# Inside the CPU image: a 2-process deepspeed distillation (4 steps, experts split over the ranks),
# then its exported student loaded in a plain python with no launcher (minimoe, and transformers alone),
# and exported to ONNX (checked in onnxruntime). Exits non-zero on any failure.
set -euo pipefail
out=$(mktemp -d)/run
deepspeed --num_gpus 2 launchers/distill.py --ep_size 2 --max_steps 4 --micro_batch_size 8 \
  --wandb disabled --output_dir "$out"
python - "$out/student" <<'PY'
import sys

import torch

from minimoe import MiniMoEModel
from minimoe.heads import tokenizer_for

student = MiniMoEModel.from_pretrained(sys.argv[1]).eval()
tok = tokenizer_for(sys.argv[1])
batch = tok(["a student distilled in the image", "and loaded in plain python"], padding=True,
            return_tensors="pt")
with torch.no_grad():
    out = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
hidden = out.last_hidden_state
assert torch.isfinite(hidden).all(), "non-finite outputs"
print(f"export loaded: {student.config.num_experts} experts, hidden {tuple(hidden.shape)}, "
      f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters")

from transformers import AutoModel
plain = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    again = plain(**batch).last_hidden_state
diff = float((again - hidden).abs().max())
assert diff <= 1e-5, f"transformers' load differs by {diff}"
print(f"transformers loads it too: max difference {diff:.1e}")
PY
python launchers/export.py --model "$out" --format onnx
