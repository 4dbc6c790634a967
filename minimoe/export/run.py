"""``launchers/export.py``: which folder to export (``source``), then ONNX or a Hugging Face folder.

Only finished work is exported: a distillation run that wrote its ``summary.json`` and ``student/``, a
fine-tuning run that wrote ``results.json`` and ``model/``, or such an exported folder itself. Anything
else is refused in one line before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil

from ..config import ConfigError, ExportConfig, check_output_dir
from ..heads import is_minimoe_folder
from ..model_folder import TASK_META, copy_tokenizer_files, staged_folder

_DISTILL_DONE, _FINETUNE_DONE = ("summary.json", "student"), ("results.json", "model")


def source(model: str) -> tuple[str, str]:
    """(the exported folder to read, "student" | "task") for ``--model``."""
    if not os.path.isdir(model):
        raise ConfigError(f"--model {model!r} is not a folder: give a finished run folder or the model "
                          "folder it exported")
    if any(os.path.exists(os.path.join(model, f)) for f in ("run_config.json", "checkpoints")):
        for done, folder in (_DISTILL_DONE, _FINETUNE_DONE):
            if os.path.isfile(os.path.join(model, done)) and os.path.isdir(os.path.join(model, folder)):
                return source(os.path.join(model, folder))
        step = _last_checkpoint(model)
        raise ConfigError(f"--model {model!r} is not a finished run: it has no summary.json and student/ (or "
                          f"results.json and model/){step}; finish it first (distillation: the same command "
                          "with --resume)")
    if os.path.isfile(os.path.join(model, TASK_META)):
        if os.path.isdir(os.path.join(model, "encoder")):
            raise ConfigError(f"--model {model!r} is a task model on a dense Hugging Face encoder (encoder/ "
                              "+ head.safetensors): its head depends on that encoder's architecture; export "
                              "it with that model's own tools (e.g. optimum)")
        return model, "task"
    if is_minimoe_folder(model):
        return model, "student"
    raise ConfigError(f"--model {model!r} is neither a finished minimoe run nor a model folder it exported "
                      "(student/, model/)")


def _read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _last_checkpoint(run: str) -> str:
    from ..checkpoint import complete_tags
    root = os.path.join(run, "checkpoints")
    tags = complete_tags(root) if os.path.isdir(root) else []
    return f"; its last complete checkpoint is {tags[-1]}" if tags else "; it saved no complete checkpoint"


def output_dir(cfg: ExportConfig, folder: str) -> str:
    default = os.path.join(folder, "onnx") if cfg.format == "onnx" else folder.rstrip("/") + "-hf"
    out = cfg.output_dir or default
    if os.path.abspath(out) == os.path.abspath(folder):
        raise ConfigError(f"--output_dir {out!r} is the folder being exported: choose another")
    check_output_dir(out)
    return out


def run(cfg: ExportConfig) -> dict:
    folder, kind = source(cfg.model)
    out = output_dir(cfg, folder)
    if cfg.format == "onnx":
        from .onnx import export_onnx
        report = export_onnx(folder, out, cfg.opset, cfg.tolerance)
        shapes = ", ".join("x".join(map(str, c["shape"])) for c in report["checks"])
        kind = f"{report['experts']} experts per layer, top-1" if report["experts"] > 1 else "dense"
        print(f"wrote {os.path.join(out, 'model.onnx')} ({kind}; dynamic batch and sequence); onnxruntime "
              f"equals PyTorch within {report['max_abs_diff']:.1e} on batches {shapes}")
        return report
    if kind == "task":
        raise ConfigError(f"--model {folder!r} is a fine-tuned model, already a Hugging Face folder; "
                          "--format hf converts students")
    return {"output_dir": rewrite_student(folder, out)}


def rewrite_student(folder: str, out: str) -> str:
    """A student folder (this format or an earlier one) written again in Hugging Face format, with its model
    card rebuilt from the run folder around it when there is one."""
    from ..student import MiniMoEModel
    from .card import CARD_NAME, student_card
    model = MiniMoEModel.from_pretrained(folder)
    run_dir = os.path.dirname(os.path.abspath(folder))
    facts = [os.path.join(run_dir, f) for f in ("run_config.json", "summary.json")]
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(folder, tmp)
        if all(os.path.isfile(f) for f in facts):
            run_config, summary = (_read_json(f) for f in facts)
            text = student_card(os.path.basename(run_dir), model.config, run_config, summary)
            with open(os.path.join(tmp, CARD_NAME), "w") as fh:
                fh.write(text)
        elif os.path.isfile(os.path.join(folder, CARD_NAME)):
            shutil.copyfile(os.path.join(folder, CARD_NAME), os.path.join(tmp, CARD_NAME))
    print(f"wrote {out}: loads with transformers.AutoModel.from_pretrained(path"
          f"{', trust_remote_code=True' if model.config.num_experts > 1 else ''})")
    return out
