"""Score a fine-tuned model (launchers/finetune.py's output_dir/model) on dev or test, in one process.

    python launchers/evaluate.py --model runs/finetune/model --split test

Writes <model>/../eval_<split>.json and .md (or --output). Run with --help for every flag.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimoe.cli import main  # noqa: E402
from minimoe.config import EvaluateConfig, check_output_file  # noqa: E402


def run(cfg: EvaluateConfig) -> None:
    from minimoe.task_eval import evaluate_folder
    out = cfg.output or os.path.join(os.path.dirname(os.path.abspath(cfg.model)), f"eval_{cfg.split}.json")
    check_output_file(out, "--output")
    r = evaluate_folder(cfg.model, cfg.split, cfg.data or None, cfg.max_seq_length, cfg.batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(r, fh, indent=2)
    table = "| task | split | examples | " + " | ".join(r["scores"]) + " |\n"
    table += "|---|---|---|" + "---|" * len(r["scores"]) + "\n"
    table += f"| {r['task']} | {r['split']} | {r['examples']} | " + " | ".join(
        f"{100 * v:.2f}" for v in r["scores"].values()) + " |\n"
    with open(os.path.splitext(out)[0] + ".md", "w") as fh:
        fh.write(table)
    print(table + f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main(EvaluateConfig, run, "launchers/evaluate.py"))
