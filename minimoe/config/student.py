"""What a student *is*: its architecture and routing (nothing about how it is parallelised)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .base import ConfigError, _help

ROUTERS = ("learned", "random", "hash")


@dataclass
class StudentConfig:
    """Architecture of a MiniMoE student: a post-LN BERT encoder whose FFNs are top-1 expert mixtures.

    Nothing here says how the model is parallelised: ``ep_size`` is a run-time choice.
    """

    num_layers: int = field(default=4, metadata=_help("Student transformer layers."))
    hidden_size: int = field(default=384, metadata=_help("Student hidden size H."))
    num_heads: int = field(default=12, metadata=_help("Student attention heads (must divide H)."))
    ffn_size: int = field(default=1536, metadata=_help(
        "FFN inner size of each expert (the dense student's FFN)."))
    num_experts: int = field(default=4, metadata=_help("Experts per FFN; 1 gives the dense MiniLM student."))
    gate_noise: Optional[float] = field(
        default=None,
        metadata=_help("Half-width of the uniform noise added to gate logits in training (paper: = hidden "
                       "dropout). Default: hidden_dropout."))
    router: str = field(
        default="learned",
        metadata=_help("How tokens choose their expert: learned (the paper's gate), random (a uniformly "
                       "random expert per token occurrence, drawn anew each training step and fixed at "
                       "inference) or hash (a fixed hash of the token id, as in Hash Layers). random and "
                       "hash have no gate parameters, no load-balance loss, and combine each expert's output "
                       "with weight 1."))
    router_seed: int = field(default=0, metadata=_help(
        "Seed of the random router (the run's --seed).", cli=False))
    drop_tokens: bool = field(
        default=False,
        metadata=_help("Drop tokens past an expert's capacity (DeepSpeed's default). "
                       "The paper is dropless: False."))
    capacity_factor: float = field(default=1.0, metadata=_help(
        "Expert capacity factor, used only with drop_tokens."))
    route_padding: bool = field(
        default=False,
        metadata=_help("Route padding tokens through experts and count them in the load balance (the "
                       "authors' code does). Default False: padding is masked out."))
    moefy_shared_fraction: float = field(
        default=2 / 3,
        metadata=_help("Fraction of each expert's neurons copied from one shared FFN at init (paper: 2/3)."))
    relation_projection: Optional[bool] = field(
        default=None,
        metadata=_help("Take the student's Q/K/V for distillation from a separate projection of the final "
                       "hidden states (so the last layer's experts get a gradient). Default: True when "
                       "num_experts > 1."))
    hidden_dropout: float = field(default=0.1, metadata=_help("Dropout on hidden states and expert outputs."))
    attention_dropout: float = field(default=0.1, metadata=_help("Dropout on attention probabilities."))
    max_position_embeddings: int = field(default=512, metadata=_help("Position table size.", cli=False))
    type_vocab_size: int = field(default=2, metadata=_help("Segment (token type) vocabulary.", cli=False))
    layer_norm_eps: float = field(default=1e-12, metadata=_help("LayerNorm epsilon.", cli=False))
    initializer_range: float = field(default=0.02, metadata=_help("Std of the normal init.", cli=False))
    vocab_size: int = field(default=30522, metadata=_help("Set from the teacher's tokenizer.", cli=False))
    pad_token_id: int = field(default=0, metadata=_help("Set from the teacher's tokenizer.", cli=False))

    def __post_init__(self) -> None:
        if self.gate_noise is None:
            self.gate_noise = self.hidden_dropout
        if self.relation_projection is None:
            self.relation_projection = self.num_experts > 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> "StudentConfig":
        for name in ("num_layers", "hidden_size", "num_heads", "ffn_size", "num_experts", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)} is invalid: must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"--num_heads {self.num_heads} must divide --hidden_size {self.hidden_size}")
        for name in ("hidden_dropout", "attention_dropout", "gate_noise"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name} {getattr(self, name)} is invalid: must be in [0, 1)")
        if not 0.0 <= self.moefy_shared_fraction <= 1.0:
            raise ConfigError(f"--moefy_shared_fraction {self.moefy_shared_fraction} must be in [0, 1]")
        if self.router not in ROUTERS:
            raise ConfigError(f"--router {self.router!r} is invalid: allowed {', '.join(ROUTERS)}")
        if self.capacity_factor <= 0:
            raise ConfigError(f"--capacity_factor {self.capacity_factor} must be > 0")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"model_type", "minimoe_version"})
        if unknown:
            raise ConfigError(f"unknown student config keys {unknown}; allowed: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known}).validate()
