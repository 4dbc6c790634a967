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

import contextlib
import json
import os
import shutil
from typing import Optional

import torch

from ..config import ConfigError
from . import card, names

TASK_META = "task.json"
HEAD_FILE = "head.safetensors"  # minimoe's layout, for task models on other Hugging Face encoders


@contextlib.contextmanager
def staged_folder(out_dir: str):
    """Yield a sibling folder to fill; on success it replaces ``out_dir``, so readers never see a
    half-written export; a failure (a full disk) removes it and leaves the previous export in place."""
    out_dir = out_dir.rstrip("/")
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.replace(out_dir, old)  # two renames: at every moment one complete export exists
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_model(folder: str, hf_state: dict, config: dict) -> None:
    """``model.safetensors`` (names already Hugging Face's) and ``config.json`` into ``folder``, plus the
    modeling code when the config is a MoE's. The weights go through a temporary file: never half a file."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, names.WEIGHTS_NAME + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in hf_state.items()}, tmp,
              metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, names.WEIGHTS_NAME))
    with open(os.path.join(folder, names.CONFIG_NAME), "w") as fh:
        json.dump(config, fh, indent=2)
    if config["model_type"] == names.MOE_MODEL_TYPE:
        copy_code(folder)


def copy_code(folder: str) -> None:
    """The modeling code a MoE folder needs for ``trust_remote_code`` (``remote/``)."""
    code = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
    for f in names.CODE_FILES:
        shutil.copyfile(os.path.join(code, f), os.path.join(folder, f))


def copy_tokenizer_files(src: str, dst: str) -> None:
    """The tokenizer's files of a model folder (what ``save_pretrained`` of a tokenizer writes)."""
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "special_tokens", "vocab")) and os.path.isfile(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


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


def head_of(kind: str) -> str:
    return "token" if kind == "ner" else "sequence"


def task_prefix(num_experts: int) -> str:
    """Where transformers' task classes keep the encoder: ``minimoe.`` for MoE, ``bert.`` for BERT."""
    return names.MOE_MODEL_TYPE + "." if num_experts > 1 else "bert."


def task_state_to_hf(state: dict, kind: str, num_experts: int) -> dict:
    """TaskModel state (``encoder.*``, ``dense.*``, ``out.*``) -> transformers' task-model names. The
    encoder's own pooler and relation projection are not part of a task model and are left out."""
    prefix, out = task_prefix(num_experts), {}
    for k, v in state.items():
        if k.startswith("encoder."):
            inner = k[len("encoder."):]
            if not inner.startswith(("pooler.", "relation_proj.")):
                out[prefix + names.to_hf(inner)] = v
        elif k.startswith("dense."):  # the sentence head's dense + tanh is BERT's pooler
            out[prefix + "pooler.dense." + k[len("dense."):]] = v
        elif k.startswith("out."):
            out["classifier." + k[len("out."):]] = v
    return out


def task_state_from_hf(state: dict, num_experts: int) -> dict:
    prefix, out = task_prefix(num_experts), {}
    for k, v in state.items():
        if k.startswith(prefix + "pooler.dense."):
            out["dense." + k[len(prefix + "pooler.dense."):]] = v
        elif k.startswith(prefix):
            out["encoder." + names.from_hf(k[len(prefix):])] = v
        elif k.startswith("classifier."):
            out["out." + k[len("classifier."):]] = v
    return out


def task_config(student: dict, task, dropout: float, version: str) -> dict:
    labels = list(task.labels) if task.kind != "regression" else ["score"]
    head = head_of(task.kind)
    cfg = names.hf_config(student, version)
    cfg["architectures"] = [(names.MOE_CLASSES if student["num_experts"] > 1 else names.BERT_CLASSES)[head]]
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
