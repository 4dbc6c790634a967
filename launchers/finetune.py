"""Task-specific fine-tuning of a MiniMoE student (or a dense HF encoder) on GLUE, CoNLL-2003 or the
offline tasks, with dev evaluation and early stopping.

    python launchers/finetune.py --model runs/demo/student --task sentiment
    deepspeed --num_gpus 2 launchers/finetune.py --model runs/demo/student --task wnut16 --ep_size 2
    python launchers/finetune.py --model packaged:all-MiniLM-L6-v2 --task sentiment   # a dense baseline

Run with --help for every flag.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minimoe.cli import main  # noqa: E402
from minimoe.config import FinetuneConfig  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(FinetuneConfig, "minimoe.finetune:run", "launchers/finetune.py"))
