"""The model-folder format: what a student or task-model folder holds and how it names things.

Student folders are Hugging Face folders. A dense student (one expert) is a plain ``BertModel``; a MoE
student is a ``minimoe`` model whose code ships in the folder (``export/remote/``), named like BERT wherever
it is BERT. One table each way (minimoe's parameter and config names <-> Hugging Face's), so writing and
reading a folder cannot drift apart; the file names (``config.json``, ``task.json``, ...); and the writers
every folder goes through (``write_model``, ``staged_folder``). Low in the house: ``student`` and ``heads``
read and write their folders with it; ``export/`` (cards, ONNX, converting folders) sits above them all.
Nothing here imports torch at module level.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

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


# ---------------------------------------------------------------------- files

TASK_META = "task.json"           # a fine-tuned model's own facts: task, kind, labels, source
HEAD_FILE = "head.safetensors"    # minimoe's layout, for task models on other Hugging Face encoders
REMOTE_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export", "remote")


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
    tmp = os.path.join(folder, WEIGHTS_NAME + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in hf_state.items()}, tmp,
              metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, WEIGHTS_NAME))
    with open(os.path.join(folder, CONFIG_NAME), "w") as fh:
        json.dump(config, fh, indent=2)
    if config["model_type"] == MOE_MODEL_TYPE:
        copy_code(folder)


def copy_code(folder: str) -> None:
    """The modeling code a MoE folder needs for ``trust_remote_code`` (``remote/``)."""
    for f in CODE_FILES:
        shutil.copyfile(os.path.join(REMOTE_CODE, f), os.path.join(folder, f))


def copy_tokenizer_files(src: str, dst: str) -> None:
    """The tokenizer's files of a model folder (what ``save_pretrained`` of a tokenizer writes)."""
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "special_tokens", "vocab")) and os.path.isfile(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


# ---------------------------------------------------------------------- task models


def head_of(kind: str) -> str:
    return "token" if kind == "ner" else "sequence"


ROUTE_DRAWS = "route_draws"  # the random router's buffer (``moe.MoEFeedForward``): never in a model folder


def task_prefix(num_experts: int) -> str:
    """Where transformers' task classes keep the encoder: ``minimoe.`` for MoE, ``bert.`` for BERT."""
    return MOE_MODEL_TYPE + "." if num_experts > 1 else "bert."


def task_state_to_hf(state: dict, kind: str, num_experts: int) -> dict:
    """TaskModel state (``encoder.*``, ``dense.*``, ``out.*``) -> transformers' task-model  The
    encoder's own pooler and relation projection are not part of a task model and are left out."""
    prefix, out = task_prefix(num_experts), {}
    for k, v in state.items():
        if k.startswith("encoder."):
            inner = k[len("encoder."):]
            # the random router's training-forward count is loop state, not a weight (inference draws with 0)
            if not inner.startswith(("pooler.", "relation_proj.")) and not inner.endswith(ROUTE_DRAWS):
                out[prefix + to_hf(inner)] = v
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
            out["encoder." + from_hf(k[len(prefix):])] = v
        elif k.startswith("classifier."):
            out["out." + k[len("classifier."):]] = v
    return out
