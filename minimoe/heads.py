"""Task models: an encoder (a MiniMoE student or any dense Hugging Face encoder) plus a task head.

A fine-tuned model is saved as a folder::

    task.json           task name, kind, labels, encoder type, head sizes
    encoder/            a MiniMoE student folder (config.json + model.safetensors) or a HF model folder,
                        with the tokenizer
    head.safetensors    the head's weights

``load_task_model(folder)`` rebuilds it in one plain process (experts gathered, ep_size 1).
"""
from __future__ import annotations

import inspect
import json
import os
import torch
from torch import nn

from .config import ConfigError
from .errors import reading
from .student import CONFIG_NAME, MODEL_TYPE, MiniMoEModel


def is_minimoe_folder(path: str) -> bool:
    cfg = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as fh:
        return json.load(fh).get("model_type") == MODEL_TYPE


def load_encoder(path: str, ep_size: int = 1, ep_rank: int = 0) -> tuple[nn.Module, str]:
    """(encoder, "minimoe" | "hf") from an exported student folder, or a hub name / folder of a HF encoder."""
    if is_minimoe_folder(path):
        return MiniMoEModel.from_pretrained(path, ep_size=ep_size, ep_rank=ep_rank), "minimoe"
    if ep_size != 1:
        raise ConfigError(f"--ep_size {ep_size} needs a MiniMoE student; {path!r} is a dense model")
    from transformers import AutoModel
    try:
        return AutoModel.from_pretrained(path), "hf"
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {path!r} is neither a MiniMoE student folder nor a loadable Hugging Face "
                          f"model: {str(e).splitlines()[0]}")


# Encoders that count positions from padding_idx + 1, so that many rows of their table are never a position.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text")


def check_positions(config, max_seq_length: int, what: str) -> None:
    """--max_seq_length within the encoder's position table (past it the embedding lookup fails)."""
    limit = config.max_position_embeddings
    if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
        limit -= (config.pad_token_id or 0) + 1
    if max_seq_length > limit:
        raise ConfigError(f"--max_seq_length {max_seq_length} exceeds the {limit} positions of {what}")


class TaskModel(nn.Module):
    """Encoder + head. Sentence tasks read the first token ([CLS]): dense -> tanh -> linear (BERT/RoBERTa
    style); NER classifies every token. ``forward`` returns (logits, load-balance loss)."""

    def __init__(self, encoder: nn.Module, encoder_type: str, kind: str, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder, self.encoder_type, self.kind = encoder, encoder_type, kind
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden) if kind != "ner" else None
        self.out = nn.Linear(hidden, num_labels)
        self._token_types = encoder_type == "minimoe" or "token_type_ids" in inspect.signature(encoder.forward).parameters
        if encoder_type == "minimoe":  # only for distillation / BERT pooling; the head has its own dense
            for m in (encoder.pooler, encoder.relation_proj):
                if m is not None:
                    m.requires_grad_(False)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if self.encoder_type == "minimoe":
            out = self.encoder(input_ids, attention_mask, token_type_ids)
            h, aux = out.last_hidden_state, out.aux_loss
        else:
            kw = {"token_type_ids": token_type_ids} if self._token_types and token_type_ids is not None else {}
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
            aux = h.new_zeros((), dtype=torch.float32)
        if self.kind == "ner":
            return self.out(self.dropout(h)), aux
        x = torch.tanh(self.dense(self.dropout(h[:, 0])))
        return self.out(self.dropout(x)), aux

    def head_state(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}


def save_task_model(folder: str, state: dict, task, encoder_type: str, source: str, tokenizer,
                    dropout: float) -> str:
    """Write a fine-tuned model folder from a full state dict (experts under global ids)."""
    from safetensors.torch import save_file
    from .checkpoint import staged_folder
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    head = {k: v.contiguous() for k, v in state.items() if not k.startswith("encoder.")}
    with staged_folder(folder) as tmp:
        base, _ = load_encoder(source)  # the architecture (ep_size 1), then the fine-tuned weights
        base.load_state_dict(enc, strict=True)
        base.save_pretrained(os.path.join(tmp, "encoder"))
        tokenizer.save_pretrained(os.path.join(tmp, "encoder"))
        save_file(head, os.path.join(tmp, "head.safetensors"))
        with open(os.path.join(tmp, "task.json"), "w") as fh:
            json.dump({"task": task.name, "kind": task.kind, "labels": list(task.labels),
                       "num_labels": task.num_labels, "encoder_type": encoder_type, "source": source,
                       "classifier_dropout": dropout}, fh, indent=2)
    return folder


def load_task_model(folder: str) -> tuple[TaskModel, dict]:
    """A fine-tuned model folder -> (TaskModel in eval mode, its task.json)."""
    from safetensors.torch import load_file
    meta_path = os.path.join(folder, "task.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"--model {folder!r} is not a fine-tuned model folder (no task.json)")
    with reading(meta_path, "; fine-tune the model again"), open(meta_path) as fh:
        meta = json.load(fh)
    encoder, kind = load_encoder(os.path.join(folder, "encoder"))
    model = TaskModel(encoder, kind, meta["kind"], meta["num_labels"], meta["classifier_dropout"])
    head_file = os.path.join(folder, "head.safetensors")
    with reading(head_file, "; fine-tune the model again"):
        head = load_file(head_file)
    missing, unexpected = model.load_state_dict(head, strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise ConfigError(f"{folder}: head.safetensors does not match task.json")
    return model.eval(), meta


def tokenizer_for(path: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a MiniMoE folder's config.json is not a transformers config: no warning
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {path!r} has no loadable tokenizer: {str(e).splitlines()[0]}")
    finally:
        hf_logging.set_verbosity(level)
