"""The MiniMoE student: a post-LN BERT encoder whose FFNs are mixtures of minimal experts.

What the model *is* lives here; how it is run at scale (engines, ZeRO, launchers) does not. The only
parallel fact the model needs is ``ep_size`` (how many ranks share one set of experts) and this
rank's place among them, because DeepSpeed's MoE layer builds only the local experts.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .attention import attention
from .config import ConfigError, StudentConfig
from .dropout import Dropout
from .errors import reading
from . import model_folder as names
from .model_folder import TASK_META, write_model
from .layout import StudentShape
from .moe import DenseFeedForward, MoEFeedForward, moefy_

CONFIG_NAME, WEIGHTS_NAME = names.CONFIG_NAME, names.WEIGHTS_NAME
ROUTE_DRAWS = names.ROUTE_DRAWS


@dataclass
class StudentOutput:
    last_hidden_state: torch.Tensor
    pooled: Optional[torch.Tensor]
    aux_loss: torch.Tensor                    # load-balance loss, mean over MoE layers (0 when dense)
    expert_counts: list                       # per MoE layer: tokens routed to each expert on this rank
    qkv: Optional[tuple] = None               # (Q, K, V), each [B, L, H], for relation distillation


class Embeddings(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)

    def forward(self, input_ids, token_type_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(pos)[None] + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.output = nn.Linear(h, h)
        self.dropout_p = cfg.attention_dropout

    def forward(self, x, attn_mask):
        q, k, v = self.query(x), self.key(x), self.value(x)
        b, l, h = x.shape
        split = lambda t: t.view(b, l, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        ctx = attention(split(q), split(k), split(v), attn_mask, self.dropout_p, self.training)
        return self.output(ctx.transpose(1, 2).reshape(b, l, h)), (q, k, v)


class Layer(nn.Module):
    def __init__(self, cfg: StudentConfig, ep_size: int, index: int = 0):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)
        if cfg.num_experts == 1:
            self.ffn = DenseFeedForward(cfg.hidden_size, cfg.ffn_size, cfg.hidden_dropout)
        else:
            self.ffn = MoEFeedForward(cfg.hidden_size, cfg.ffn_size, cfg.num_experts, ep_size,
                                      cfg.hidden_dropout, cfg.gate_noise, cfg.drop_tokens,
                                      cfg.capacity_factor, cfg.route_padding, router=cfg.router, layer=index,
                                      router_seed=cfg.router_seed)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, attn_mask, attention_mask, input_ids):
        a, qkv = self.attention(x, attn_mask)
        x = self.attention_norm(x + self.dropout(a))
        f, l_aux, counts = self.ffn(x, attention_mask, input_ids)
        return self.ffn_norm(x + f), l_aux, counts, qkv


class MiniMoEModel(nn.Module):
    """MiniMoE encoder. ``num_experts == 1`` is the dense MiniLM student from the same code."""

    def __init__(self, config: StudentConfig, ep_size: int = 1, ep_rank: int = 0):
        super().__init__()
        config.validate()
        if config.num_experts % ep_size:
            raise ConfigError(f"ep_size {ep_size} must divide num_experts {config.num_experts}")
        self.config, self.ep_size, self.ep_rank = config, ep_size, ep_rank
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, ep_size, i) for i in range(config.num_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        # Distillation-only: Q/K/V over the final hidden states (paper, MoE students). Not exported
        # into compute or parameter counts of the deployed model.
        self.relation_proj = (nn.Linear(config.hidden_size, 3 * config.hidden_size)
                              if config.relation_projection else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        # Experts are drawn by moefy_ below. Skipping them here keeps the RNG stream the same for
        # every ep_size, so ranks of any expert-parallel layout build slices of one model.
        experts = {id(m) for layer in self.layers if isinstance(layer.ffn, MoEFeedForward)
                   for m in layer.ffn.local_experts.modules()}
        for m in self.modules():
            if id(m) in experts:
                continue
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for layer in self.layers:
            if isinstance(layer.ffn, MoEFeedForward):
                if layer.ffn.gate.wg is not None:
                    layer.ffn.gate.wg.reset_parameters()  # paper: the gate keeps PyTorch's default init
                moefy_(layer.ffn, self.ep_rank, self.config.moefy_shared_fraction, std)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, output_qkv: bool = False) -> StudentOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        # Boolean key mask for SDPA: True = attend. Padded queries still attend to real keys.
        attn_mask = attention_mask.bool()[:, None, None, :]
        aux, counts, qkv = [], [], None
        for layer in self.layers:
            x, l_aux, c, qkv = layer(x, attn_mask, attention_mask, input_ids)
            aux.append(l_aux)
            if c is not None:
                counts.append(c)
        if output_qkv and self.relation_proj is not None:
            qkv = tuple(self.relation_proj(x).chunk(3, dim=-1))
        aux_loss = torch.stack(aux).mean() if counts else x.new_zeros((), dtype=torch.float32)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return StudentOutput(x, pooled, aux_loss, counts, qkv if output_qkv else None)

    # ------------------------------------------------------------------ accounting

    def num_parameters(self) -> dict:
        """Global parameter counts (all experts, whatever this rank holds). See ``count_parameters``."""
        return count_parameters(self.config)

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, path: str, state_dict: Optional[dict] = None) -> None:
        """Write a Hugging Face folder: ``config.json`` + ``model.safetensors`` with every expert under its
        global id, in BERT's parameter names; a MoE student also gets its modeling code (``auto_map``), so
        ``transformers.AutoModel.from_pretrained(path, trust_remote_code=True)`` loads it, and a dense one is
        a plain ``BertModel`` folder (``minimoe.model_folder``).

        ``state_dict`` lets a caller that gathered experts from several ranks (or from checkpoint
        files) save them; by default this model must hold all experts (ep_size 1).
        """
        from . import __version__
        if state_dict is None:
            if self.ep_size != 1:
                raise ValueError("save_pretrained from an ep_size > 1 model needs the gathered state_dict")
            state_dict = self.state_dict()
        if self.config.num_experts == 1:  # a plain BertModel folder: no distillation-only projection in it
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("relation_proj.")}
        # the random router's training-forward count is loop state, not a weight (inference draws with 0)
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(ROUTE_DRAWS)}
        write_model(path, {names.to_hf(k): v for k, v in state_dict.items()},
                    names.hf_config(self.config.to_dict(), __version__))

    @classmethod
    def from_pretrained(cls, path: str, ep_size: int = 1, ep_rank: int = 0,
                        map_location: str = "cpu") -> "MiniMoEModel":
        """Load a student folder. With ep_size 1 (default) it runs in one plain process."""
        from safetensors.torch import load_file
        if os.path.isfile(os.path.join(path, TASK_META)):
            raise ConfigError(f"{path!r} is a fine-tuned task model: load it with "
                              "minimoe.heads.load_task_model, or use the student it was fine-tuned from")
        model = cls(student_config_of(path), ep_size=ep_size, ep_rank=ep_rank)
        with reading(os.path.join(path, WEIGHTS_NAME), "; export the student again"):
            state = load_file(os.path.join(path, WEIGHTS_NAME), device=map_location)
        if not any(k.startswith("layers.") for k in state):  # Hugging Face names (earlier folders used ours)
            state = {names.from_hf(k, strict=False): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(localize_experts(state, model), strict=False)
        # A folder re-saved by transformers may lack the distillation-only projection: it starts afresh.
        missing = [k for k in missing if not k.startswith("relation_proj.") and not k.endswith(ROUTE_DRAWS)]
        if missing or unexpected:
            raise ConfigError(f"{path!r}: the weights do not match its config.json (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
        return model


def student_config_of(path: str) -> StudentConfig:
    """The StudentConfig of a student (or MiniMoE task) folder's config.json, either format."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{path!r} is not a MiniMoE student folder (no {CONFIG_NAME})")
    with reading(cfg_path, "; export the student again"), open(cfg_path) as fh:
        raw = json.load(fh)
    if not names.is_student_config(raw):
        raise ConfigError(f"{cfg_path} is not a MiniMoE student's config (model_type "
                          f"{raw.get('model_type')!r}, no {names.MARKER!r})")
    known = {f.name for f in dataclasses.fields(StudentConfig)}
    return StudentConfig.from_dict(names.student_fields(raw, known))


# Expert parameters in a state dict: "layers.{i}.ffn.moe.deepspeed_moe.experts.deepspeed_experts.{j}.*"
EXPERT_KEY = "deepspeed_experts."


def localize_experts(state: dict, model: MiniMoEModel) -> dict:
    """Map a state dict with global expert ids onto ``model``'s local experts (its ep_rank's slice)."""
    e_local = model.config.num_experts // model.ep_size
    first = model.ep_rank * e_local
    out = {}
    for k, v in state.items():
        if EXPERT_KEY in k:
            head, tail = k.split(EXPERT_KEY)
            g, rest = tail.split(".", 1)
            if not first <= int(g) < first + e_local:
                continue
            k = f"{head}{EXPERT_KEY}{int(g) - first}.{rest}"
        out[k] = v
    return out


# ---------------------------------------------------------------------- parameters and FLOPs


def count_parameters(cfg: StudentConfig) -> dict:
    """Analytic parameter counts of the deployed student (pooler included, relation projection not).

    ``total`` counts every expert; ``active`` counts what one token uses (one expert per layer).
    At H384, vocab 30522: 3L dense 17.4M, 3L MoE-4 28.0M (the paper's table).
    """
    h, f, e = cfg.hidden_size, cfg.ffn_size, cfg.num_experts
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * h + 2 * h
    attention = 4 * (h * h + h) + 2 * h            # q, k, v, output + attention LayerNorm
    expert = 2 * h * f + f + h
    gate = (h * e + e) if e > 1 and cfg.router == "learned" else 0
    per_layer_shared = attention + 2 * h + gate    # + FFN LayerNorm
    pooler = h * h + h
    shared = embeddings + cfg.num_layers * per_layer_shared + pooler
    relation = 3 * (h * h + h) if cfg.relation_projection else 0
    return {
        "total": shared + cfg.num_layers * e * expert,
        "active": shared + cfg.num_layers * expert,
        "embedding": embeddings,
        "experts": cfg.num_layers * e * expert,
        "distillation_only": relation,
    }


def student_shape(cfg: StudentConfig) -> StudentShape:
    """Parameters the student trains, outside and inside its experts (for the run's memory plan)."""
    c = count_parameters(cfg)
    return StudentShape(c["total"] - c["experts"] + c["distillation_only"], c["experts"], cfg.num_experts)


def flops_per_sequence(cfg: StudentConfig, seq_len: int = 128) -> dict:
    """Forward compute of one sequence.

    ``paper_gflops``: multiply-accumulates of the encoder's Linear layers (no embeddings, no attention
    matmuls, no gate), the convention of the paper's tables: 0.68 / 0.91 / 1.36 G at 3/4/6 L x H384.
    ``forward_flops``: 2 x all MACs, attention scores and the gate included: what the hardware does.
    """
    h, f, e, L, s = cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.num_layers, seq_len
    linear_macs = L * s * (4 * h * h + 2 * h * f)
    attention_macs = L * 2 * s * s * h
    gate_macs = L * s * h * e if e > 1 and cfg.router == "learned" else 0
    return {
        "paper_gflops": linear_macs / 1e9,
        "forward_flops": 2 * (linear_macs + attention_macs + gate_macs),
    }
