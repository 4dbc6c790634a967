"""How a student folder names things: minimoe's parameter and config names <-> Hugging Face's.

Student folders are Hugging Face folders. A dense student (one expert) is a plain ``BertModel``; a MoE
student is a ``minimoe`` model whose code ships in the folder (``remote/``), named like BERT wherever it
is BERT. One table each way, so writing and reading a folder cannot drift apart. Pure: no torch import.
"""
from __future__ import annotations

import re

# (minimoe name, Hugging Face name); {i} is a layer, {j} an expert, {p} the rest of the name.
PARAMETERS = (
    ("embeddings.word.{p}", "embeddings.word_embeddings.{p}"),
    ("embeddings.position.{p}", "embeddings.position_embeddings.{p}"),
    ("embeddings.token_type.{p}", "embeddings.token_type_embeddings.{p}"),
    ("embeddings.norm.{p}", "embeddings.LayerNorm.{p}"),
    ("layers.{i}.attention.query.{p}", "encoder.layer.{i}.attention.self.query.{p}"),
    ("layers.{i}.attention.key.{p}", "encoder.layer.{i}.attention.self.key.{p}"),
    ("layers.{i}.attention.value.{p}", "encoder.layer.{i}.attention.self.value.{p}"),
    ("layers.{i}.attention.output.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("layers.{i}.attention_norm.{p}", "encoder.layer.{i}.attention.output.LayerNorm.{p}"),
    ("layers.{i}.ffn.ffn.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),       # dense FFN
    ("layers.{i}.ffn.ffn.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("layers.{i}.ffn.moe.deepspeed_moe.gate.wg.{p}", "encoder.layer.{i}.moe.gate.{p}"),  # mixture
    ("layers.{i}.ffn.moe.deepspeed_moe.experts.deepspeed_experts.{j}.{p}",
     "encoder.layer.{i}.moe.experts.{j}.{p}"),
    ("layers.{i}.ffn_norm.{p}", "encoder.layer.{i}.output.LayerNorm.{p}"),
    ("pooler.{p}", "pooler.dense.{p}"),
    ("relation_proj.{p}", "relation_proj.{p}"),  # distillation only; transformers ignores it
)

# StudentConfig field -> Hugging Face config key, where they differ.
CONFIG_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
               "ffn_size": "intermediate_size", "hidden_dropout": "hidden_dropout_prob",
               "attention_dropout": "attention_probs_dropout_prob"}

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
MOE_MODEL_TYPE = "minimoe"
CODE_FILES = ("configuration_minimoe.py", "modeling_minimoe.py")
MOE_CLASSES = {"base": "MiniMoEModel", "sequence": "MiniMoEForSequenceClassification",
               "token": "MiniMoEForTokenClassification"}
BERT_CLASSES = {"base": "BertModel", "sequence": "BertForSequenceClassification",
                "token": "BertForTokenClassification"}
AUTO_MAP = {"AutoConfig": "configuration_minimoe.MiniMoEConfig", "AutoModel": "modeling_minimoe.MiniMoEModel",
            "AutoModelForSequenceClassification": "modeling_minimoe.MiniMoEForSequenceClassification",
            "AutoModelForTokenClassification": "modeling_minimoe.MiniMoEForTokenClassification"}
# The key that marks a folder written by minimoe (a dense one is otherwise any BERT).
MARKER = "minimoe_version"


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile("^" + rx.replace(r"\{p\}", r"(?P<p>.+)") + "$")


_TO_HF = [(_compile(m), h) for m, h in PARAMETERS]
_FROM_HF = [(_compile(h), m) for m, h in PARAMETERS]


def _rename(name: str, table, strict: bool) -> str:
    for rx, target in table:
        match = rx.match(name)
        if match:
            return target.format(**match.groupdict())
    if strict:
        raise KeyError(f"no {name!r} in a MiniMoE student")
    return name  # left as it is: a load then reports it as unexpected


def to_hf(name: str, strict: bool = True) -> str:
    """``layers.0.attention.query.weight`` -> ``encoder.layer.0.attention.self.query.weight``."""
    return _rename(name, _TO_HF, strict)


def from_hf(name: str, strict: bool = True) -> str:
    return _rename(name, _FROM_HF, strict)


def hf_config(student: dict, version: str) -> dict:
    """config.json of a student folder from ``StudentConfig.to_dict()``."""
    moe = student["num_experts"] > 1
    out = {MARKER: version, "model_type": MOE_MODEL_TYPE if moe else "bert",
           "architectures": [(MOE_CLASSES if moe else BERT_CLASSES)["base"]], "hidden_act": "gelu"}
    if moe:
        out["auto_map"] = dict(AUTO_MAP)
    out.update({CONFIG_KEYS.get(k, k): v for k, v in student.items()})
    return out


def student_fields(raw: dict, known: set) -> dict:
    """StudentConfig fields from a folder's config.json: Hugging Face keys (this format) or minimoe's own
    (folders exported before it). Keys that are not the student's (labels, auto_map) are left out."""
    if "num_hidden_layers" not in raw:  # the earlier format: StudentConfig.to_dict() + model_type
        return {k: v for k, v in raw.items() if k not in ("model_type", MARKER)}
    back = {v: k for k, v in CONFIG_KEYS.items()}
    return {back.get(k, k): v for k, v in raw.items() if back.get(k, k) in known}


def is_student_config(raw: dict) -> bool:
    return raw.get("model_type") == MOE_MODEL_TYPE or MARKER in raw
