"""Task models: an encoder (a MiniMoE student or any dense Hugging Face encoder) plus a task head.

A fine-tuned model is saved by ``minimoe.export.hf.save_task_model``: on a MiniMoE encoder, a Hugging Face
task folder (``AutoModelForSequenceClassification`` / ``...TokenClassification`` load it) plus
``task.json``; on another encoder, ``task.json`` + ``encoder/`` + ``head.safetensors``.
``load_task_model(folder)`` rebuilds either in one plain process (experts gathered, ep_size 1).
"""
from __future__ import annotations

import inspect
import json
import os
import torch
from torch import nn

from .config import ConfigError
from .errors import reading
from . import model_folder as names
from .student import CONFIG_NAME, WEIGHTS_NAME, MiniMoEModel, student_config_of


def is_minimoe_folder(path: str) -> bool:
    """A student folder written by minimoe (a MoE one, or a dense one that is also a plain BERT)."""
    cfg = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as fh:
        return names.is_student_config(json.load(fh))


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

    def __init__(self, encoder: nn.Module, encoder_type: str, kind: str, num_labels: int,
                 dropout: float = 0.1):
        super().__init__()
        self.encoder, self.encoder_type, self.kind = encoder, encoder_type, kind
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden) if kind != "ner" else None
        self.out = nn.Linear(hidden, num_labels)
        self._token_types = (encoder_type == "minimoe"
                             or "token_type_ids" in inspect.signature(encoder.forward).parameters)
        if encoder_type == "minimoe":  # only for distillation / BERT pooling; the head has its own dense
            for m in (encoder.pooler, encoder.relation_proj):
                if m is not None:
                    m.requires_grad_(False)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if self.encoder_type == "minimoe":
            out = self.encoder(input_ids, attention_mask, token_type_ids)
            h, aux = out.last_hidden_state, out.aux_loss
        else:
            kw = ({"token_type_ids": token_type_ids} if self._token_types and token_type_ids is not None
                  else {})
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
            aux = h.new_zeros((), dtype=torch.float32)
        if self.kind == "ner":
            return self.out(self.dropout(h)), aux
        x = torch.tanh(self.dense(self.dropout(h[:, 0])))
        return self.out(self.dropout(x)), aux

    def head_state(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}


def load_task_model(folder: str) -> tuple[TaskModel, dict]:
    """A fine-tuned model folder -> (TaskModel in eval mode, its task.json). Reads both layouts
    (``minimoe.model_folder``): a Hugging Face task folder, or ``encoder/`` + ``head.safetensors``."""
    from safetensors.torch import load_file
    meta_path = os.path.join(folder, names.TASK_META)
    if not os.path.isfile(meta_path):
        raise ConfigError(f"--model {folder!r} is not a fine-tuned model folder (no {names.TASK_META})")
    with reading(meta_path, "; fine-tune the model again"), open(meta_path) as fh:
        meta = json.load(fh)
    hf_layout = not os.path.isdir(os.path.join(folder, "encoder"))
    if hf_layout:
        encoder, kind = MiniMoEModel(student_config_of(folder)), "minimoe"
        weights_file = os.path.join(folder, WEIGHTS_NAME)
    else:
        encoder, kind = load_encoder(os.path.join(folder, "encoder"))
        weights_file = os.path.join(folder, names.HEAD_FILE)
    model = TaskModel(encoder, kind, meta["kind"], meta["num_labels"], meta["classifier_dropout"])
    with reading(weights_file, "; fine-tune the model again"):
        state = load_file(weights_file)
    if hf_layout:
        state = names.task_state_from_hf(state, encoder.config.num_experts)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # head.safetensors holds the head alone; a Hugging Face task folder all but the encoder's own pooler and
    # relation projection, which task models do not use.
    spare = ("encoder.pooler.", "encoder.relation_proj.") if hf_layout else ("encoder.",)
    missing = [k for k in missing if not k.startswith(spare) and not k.endswith(names.ROUTE_DRAWS)]
    if unexpected or missing:
        raise ConfigError(f"{folder}: {os.path.basename(weights_file)} does not match {names.TASK_META} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), meta


def tokenizer_folder(folder: str) -> str:
    """Where a fine-tuned model folder keeps its tokenizer (either layout)."""
    return os.path.join(folder, "encoder") if os.path.isdir(os.path.join(folder, "encoder")) else folder


def tokenizer_for(path: str):
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # an earlier MiniMoE folder's config.json is not a transformers config
    try:
        # A MoE folder's config names its own code (auto_map): AutoTokenizer would read it through AutoConfig
        # and ask whether to run that code. The tokenizer needs none of it; a plain config says so.
        config = PretrainedConfig.from_pretrained(path) if is_minimoe_folder(path) else None
        return AutoTokenizer.from_pretrained(path, config=config)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {path!r} has no loadable tokenizer: {str(e).splitlines()[0]}")
    finally:
        hf_logging.set_verbosity(level)
