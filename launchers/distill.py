"""Task-agnostic distillation of a Hugging Face teacher into a MiniMoE student.

    deepspeed --num_gpus 2 launchers/distill.py --ep_size 2          # 2 ranks, experts split over them
    deepspeed --hostfile hosts launchers/distill.py --ds_config ds_configs/zero2_moe.json ...
    torchrun --nproc_per_node 2 launchers/distill.py ...
    python launchers/distill.py                                      # one process, the embedded default

Run with --help for every flag.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minimoe.cli import main  # noqa: E402
from minimoe.config import DistillConfig  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(DistillConfig, "minimoe.distill:run", "launchers/distill.py"))
