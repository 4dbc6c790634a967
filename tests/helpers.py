"""Test fixtures built from the real offline assets: tiny teachers with the real BERT tokenizer, a
slice of the packaged Wikipedia sample, and a spawner for real multi-process DeepSpeed runs."""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import traceback

import torch
import torch.multiprocessing as mp

from minimoe.config import PACKAGED_CORPUS, PACKAGED_TEACHER
from minimoe.data import assets
from minimoe.distributed import shutdown

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# Every encoder family the README names, plus ModernBERT, XLM-R and ELECTRA: what its tiny config needs
# beyond the common shape (DeBERTa with its relative attention on, ModernBERT with local and global layers).
FAMILIES = {
    "bert": {}, "roberta": {}, "xlm-roberta": {}, "electra": {"embedding_size": 32}, "mpnet": {},
    "distilbert": {"dim": 64, "n_layers": 3, "n_heads": 4, "hidden_dim": 128},
    "deberta": {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "max_relative_positions": 64},
    "deberta-v2": {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "position_buckets": 32,
                   "max_relative_positions": 64},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 8, "cls_token_id": 101,
                   "sep_token_id": 102, "bos_token_id": 101, "eos_token_id": 102},
}


def tiny_teacher(path: str, kind: str = "bert", hidden: int = 64, layers: int = 3, seed: int = 0) -> str:
    """A randomly initialised encoder of family ``kind`` (a key of FAMILIES, a transformers model type)
    saved with ``save_pretrained`` and the packaged bert-base-uncased tokenizer."""
    from transformers import AutoConfig, AutoModel
    torch.manual_seed(seed)
    common = dict(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=2 * hidden, max_position_embeddings=160, pad_token_id=0)
    model = AutoModel.from_config(AutoConfig.for_model(kind, **common, **FAMILIES[kind]))
    model.save_pretrained(path)
    src = assets.resolve_model(PACKAGED_TEACHER)
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(src, f), path)
    return path


def wiki_slice(path: str, docs: int = 12) -> str:
    """The first ``docs`` articles of the packaged Wikipedia sample as a JSONL file."""
    with open(assets.resolve_corpus(PACKAGED_CORPUS)) as src, open(path, "w") as dst:
        for _, line in zip(range(docs), src):
            dst.write(line)
    return path


GOOD = ["great", "wonderful", "moving", "brilliant", "fun", "superb"]
BAD = ["awful", "boring", "dull", "terrible", "bland", "weak"]


def sentiment_dir(path):
    """A tiny sentiment task folder in GLUE TSV layout (train/dev/test) whose labels the words decide."""
    rng = random.Random(0)
    os.makedirs(path, exist_ok=True)
    for split, n in (("train", 96), ("dev", 24), ("test", 24)):
        with open(os.path.join(path, f"{split}.tsv"), "w") as fh:
            fh.write("sentence\tlabel\n")
            for _ in range(n):
                y = rng.randint(0, 1)
                fh.write(f"the film was {rng.choice(GOOD if y else BAD)} and the cast "
                         f"{rng.choice(['too', 'also'])}\t{y}\n")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, fn, args, errors):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
        shutdown()  # a rank leaving with a live gloo group can abort ("terminate called without ...")
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, *args)`` in ``world`` real processes joined in one gloo process group."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_child, args=(world, free_port(), fn, args, errors), nprocs=world,
                           start_method="spawn")
    except Exception as e:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        raise AssertionError("\n".join(msgs) or str(e)) from None


def read_jsonl(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ---------------------------------------------------------------------------------------------
# The distillation launcher for real: a tiny student and teacher, 2 ranks with ep_size 2.

BIN = os.path.dirname(sys.executable)
STEPS = 24


def flags(tmp, out, **extra):
    return [f"--{k}={v}" for k, v in flag_dict(tmp, out, **extra).items()]


def flag_dict(tmp, out, **extra):
    f = {"teacher": tmp / "teacher", "data": tmp / "wiki.jsonl", "cache_dir": tmp / "cache",
         "output_dir": out,
         "num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_size": 128, "num_experts": 4,
         "relation_heads": 8, "micro_batch_size": 4, "max_seq_length": 64, "max_steps": STEPS,
         "log_every": 1, "save_every": 4, "keep_checkpoints": 50, "wandb": "disabled", "ep_size": 2}
    f.update(extra)
    return {k: str(v) if hasattr(v, "parent") else v for k, v in f.items()}


def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    return e


def deepspeed_cmd(args, procs: int = 2):
    return [f"{BIN}/deepspeed", "--num_gpus", str(procs), "--master_port", str(free_port()),
            f"{REPO}/launchers/distill.py", *args]


def torchrun_cmd(args):
    return [f"{BIN}/torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
            f"{REPO}/launchers/distill.py", *args]


def run_ok(cmd, **environ):
    """``cmd`` with the tests' environment (plus ``environ``: ``DS_ACCELERATOR="cuda"``), which must
    succeed."""
    p = subprocess.run(cmd, env={**env(), **environ}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p
