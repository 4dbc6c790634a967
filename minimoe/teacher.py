"""The frozen teacher *model*: any Hugging Face encoder, built with only the layers up to the distilled
one, filled from its checkpoint, with the Q/K/V of that layer captured by forward hooks (no edits to
transformers' code). Where its weights live (replicated, or ZeRO-3 partitions) is ``placement.py``'s.

Loading never materialises the whole teacher on a rank: the model is built with uninitialised
weights (partitioned from the start under ZeRO-3), and each rank reads from the memory-mapped
checkpoint only the elements it keeps (``weights.LazyCheckpoint``). Layers above the distilled one
and the pooler are never built: their output is never used.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import hostmem
from . import placement as placement_lib
from .config import ConfigError
from .distributed import accelerator_name
from .weights import LazyCheckpoint, local_folder


@dataclass(frozen=True)
class QKVLayout:
    """Where one layer of an encoder family computes its Q, K and V: three Linear modules, or one fused
    Linear whose output is split by the family's own head layout."""

    names: tuple[str, ...]          # leaf names of the projection modules: three, or one fused
    families: str                   # for messages and readers
    per_head: bool = False          # fused output laid out [heads, 3, head_dim], not [3, heads, head_dim]
    biases: tuple = (None, None, None)  # bias parameters of the projection's parent added after the split

    @property
    def fused(self) -> bool:
        return len(self.names) == 1


QKV_LAYOUTS = (
    QKVLayout(("query", "key", "value"), "BERT, RoBERTa, XLM-R, ELECTRA"),
    QKVLayout(("q", "k", "v"), "MPNet"),
    QKVLayout(("q_lin", "k_lin", "v_lin"), "DistilBERT"),
    QKVLayout(("query_proj", "key_proj", "value_proj"), "DeBERTa-v2/v3"),
    QKVLayout(("Wqkv",), "ModernBERT, NomicBERT"),
    # DeBERTa (v1) projects without a bias, then adds q_bias / v_bias per head (transformers' deberta)
    QKVLayout(("in_proj",), "DeBERTa", per_head=True, biases=("q_bias", None, "v_bias")),
)
# Q/K/V are captured as the projections compute them: for rotary encoders (ModernBERT) before the rotation,
# so the relations are between the token contents the layer attends with, as for BERT's absolute positions.


@dataclass
class TeacherInfo:
    """What the teacher's config says, read before any process group (for validation)."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    model_type: str


def _hf_config(name: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--teacher {name!r} is not a loadable Hugging Face model: "
                          f"{str(e).splitlines()[0]}")


def teacher_info(name: str) -> TeacherInfo:
    cfg = _hf_config(name)
    return TeacherInfo(cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.model_type)


def truncated_config(name: str, layer: int):
    """The teacher's HF config with only the layers up to ``layer`` (an index from resolve_layer)."""
    cfg = _hf_config(name)
    cfg.num_hidden_layers = layer + 1
    if isinstance(getattr(cfg, "layer_types", None), list):  # per-layer attention kinds (ModernBERT)
        cfg.layer_types = cfg.layer_types[:layer + 1]
    return cfg


def build_encoder(hf_config, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The encoder without a pooler (unused), weights left uninitialised: the checkpoint fills them."""
    from transformers import AutoModel
    from transformers.initialization import no_init_weights
    kwargs = {"dtype": dtype} if dtype else {}
    with no_init_weights():
        try:
            return AutoModel.from_config(hf_config, add_pooling_layer=False, **kwargs)
        except TypeError:  # models without a pooler option (DistilBERT, DeBERTa)
            return AutoModel.from_config(hf_config, **kwargs)


def parameter_count(hf_config) -> int:
    """Parameters of the (truncated) teacher, counted on the meta device: no memory, no weights read. An
    encoder whose Q/K/V this module cannot find is refused here, before any process group."""
    with torch.device("meta"):
        model = build_encoder(hf_config)
    find_layer_stack(model, hf_config.num_hidden_layers)
    return sum(p.numel() for p in model.parameters())


def _checkpoint_key(name: str, keys: set, prefix: str) -> Optional[str]:
    """The checkpoint's name for a model parameter: as is, under the task model's prefix (``bert.``,
    ``roberta.``, as saved by ...ForMaskedLM), or with LayerNorm's legacy gamma/beta names."""
    legacy = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    for candidate in (name, legacy):
        for key in (candidate, f"{prefix}.{candidate}" if prefix else None):
            if key in keys:
                return key
    return None


def load_weights(model: nn.Module, ckpt: LazyCheckpoint, partitioned: bool) -> None:
    """Fill ``model``'s parameters from ``ckpt``: each rank reads only its partition when ``partitioned``."""
    keys = set(ckpt.keys())
    prefix = getattr(model, "base_model_prefix", "")
    params = [(_checkpoint_key(n, keys, prefix), n, p) for n, p in model.named_parameters()]
    missing = [n for key, n, _ in params if key is None]
    if missing:
        raise ConfigError(f"teacher checkpoint {ckpt.folder!r} lacks {len(missing)} weights the encoder "
                          f"needs, e.g. {missing[:3]}")
    with torch.no_grad():
        for key, _, param in params:
            shape, want = tuple(ckpt.shape(key)), tuple(param.ds_shape if partitioned else param.shape)
            if shape != want:
                raise ConfigError(f"teacher checkpoint {ckpt.folder!r}: {key} has shape {shape}, the config "
                                  f"says {want}")
            if partitioned:
                part, start, count = placement_lib.local_partition(param)
                if count:
                    ckpt.read_into(key, part.narrow(0, 0, count), start)
            else:
                ckpt.read_into(key, param.data)
        # Buffers the checkpoint holds (e.g. old position_ids) keep the values the config built.


def resolve_layer(layer: int, num_layers: int) -> int:
    idx = layer + num_layers if layer < 0 else layer
    if not 0 <= idx < num_layers:
        raise ConfigError(f"--teacher_layer {layer} is out of range for a {num_layers}-layer teacher")
    return idx


def find_layer_stack(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) holding the encoder's transformer layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and _find_qkv(module[0]):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    known = "; ".join(f"{'/'.join(lay.names)} ({lay.families})" for lay in QKV_LAYOUTS)
    kind = getattr(model.config, "model_type", "?")
    raise ConfigError(f"cannot find the attention layers of {type(model).__name__} ({kind}): expected a list "
                      f"of {num_layers} layers with Q/K/V Linear modules named as in one of: {known}")


def _find_qkv(layer: nn.Module) -> Optional[tuple[QKVLayout, list[tuple[str, nn.Module]]]]:
    """The layout this layer follows and its projection modules (qualified name, module), in Q, K, V order."""
    named = list(layer.named_modules())
    for layout in QKV_LAYOUTS:
        found = []
        for leaf in layout.names:
            hits = [(n, m) for n, m in named if n.rpartition(".")[2] == leaf and isinstance(m, nn.Linear)]
            if len(hits) != 1:
                break
            found.append(hits[0])
        if len(found) == len(layout.names):
            return layout, found
    return None


class QKVCapture:
    """Forward hooks that keep the outputs of one layer's Q, K and V projections, each [batch, seq, hidden]
    (a fused projection's output split by its layout; ``num_heads`` is needed for per-head layouts)."""

    def __init__(self, layer: nn.Module, num_heads: Optional[int] = None):
        layout, modules = _find_qkv(layer)
        self._out: list = [None, None, None]
        if not layout.fused:
            self._handles = [m.register_forward_hook(self._keep(i)) for i, (_, m) in enumerate(modules)]
            return
        name, module = modules[0]
        if layout.per_head and not num_heads:
            raise ValueError(f"{layout.families}: splitting its fused Q/K/V needs the number of heads")
        parent = layer.get_submodule(name.rpartition(".")[0])
        biases = [getattr(parent, b) if b else None for b in layout.biases]
        self._handles = [module.register_forward_hook(self._split(layout, num_heads, biases))]

    def _keep(self, i):
        def hook(module, inputs, output):
            self._out[i] = output
        return hook

    def _split(self, layout: QKVLayout, num_heads: Optional[int], biases: list):
        def hook(module, inputs, output):
            *lead, width = output.shape
            hidden = width // 3
            if layout.per_head:  # [..., heads, 3, head_dim]
                parts = output.view(*lead, num_heads, 3, hidden // num_heads).unbind(-2)
            else:                # [..., 3, heads, head_dim]
                parts = output.view(*lead, 3, hidden).unbind(-2)
            # the biases are read while the parent's forward runs: under ZeRO-3 that is when they are gathered
            self._out = [p.reshape(*lead, hidden) + (b if b is not None else 0)
                         for p, b in zip(parts, biases)]
        return hook

    def pop(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, self._out = tuple(self._out), [None, None, None]
        if any(t is None for t in out):
            raise RuntimeError("teacher forward did not reach the captured layer")
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class Teacher:
    """A frozen encoder in a DeepSpeed inference engine, placed as ``placement`` says; ``qkv(batch)``
    returns the captured Q/K/V of the distilled layer."""

    def __init__(self, name: str, ds_config: dict, layer: int = -1, dtype: Optional[torch.dtype] = None,
                 placement: Optional[placement_lib.Placement] = None):
        import deepspeed
        info = teacher_info(name)
        self.info = info
        self.layer = resolve_layer(layer, info.num_layers)
        if placement is None:  # the ds_config's stage decides (tests, benchmarks)
            kind = placement_lib.file_placement(ds_config) or "replicated"
            placement = placement_lib.Placement(kind, "from the ds_config")
        self.placement = placement
        ds_config = placement_lib.apply(dict(ds_config), placement)
        hf_config = truncated_config(name, self.layer)
        with LazyCheckpoint(local_folder(name)) as ckpt:
            if placement.partitioned:
                with placement_lib.partitioned_construction(ds_config):
                    model = build_encoder(hf_config, dtype)
            else:
                model = build_encoder(hf_config, dtype)
            load_weights(model, ckpt, placement.partitioned)
        model.eval().requires_grad_(False)
        stack = find_layer_stack(model, self.layer + 1)[2]
        self.capture = QKVCapture(stack[self.layer], hf_config.num_attention_heads)
        self._accepts_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        self.engine.eval()
        # after DeepSpeed's hooks: each partitioned layer's gathered weights go back to the system once freed
        self._trims = (hostmem.return_gathers_after_each(stack)
                       if placement.partitioned and accelerator_name() == "cpu" else [])

    def bytes_per_rank(self) -> int:
        """Teacher weight bytes this rank keeps (its partitions, or the whole replicated teacher)."""
        total = 0
        for p in self.engine.module.parameters():
            if hasattr(p, "ds_tensor"):
                total += p.ds_tensor.numel() * p.ds_tensor.element_size()
                if p.ds_persist:  # small weights ZeRO-3 keeps whole on every rank (persistence threshold)
                    total += p.ds_numel * p.ds_tensor.element_size()
            else:
                total += p.numel() * p.element_size()
        return total

    @torch.no_grad()
    def qkv(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self._accepts_token_types:
            inputs["token_type_ids"] = batch["token_type_ids"]
        self.engine(**inputs)
        return self.capture.pop()
