"""The frozen teacher: any Hugging Face encoder, partitioned under ZeRO-3 as it loads, with the
Q/K/V of one layer captured by forward hooks (no edits to transformers' code).

Layers above the distilled one are cut off before the engine is built: their output is never
used, so they cost neither memory nor compute.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import ConfigError

# Names of the Q/K/V projections inside one layer, by architecture family.
QKV_NAMES = (
    ("query", "key", "value"),              # BERT, RoBERTa, ELECTRA, XLM-R
    ("q", "k", "v"),                        # MPNet
    ("q_lin", "k_lin", "v_lin"),            # DistilBERT
    ("query_proj", "key_proj", "value_proj"),  # DeBERTa-v2/v3
)


@dataclass
class TeacherInfo:
    """What the teacher's config says, read before any process group (for validation)."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    model_type: str


def teacher_info(name: str) -> TeacherInfo:
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--teacher {name!r} is not a loadable Hugging Face model: {str(e).splitlines()[0]}")
    return TeacherInfo(cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.model_type)


def resolve_layer(layer: int, num_layers: int) -> int:
    idx = layer + num_layers if layer < 0 else layer
    if not 0 <= idx < num_layers:
        raise ConfigError(f"--teacher_layer {layer} is out of range for a {num_layers}-layer teacher")
    return idx


def find_layer_stack(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) holding the encoder's transformer layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and _qkv_modules(module[0]):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ConfigError(f"cannot find the attention layers of {type(model).__name__}: expected a layer list with "
                      f"Q/K/V Linear modules named one of {QKV_NAMES}")


def _qkv_modules(layer: nn.Module) -> Optional[tuple[nn.Module, nn.Module, nn.Module]]:
    named = dict(layer.named_modules())
    for names in QKV_NAMES:
        by_leaf = {n.rpartition(".")[2]: m for n, m in named.items() if n.rpartition(".")[2] in names}
        if all(isinstance(by_leaf.get(n), nn.Linear) for n in names):
            return tuple(by_leaf[n] for n in names)
    return None


class QKVCapture:
    """Forward hooks that keep the outputs of one layer's Q, K and V projections."""

    def __init__(self, layer: nn.Module):
        modules = _qkv_modules(layer)
        self._out: list = [None, None, None]
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i):
        def hook(module, inputs, output):
            self._out[i] = output
        return hook

    def pop(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, self._out = tuple(self._out), [None, None, None]
        if any(t is None for t in out):
            raise RuntimeError("teacher forward did not reach the captured layer")
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def truncate_and_capture(model: nn.Module, num_layers: int, layer: int) -> QKVCapture:
    """Drop the layers above ``layer`` and hook its Q/K/V. Works on plain and ZeRO-3 models."""
    parent, attr, stack = find_layer_stack(model, num_layers)
    setattr(parent, attr, nn.ModuleList(list(stack)[:layer + 1]))
    if hasattr(model, "config"):
        model.config.num_hidden_layers = layer + 1
    return QKVCapture(getattr(parent, attr)[layer])


class Teacher:
    """A frozen encoder in a DeepSpeed inference engine; ``qkv(batch)`` returns the captured Q/K/V."""

    def __init__(self, name: str, ds_config: dict, layer: int = -1, dtype: Optional[torch.dtype] = None):
        import deepspeed
        from transformers import AutoModel
        from transformers.integrations import HfDeepSpeedConfig

        info = teacher_info(name)
        self.layer = resolve_layer(layer, info.num_layers)
        self.zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        # Kept alive: while it exists, from_pretrained partitions each weight as it is loaded, so no
        # rank ever holds the whole teacher.
        self._hf_ds_config = HfDeepSpeedConfig(ds_config) if self.zero3 else None
        model = AutoModel.from_pretrained(name, dtype=dtype) if dtype else AutoModel.from_pretrained(name)
        model.eval().requires_grad_(False)
        self.capture = truncate_and_capture(model, info.num_layers, self.layer)
        self._accepts_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        self.engine.eval()
        self.info = info

    @torch.no_grad()
    def qkv(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self._accepts_token_types:
            inputs["token_type_ids"] = batch["token_type_ids"]
        self.engine(**inputs)
        return self.capture.pop()
