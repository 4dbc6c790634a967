"""Hugging Face folders from finished runs: the distilled student, and fine-tuned task models.

Both are folders ``transformers`` loads on its own: ``config.json`` + ``model.safetensors`` in BERT's
names (``names``), the tokenizer, a model card (``README.md``), and for a MoE model its modeling code.
A dense model is a plain BERT (``BertModel``, ``BertFor*Classification``).

Task models on a MiniMoE encoder map onto transformers' heads exactly: the sentence head (dense + tanh
on the first token, then a linear classifier) is BERT's pooler + classifier, the NER head is its token
classifier. ``task.json`` keeps minimoe's own facts (task, kind, labels, source). A task model on another
Hugging Face encoder keeps minimoe's layout (``encoder/`` + ``head.safetensors``): its heads have other
shapes per architecture.

Every folder is assembled next to its destination and moved into place (``staged_folder``): readers never
see half of one, and a failure leaves the previous one.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..config import ConfigError
from ..model_folder import (BERT_CLASSES, HEAD_FILE, MOE_CLASSES, TASK_META, head_of,
                            hf_config, staged_folder, task_state_to_hf, write_model)
from . import card


def _fp32(state: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def export_student(state: dict, out_dir: str, student_config, tokenizer=None, card_text: str = "",
                   where: str = "the checkpoint") -> str:
    """Write the student folder from a gathered state dict (experts under global ids), in fp32 whatever
    the training precision. Refuses non-finite weights and weights that do not fit the config."""
    from ..student import MiniMoEModel
    state = _fp32(state)
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ConfigError(f"{where} holds non-finite weights ({len(broken)} tensors, e.g. {broken[:2]}): "
                          "not exported")
    model = MiniMoEModel(student_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{where} does not match the student config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    with staged_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card_text:
            with open(os.path.join(tmp, card.CARD_NAME), "w") as fh:
                fh.write(card_text)
    return out_dir


# ---------------------------------------------------------------------- task models


def task_config(student: dict, task, dropout: float, version: str) -> dict:
    labels = list(task.labels) if task.kind != "regression" else ["score"]
    head = head_of(task.kind)
    cfg = hf_config(student, version)
    cfg["architectures"] = [(MOE_CLASSES if student["num_experts"] > 1 else BERT_CLASSES)[head]]
    cfg.update(id2label={str(i): x for i, x in enumerate(labels)},
               label2id={x: i for i, x in enumerate(labels)}, classifier_dropout=dropout)
    if head == "sequence":
        cfg["problem_type"] = "regression" if task.kind == "regression" else "single_label_classification"
    return cfg


def save_task_model(folder: str, state: dict, task, encoder_type: str, source: str, tokenizer,
                    dropout: float, seq_len: int, command: str = "", results: Optional[dict] = None) -> str:
    """Write a fine-tuned model folder from a full TaskModel state dict (experts under global ids)."""
    from safetensors.torch import save_file
    from .. import __version__
    from ..heads import load_encoder
    state = _fp32(state)
    meta = {"task": task.name, "kind": task.kind, "labels": list(task.labels), "num_labels": task.num_labels,
            "encoder_type": encoder_type, "source": source, "classifier_dropout": dropout}
    with staged_folder(folder) as tmp:
        base, _ = load_encoder(source)  # the encoder's architecture (ep_size 1), checked against the weights
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        base.load_state_dict(enc, strict=True)
        if encoder_type == "minimoe":
            write_model(tmp, task_state_to_hf(state, task.kind, base.config.num_experts),
                        task_config(base.config.to_dict(), task, dropout, __version__))
            tokenizer.save_pretrained(tmp)
            if results is not None:
                with open(os.path.join(tmp, card.CARD_NAME), "w") as fh:
                    name = os.path.basename(os.path.dirname(os.path.abspath(folder)))  # the run folder's
                    facts = {**meta, **results, "command": command}
                    fh.write(card.task_card(name, base.config, seq_len, facts))
        else:
            base.save_pretrained(os.path.join(tmp, "encoder"))
            tokenizer.save_pretrained(os.path.join(tmp, "encoder"))
            head = {k: v.contiguous() for k, v in state.items() if not k.startswith("encoder.")}
            save_file(head, os.path.join(tmp, HEAD_FILE))
        with open(os.path.join(tmp, TASK_META), "w") as fh:
            json.dump(meta, fh, indent=2)
    return folder
