"""MiniMoE encoder for Hugging Face transformers: a post-LN BERT whose FFNs are top-1 mixtures of experts.

Written into every exported MoE student folder by minimoe (Zhang et al., ACL 2023, "Lifting the Curse
of Capacity Gap in Distilling Language Models"), so that

    AutoModel.from_pretrained(folder, trust_remote_code=True)

loads the student with torch and transformers alone. Parameter names follow BERT's; each layer's FFN is
``moe.gate`` (a biased ``Linear(H, E)``) and ``moe.experts.{j}.fc1 / fc2``.

Routing is per token and stays so in traced graphs (ONNX): every expert gathers the tokens whose top-1
choice it is (``nonzero``), runs on exactly those, and scatters its output, scaled by the gate
probability, back into place. No expert computes a token it was not chosen for, an expert that gets no
token runs on an empty batch, and no choice is fixed at trace time. Padding tokens are not routed (their
FFN output is zero) unless ``route_padding`` is set.

Students trained with the ``random`` or ``hash`` router have no gate: the expert of a token is an integer
hash of its id (and, for ``random``, its position and the router's seed), with weight 1, the rule minimoe
trained them with (minimoe.moe.fixed_route; a random router draws at inference as at training's step 0).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import (BaseModelOutputWithPooling, SequenceClassifierOutput,
                                           TokenClassifierOutput)

from .configuration_minimoe import MiniMoEConfig


class MiniMoEEmbeddings(nn.Module):
    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(x))


class MiniMoESelfAttention(nn.Module):
    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x, key_mask):
        b, length, h = x.shape

        def heads(t):
            return t.view(b, length, self.num_heads, h // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                                 dropout_p=self.dropout_p if self.training else 0.0)
        return context.transpose(1, 2).reshape(b, length, h)


class MiniMoEResidualOutput(nn.Module):
    """``LayerNorm(residual + dropout(dense(x)))``: post-LN, as in BERT."""

    def __init__(self, config: MiniMoEConfig, dense: bool = True):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size) if dense else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(x) if self.dense is not None else x))


class MiniMoEAttention(nn.Module):
    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.self = MiniMoESelfAttention(config)
        self.output = MiniMoEResidualOutput(config)

    def forward(self, x, key_mask):
        return self.output(self.self(x, key_mask), x)


class MiniMoEExpert(nn.Module):
    """One minimal expert: the dense student's FFN, ``H -> F -> H`` with exact GELU."""

    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


_MASK32 = 1 << 32


def fixed_route(router: str, token_ids: torch.Tensor, layer: int, num_experts: int,
                seed: int) -> torch.Tensor:
    """The expert of each token (flattened) under the random or hash router, at inference."""
    ids = token_ids.long()
    key = ids * 0x9E3779B1 + (layer + 1) * 0x85EBCA6B
    if router == "random":
        pos = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        key = key + pos * 0xC2B2AE35 + (seed * 0x27D4EB2F) % _MASK32
    x = key.reshape(-1) % _MASK32
    for _ in range(2):  # a 32-bit xor-shift-multiply hash, in operations ONNX has for int64
        x = (torch.bitwise_xor(x // 65536, x) * 0x45D9F3B) % _MASK32
    return torch.bitwise_xor(x // 65536, x) % num_experts


class MiniMoESparseFFN(nn.Module):
    """Top-1 mixture: ``p_e(x) * expert_e(x)`` for the expert ``e`` of highest gate probability (or, without a
    gate, the expert ``fixed_route`` gives, with ``p = 1``)."""

    def __init__(self, config: MiniMoEConfig, layer: int = 0):
        super().__init__()
        self.router = getattr(config, "router", "learned")
        self.router_seed = getattr(config, "router_seed", 0)
        self.layer = layer
        self.gate = nn.Linear(config.hidden_size, config.num_experts) if self.router == "learned" else None
        self.experts = nn.ModuleList(MiniMoEExpert(config) for _ in range(config.num_experts))
        self.noise = config.gate_noise
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, routed: Optional[torch.Tensor], input_ids: Optional[torch.Tensor] = None):
        tokens = x.reshape(-1, x.shape[-1])
        if self.gate is None:
            choice = fixed_route(self.router, input_ids, self.layer, len(self.experts), self.router_seed)
            prob = torch.ones(choice.shape, device=x.device)
        else:
            # The gate runs in fp32 whatever the model's dtype, as it did in training.
            logits = F.linear(tokens.float(), self.gate.weight.float(), self.gate.bias.float())
            if self.training and self.noise > 0:
                logits = logits + torch.empty_like(logits).uniform_(-self.noise, self.noise)
            prob, choice = F.softmax(logits, dim=-1).max(dim=-1)
        if routed is not None:  # unrouted tokens choose no expert
            choice = choice.masked_fill(~routed.reshape(-1), len(self.experts))
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            idx = (choice == e).nonzero().squeeze(-1)
            y = self.dropout(expert(tokens.index_select(0, idx))).float() * prob.index_select(0, idx)[:, None]
            out = out.index_copy(0, idx, y.to(tokens.dtype))
        return out.view_as(x)


class MiniMoELayer(nn.Module):
    def __init__(self, config: MiniMoEConfig, layer: int = 0):
        super().__init__()
        self.attention = MiniMoEAttention(config)
        self.moe = MiniMoESparseFFN(config, layer)
        self.output = MiniMoEResidualOutput(config, dense=False)

    def forward(self, x, key_mask, routed, input_ids=None):
        x = self.attention(x, key_mask)
        return self.output(self.moe(x, routed, input_ids), x)


class MiniMoEPreTrainedModel(PreTrainedModel):
    config_class = MiniMoEConfig
    base_model_prefix = "minimoe"
    # Distillation-only Q/K/V projection, kept in student folders for minimoe; unused here.
    _keys_to_ignore_on_load_unexpected = [r"relation_proj\."]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


class MiniMoEPooler(nn.Module):
    def __init__(self, config: MiniMoEConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class MiniMoEModel(MiniMoEPreTrainedModel):
    def __init__(self, config: MiniMoEConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = MiniMoEEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(MiniMoELayer(config, i) for i in range(config.num_hidden_layers))
        self.pooler = MiniMoEPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, return_dict: Optional[bool] = None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]  # SDPA: True = attend; padded queries still attend
        routed = None if self.config.route_padding else attention_mask.bool()
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, key_mask, routed, input_ids)
        pooled = self.pooler(x) if self.pooler is not None else None
        if return_dict is False:
            return (x, pooled) if pooled is not None else (x,)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)


class _MiniMoEClassifier(MiniMoEPreTrainedModel):
    """The encoder, dropout and a linear classifier over ``features``; subclasses say which features."""

    output_class = SequenceClassifierOutput
    pooled = True

    def __init__(self, config: MiniMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.minimoe = MiniMoEModel(config, add_pooling_layer=self.pooled)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(dropout if dropout is not None else config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                return_dict: Optional[bool] = None, **kwargs):
        out = self.minimoe(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(out.pooler_output if self.pooled else out.last_hidden_state))
        loss = None
        if labels is not None and self.num_labels == 1:  # regression
            loss = F.mse_loss(logits.squeeze(-1), labels.float())
        elif labels is not None:  # -100 marks positions without a label, as in transformers
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), ignore_index=-100)
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return self.output_class(loss=loss, logits=logits)


class MiniMoEForSequenceClassification(_MiniMoEClassifier):
    """BERT's sentence head: the pooler (dense + tanh on the first token), dropout, a linear classifier."""


class MiniMoEForTokenClassification(_MiniMoEClassifier):
    """A linear classifier on every token (NER)."""

    output_class = TokenClassifierOutput
    pooled = False
