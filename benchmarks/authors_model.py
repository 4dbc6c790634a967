"""The authors' MiniMoE student, teacher, loss and optimizer (GeneZC/MiniMoE), re-implemented in plain
PyTorch for ``authors_step.py``. Not minimoe's code: a faithful reading of theirs, to time against ours.

Written from a reading of their repository (HEAD 76d5d51), not copied. What follows what:

* the step (``run_distillation_bert.py``, ``main``): teacher forward under ``no_grad`` in eval mode,
  student forward in train mode, ``model_class.loss_fn``, ``loss.item()``, ``loss.backward()``,
  ``clip_grad_norm_`` (5.0, from ``scripts/moebert_minilm_3L_384H_1,4E.sh``), ``optimizer.step()``,
  ``lr_scheduler.step()`` (``get_scheduler("linear")``), ``optimizer.zero_grad()``. Their optimizer is
  ``transformers.AdamW`` (a Python loop over parameters, eps 1e-6, bias correction, decoupled weight
  decay applied after the update), in two groups: weight decay 0.01, and 0 for names containing
  ``bias`` / ``LayerNorm.weight``. transformers 5 no longer ships that class, so ``_HFAdamW`` below
  re-implements its per-parameter update. DDP (2 processes): ``find_unused_parameters=True`` as theirs.
* the student's sizes (``run_distillation_bert.py``): ``intermediate_size = 4 * 4 * hidden`` then
  ``moefy("1,4")`` cuts it into 4 experts of 1536 (``modules/modeling_moebert_gate.py``,
  ``MoEBertModel.moefy``, ``MoELinear.moefy``): expert weights are one stacked parameter per linear,
  (E, out, in), and an expert's forward indexes it (``MoELinear.forward``, ``F.linear(x, W[i], b[i])``).
  12 heads of 32; attention is not moefied ("1,4"), so its ``attn_gate`` exists but is never called.
  BERT-base dropouts (hidden 0.1, attention 0.1), GELU.
* the MoE layer (``modules/modeling_moebert_gate.py``, ``MoEBertLayer.feed_forward``): gate logits plus
  uniform noise in [1 - eps, 1 + eps] (eps = hidden dropout) in training, softmax, argmax (top-1),
  one-hot by scatter, load balance ``E * mean(gates) * fraction(tokens)`` per expert, ``.tolist()`` of
  the token counts, sort tokens by expert, split, a Python loop over experts running intermediate ->
  output dense -> dropout -> times the gate -> LayerNorm(+ residual) per expert, cat, unsort.
* the student head (``models/moebert_minilm.py``, ``MoEBertMiniLM``): relations are NOT the last layer's
  own Q/K/V: a separate ``SelfAttention`` (three 384x384 linears) on the last hidden states, 32 relation
  heads, scores / sqrt(head), + mask, softmax, dropout (0.1, the student is in train mode). Load balance:
  per-layer vectors summed over experts, mean over layers (attention experts: 1, so FFN only). Rows of
  the (B, heads, S, S) relations kept by ``masked_select`` on the token mask.
* the teacher (``models/bert_minilm.py``, ``BertMiniLM`` for ``--iteration 1``, with
  ``modules/modeling_bert.py``): a full BERT forward with ``output_relations=True``, which computes the
  Q-Q/K-K/V-V relations at EVERY layer (``BertSelfAttention.relation`` called from every layer's
  forward) and keeps only the last layer's (``all_qq_relations[-1]``); pooler included. Here: HF's eager
  BERT with hooks that compute the same relations inside every layer's self-attention.
* the loss (``MoEBertMiniLM.loss_fn``): ``kl_div(log(s + 1e-7), t + 1e-7, "batchmean")`` for Q-Q, K-K,
  V-V, mean of the three, + 0.01 x load balance.
* the mask is bool (``data/pipelines.py``, ``BertNILDataPipeline``), every sequence padded to 128.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN_DROPOUT = ATTN_DROPOUT = 0.1  # bert-base-uncased's config, which their student config starts from


# ---------------------------------------------------------------------------------------------- student

def _relations(q, k, v, ext_mask, heads: int, p: float, training: bool):
    """Q-Q, K-K, V-V softmax relations as their ``SelfAttention.relation``: (B, heads, S, S) each."""
    b, s, h = q.shape
    d = h // heads
    out = []
    for x in (q, k, v):
        x = x.view(b, s, heads, d).permute(0, 2, 1, 3)
        scores = torch.matmul(x, x.transpose(-1, -2)) / math.sqrt(d) + ext_mask
        out.append(F.dropout(F.softmax(scores, dim=-1), p, training))
    return out


def _ext_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    return (1.0 - mask[:, None, None, :].to(dtype)) * -10000.0


class ExpertLinear(nn.Module):
    """Their ``MoELinear`` after ``moefy``: one stacked (E, out, in) weight, indexed per expert."""

    def __init__(self, n_in: int, n_out: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, n_out, n_in) * 0.02)
        self.bias = nn.Parameter(torch.zeros(experts, n_out))

    def forward(self, x, i: int):
        # Indexing a slice of one parameter: its backward writes a full-size (E, out, in) gradient per call.
        return F.linear(x, self.weight[i], self.bias[i])


class Output(nn.Module):
    """dense -> dropout -> (x gate) -> LayerNorm(+ residual), as their
    ``MoEBertSelfOutput``/``MoEBertOutput``.

    The ``LayerNorm`` attribute name matters: their no-weight-decay group matches ``LayerNorm.weight``.
    """

    def __init__(self, dense: nn.Module, hidden: int):
        super().__init__()
        self.dense = dense
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x, residual, expert=None, gate=None):
        x = self.dense(x) if expert is None else self.dense(x, expert)
        x = F.dropout(x, HIDDEN_DROPOUT, self.training)
        if gate is not None:
            x = gate * x
        return self.LayerNorm(x + residual)


class Layer(nn.Module):
    """``MoEBertLayer`` with moe "1,4": dense eager attention, top-1 MoE FFN with a loop over experts."""

    def __init__(self, hidden: int, heads: int, ffn: int, experts: int):
        super().__init__()
        self.heads, self.experts, self.eps = heads, experts, HIDDEN_DROPOUT
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = Output(nn.Linear(hidden, hidden), hidden)
        self.attn_gate = nn.Linear(hidden, 1)  # theirs exists unmoefied: in the optimizer, never called
        self.ffn_gate = nn.Linear(hidden, experts)
        self.intermediate = ExpertLinear(hidden, ffn, experts)
        self.output = Output(ExpertLinear(ffn, hidden, experts), hidden)

    def attention(self, x, ext_mask):
        b, s, h = x.shape
        d = h // self.heads
        q, k, v = (lin(x).view(b, s, self.heads, d).permute(0, 2, 1, 3)
                   for lin in (self.query, self.key, self.value))
        probs = F.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + ext_mask, dim=-1)
        ctx = torch.matmul(F.dropout(probs, ATTN_DROPOUT, self.training), v)
        return self.attn_out(ctx.permute(0, 2, 1, 3).contiguous().view(b, s, h), x)

    def feed_forward(self, x):
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        gates = self.ffn_gate(flat)
        if self.training:  # their exploration noise: every logit + U[1 - eps, 1 + eps]
            gates += 1.0 + torch.rand_like(gates) * 2 * self.eps - self.eps
        gates = F.softmax(gates, -1)
        idx = torch.argmax(gates, -1)
        onehot = torch.zeros(idx.shape + (self.experts,), dtype=idx.dtype, device=idx.device).scatter_(
            -1, idx.unsqueeze(-1), 1)
        counts = onehot.float().sum(0)
        balance = self.experts * gates.mean(0) * (counts / counts.sum(0, keepdim=True))
        sizes = onehot.sum(0).tolist()  # a host sync per layer, as theirs
        self.last_sizes = sizes  # for the report's max load only
        order = idx.argsort(0)
        parts = flat.index_select(0, order).split(sizes, 0)
        top = gates.gather(-1, idx.unsqueeze(-1)).index_select(0, order).split(sizes, 0)
        outs = [self.output(F.gelu(self.intermediate(parts[i], i)), parts[i], i, top[i])
                for i in range(self.experts)]
        y = torch.cat(outs, 0).index_select(0, order.argsort(0))
        return y.reshape(b, s, h).contiguous(), balance

    def forward(self, x, ext_mask):
        return self.feed_forward(self.attention(x, ext_mask))


class AuthorsStudent(nn.Module):
    """``MoEBertMiniLM``: MoE BERT, pooler (computed, unused), then the separate relation head."""

    def __init__(self, vocab: int, layers: int, hidden: int, heads: int, ffn: int, experts: int,
                 relation_heads: int):
        super().__init__()
        self.relation_heads = relation_heads
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(512, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(Layer(hidden, heads, ffn, experts) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.rel_query, self.rel_key, self.rel_value = (nn.Linear(hidden, hidden) for _ in range(3))
        for m in self.modules():  # BERT's init; values do not change the cost, only the routing
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for layer in self.layers:  # theirs: GateLinear.moefy -> reset_parameters (kaiming uniform)
            layer.ffn_gate.reset_parameters()

    def forward(self, ids, mask, segments):
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.word_embeddings(ids) + self.token_type_embeddings(segments) + self.position_embeddings(pos)
        x = F.dropout(self.LayerNorm(x), HIDDEN_DROPOUT, self.training)
        ext = _ext_mask(mask, x.dtype)
        balances = []
        for layer in self.layers:
            x, bal = layer(x, ext)
            balances.append(bal)
        torch.tanh(self.pooler(x[:, 0]))  # their MoEBertModel runs its pooler; nothing uses it
        rels = _relations(self.rel_query(x), self.rel_key(x), self.rel_value(x), ext, self.relation_heads,
                          ATTN_DROPOUT, self.training)
        # Attention has 1 expert, so theirs takes the FFN branch: sum over experts, mean over layers.
        balance = torch.stack(balances, 0).sum(1).mean(0)
        return [_rows(r, mask) for r in rels], balance


def _rows(rel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of valid query tokens, as their ``masked_select`` + reshape: a copy even when all are valid."""
    return torch.masked_select(rel, mask.unsqueeze(1).unsqueeze(-1).expand_as(rel)).reshape(-1, rel.shape[-1])


# ---------------------------------------------------------------------------------------------- teacher

class RelationTeacher:
    """HF's eager BERT, plus the relations of every layer as their ``output_relations=True`` forward."""

    def __init__(self, path: str, relation_heads: int):
        from transformers import AutoModel
        self.model = AutoModel.from_pretrained(path, attn_implementation="eager").eval().requires_grad_(False)
        self.heads, self.ext, self.qkv, self.relations = relation_heads, None, {}, []
        for layer in self.model.encoder.layer:
            sa = layer.attention.self
            for name in ("query", "key", "value"):
                getattr(sa, name).register_forward_hook(self._keep(name))
            sa.register_forward_hook(self._relate)

    def _keep(self, name):
        def hook(_mod, _inp, out):
            self.qkv[name] = out
        return hook

    def _relate(self, _mod, _inp, _out):
        self.relations.append(_relations(self.qkv["query"], self.qkv["key"], self.qkv["value"], self.ext,
                                         self.heads, ATTN_DROPOUT, False))

    @torch.no_grad()
    def __call__(self, ids, mask, segments):
        self.ext, self.relations = _ext_mask(mask, torch.float32), []
        self.model(input_ids=ids, attention_mask=mask, token_type_ids=segments)
        return [_rows(r, mask) for r in self.relations[-1]]  # all layers computed, the last one kept


def loss_fn(t_rels, s_rels, balance):
    kl = sum(F.kl_div(torch.log(s + 1e-7), t.detach() + 1e-7, reduction="batchmean")
             for s, t in zip(s_rels, t_rels))
    return kl / 3.0 + 0.01 * balance


# -------------------------------------------------------------------------------------------- optimizer

class _HFAdamW(torch.optim.Optimizer):
    """``transformers.AdamW`` (removed in transformers 5): per-parameter Python loop, decay after the
    update."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                st["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                size = group["lr"] * math.sqrt(1 - b2 ** st["step"]) / (1 - b1 ** st["step"])
                p.addcdiv_(st["exp_avg"], st["exp_avg_sq"].sqrt().add_(group["eps"]), value=-size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def optimizer_for(model: nn.Module, lr: float = 3e-4, weight_decay: float = 1e-2):
    from transformers import get_scheduler
    no_decay = ["bias", "LayerNorm.weight", "ln.weight", "layer_norm.weight"]
    named = list(model.named_parameters())
    opt = _HFAdamW([{"params": [p for n, p in named if not any(nd in n for nd in no_decay)],
                     "weight_decay": weight_decay},
                    {"params": [p for n, p in named if any(nd in n for nd in no_decay)],
                     "weight_decay": 0.0}],
                   lr=lr)
    # Their schedule: linear, 1% warm-up over the epochs' steps; the length only sets the lr's value.
    return opt, get_scheduler("linear", optimizer=opt, num_warmup_steps=1000, num_training_steps=100000)
