"""ONNX graphs of student and task folders, checked in onnxruntime before they are kept.

The graph is traced from the folder's own transformers model (``remote/modeling_minimoe.py`` for MoE,
BERT for dense) with torch's dynamo exporter, with dynamic batch and sequence axes. Its routing is data:
each expert gathers its tokens with ``NonZero`` and scatters its output back (``ScatterND``), so every
token runs only its top-1 expert at any batch size, and an expert may get no token at all.

Before the folder is moved into place, onnxruntime runs batches of several sizes and lengths (padding
included, and one single-token batch that leaves all but one expert of each layer without a token) and
every output must equal PyTorch's within ``tolerance``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import warnings

import torch
from torch import nn

from ..config import ConfigError
from ..errors import CheckFailed
from .. import model_folder as names
from ..model_folder import copy_tokenizer_files, staged_folder

GRAPH_NAME = "model.onnx"
REPORT_NAME = "onnx_export.json"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = {"base": ("last_hidden_state", "pooler_output"), "sequence": ("logits",), "token": ("logits",)}
# (batch, length, padded rows): one token only; odd sizes with padding; a full batch.
CHECK_BATCHES = ((1, 1, 0), (3, 17, 2), (8, 128, 3))
_HEADS = {cls: head for table in (names.MOE_CLASSES, names.BERT_CLASSES) for head, cls in table.items()}


def load_model(folder: str) -> tuple[nn.Module, str, dict]:
    """(the folder's transformers model in eval mode, its head: base / sequence / token, config.json)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{folder!r} holds no config.json: not an exported model")
    with open(path) as fh:
        raw = json.load(fh)
    arch = (raw.get("architectures") or [""])[0]
    if arch not in _HEADS or "num_hidden_layers" not in raw:
        raise ConfigError(f"{folder!r} was exported by an earlier minimoe, before students were Hugging Face "
                          f"folders: convert it first (launchers/export.py --model {folder} --format hf)")
    if raw["model_type"] == names.MOE_MODEL_TYPE:
        from .remote import modeling_minimoe as module  # the code the folder carries, from this package
    else:
        import transformers as module
    from transformers.utils import logging as hf_logging
    from ..weights import check_files
    check_files(folder)  # a truncated weights file: one line naming it, before transformers reads it
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # no per-weight bar for a model of a few files
    try:
        model = getattr(module, arch).from_pretrained(folder).eval()
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    return model, _HEADS[arch], raw


class _Graph(nn.Module):
    """Positional inputs and a tuple of tensors out: what the exporter traces."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return tuple(getattr(out, name) for name in OUTPUTS[self.head])


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines, its notes on optional torchvision ops and its deprecation warnings
    say nothing about this graph: the check that follows does."""
    import logging
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def check_batches(vocab_size: int, pad_id: int, seed: int = 0) -> list[dict]:
    """Token ids drawn at random (so tokens route to different experts), rows padded at their ends."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, length, padded in CHECK_BATCHES:
        ids = torch.randint(0, vocab_size, (b, length), generator=g)
        mask = torch.ones(b, length, dtype=torch.long)
        for row in range(padded):
            mask[row, length - 1 - row * max(1, length // 4):] = 0
        ids = ids.masked_fill(mask == 0, pad_id)
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def export_onnx(folder: str, out_dir: str, opset: int = 18, tolerance: float = 1e-4) -> dict:
    """Write ``out_dir/model.onnx`` (+ config, tokenizer and a report) and return the report."""
    import onnxruntime as ort
    model, head, raw = load_model(folder)
    example = check_batches(raw["vocab_size"], raw.get("pad_token_id") or 0, seed=1)[1]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    t0 = time.perf_counter()
    with staged_folder(out_dir) as tmp:
        graph = os.path.join(tmp, GRAPH_NAME)
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(_Graph(model, head).eval(), tuple(example[k] for k in INPUTS), graph,
                              dynamo=True, input_names=list(INPUTS), output_names=list(OUTPUTS[head]),
                              opset_version=opset,
                              dynamic_shapes=tuple({0: batch, 1: seq} for _ in INPUTS), external_data=False,
                              verbose=False)
        export_s = time.perf_counter() - t0
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        checks = []
        for inputs in check_batches(raw["vocab_size"], raw.get("pad_token_id") or 0):
            with torch.no_grad():
                want = _Graph(model, head)(*(inputs[k] for k in INPUTS))
            got = session.run(None, {k: inputs[k].numpy() for k in INPUTS})
            diff = max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want))
            checks.append({"shape": list(inputs["input_ids"].shape), "max_abs_diff": diff})
        worst = max(c["max_abs_diff"] for c in checks)
        if not worst <= tolerance:
            raise CheckFailed(f"the ONNX graph of {folder!r} differs from PyTorch by {worst:.2e} "
                              f"(> --tolerance {tolerance:g}) on {[c['shape'] for c in checks]}: "
                              f"nothing was written")
        # config and tokenizer, so the folder stands alone
        shutil.copyfile(os.path.join(folder, "config.json"), os.path.join(tmp, "config.json"))
        copy_tokenizer_files(folder, tmp)
        report = {"source": os.path.abspath(folder), "head": head, "opset": opset, "inputs": list(INPUTS),
                  "outputs": list(OUTPUTS[head]), "dynamic_axes": {"0": "batch", "1": "sequence"},
                  "experts": raw.get("num_experts", 1), "export_s": export_s, "checks": checks,
                  "max_abs_diff": worst, "tolerance": tolerance, "onnxruntime": ort.__version__,
                  "torch": torch.__version__}
        with open(os.path.join(tmp, REPORT_NAME), "w") as fh:
            json.dump(report, fh, indent=2)
    return report
