"""Deployable artefacts from a finished run: ONNX (each token still runs only its top-1 expert) or a
Hugging Face folder with a model card.

    python launchers/export.py --model runs/demo --format onnx          # -> runs/demo/student/onnx/
    python launchers/export.py --model runs/finetune-sentiment --format onnx
    python launchers/export.py --model old_run/student --format hf      # earlier minimoe exports

Run with --help for every flag.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minimoe.cli import main  # noqa: E402
from minimoe.config import ExportConfig  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(ExportConfig, "minimoe.export.run:run", "launchers/export.py"))
