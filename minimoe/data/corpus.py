"""Raw text -> BERT-style ``[CLS] A [SEP] B [SEP]`` segment pairs, tokenised once and cached.

Sources: a ``datasets`` hub name (``name`` or ``org/name``, then ``:config``), or local ``.txt``
(documents separated by blank lines), ``.json``/``.jsonl`` (one record per document, ``text_column``)
and ``.parquet`` files, comma-separated or as a glob; the text ones may be compressed (``.gz``,
``.bz2``, ``.xz``, ``.zst``: ``wiki.jsonl.gz``), and are read streaming. Rank 0 tokenises into a
cache keyed by everything that changes the result; the other ranks load it. ``batches.py`` turns the
result into per-rank micro-batches.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ..config import PAIR_RECIPES, ConfigError  # noqa: F401 - PAIR_RECIPES: the recipes built here
from ..errors import reading

TEXT_EXTENSIONS = (".txt", ".json", ".jsonl")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # text files only: read streaming, never decompressed to disk
LOCAL_EXTENSIONS = (TEXT_EXTENSIONS + (".parquet",)
                    + tuple(ext + c for ext in TEXT_EXTENSIONS for c in COMPRESSIONS))
_ALLOWED = f"{', '.join(TEXT_EXTENSIONS)}, .parquet, and the text ones compressed: {', '.join(COMPRESSIONS)}"
CACHE_VERSION = 2  # 2: the tokenizer's hash leaves out truncation and padding; long lines are cut


# ---------------------------------------------------------------------- reading documents


# A hub dataset: ``name`` or ``org/name``, optionally ``:config``. Anything else (two folders, a glob, a
# leading / or .) is local: "has a slash", the test before, took wikimedia/wikipedia for a missing file.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?")
# Script datasets that datasets (4.0 on) no longer loads, and the names their data has now.
LEGACY_HUB_NAMES = {"wikipedia": "wikimedia/wikipedia"}


def hub_source(name: str) -> tuple[str, Optional[str]]:
    """A hub name -> (path, config) for ``datasets.load_dataset``; a legacy script dataset is refused with its
    current name (datasets would fetch its script and then say only that scripts are no longer supported)."""
    path, _, config = name.partition(":")
    if path in LEGACY_HUB_NAMES:
        new = LEGACY_HUB_NAMES[path]
        raise ConfigError(f"--data {name!r} is a legacy script dataset that datasets no longer loads; its "
                          f"data is now {new!r}: --data {new}:{config or '<config>'}")
    return path, config or None


def local_files(data: str) -> Optional[list[str]]:
    """The local files named by ``data`` (comma list and/or globs), or None if it is not local."""
    parts = [p.strip() for p in data.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"--data {data!r} names nothing: give files, a glob or a dataset name")
    looks_local = any(p.endswith(LOCAL_EXTENSIONS) or p.startswith(".") or os.path.exists(p)
                      or not _HUB_NAME.fullmatch(p) for p in parts)
    if not looks_local:
        return None
    files = []
    for p in parts:
        if os.path.isdir(p):
            raise ConfigError(f"--data {p!r} is a folder; give its files, e.g. --data '{p.rstrip('/')}/*.jsonl'")
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise ConfigError(f"--data {p!r} does not exist (or matches no file)")
        for m in matches:
            if not m.endswith(LOCAL_EXTENSIONS):
                raise ConfigError(f"--data {m!r} has an unsupported extension; allowed: {_ALLOWED}")
        files += matches
    return files


def iter_documents(data: str, text_column: str = "text", streaming: bool = False) -> Iterator[str]:
    """Yield documents (strings; paragraphs separated by newlines) from local files or the hub."""
    files = local_files(data)
    if files is None:
        yield from _hub_documents(data, text_column, streaming)
        return
    for path in files:
        with reading(path, _FIX):
            if _file_type(path) == ".txt":
                yield from _txt_documents(path)
            elif path.endswith(".parquet"):
                yield from _parquet_documents(path, text_column)
            else:
                yield from _json_documents(path, text_column)


_FIX = "; repair it or leave it out of --data"
_SNIFF_BYTES = 1 << 20


def check_source(data: str, text_column: str) -> None:
    """Before any work: ``data``'s local files are readable (``check_readable``), or, when it names a hub
    dataset, a name datasets still loads (``hub_source``). Missing local files are refused too."""
    files = local_files(data)
    if files:
        check_readable(files, text_column)
    else:
        hub_source(data)


def check_readable(files: list[str], text_column: str) -> None:
    """Before any work: each text file's first MiB decodes as UTF-8 and each parquet file's footer and
    schema read, so a wrong or damaged file stops the run in one line instead of after the process group
    starts. (Damage further into a file is still named, with its path, when tokenising reaches it.)"""
    import codecs
    for path in files:
        with reading(path, _FIX):
            if path.endswith(".parquet"):
                import pyarrow.parquet as pq
                names = pq.ParquetFile(path).schema_arrow.names
                if text_column not in names:
                    raise ConfigError(f"{path}: no column {text_column!r} (found {names}); set --text_column")
            else:  # a compressed file's first MiB once decompressed: its header and the start of its stream
                with _open_binary(path) as fh:
                    codecs.getincrementaldecoder("utf-8")().decode(fh.read(_SNIFF_BYTES), final=False)


def _file_type(path: str) -> str:
    """``.txt``, ``.json``, ``.jsonl`` or ``.parquet``: the extension under a compression suffix."""
    for suffix in COMPRESSIONS:
        path = path.removesuffix(suffix)
    return os.path.splitext(path)[1]


def _open_binary(path: str):
    """``path``'s bytes, decompressed on the fly by its suffix."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    if path.endswith(".zst"):
        return _zstd_open(path)
    return open(path, "rb")


def _zstd_open(path: str):
    try:
        from compression import zstd  # the standard library's from Python 3.14
        return zstd.open(path, "rb")
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise ConfigError(f"--data {path!r} is zstd-compressed and no zstd library is installed: "
                          "pip install zstandard (or decompress it)") from None
    return io.BufferedReader(zstandard.open(path, "rb"))


def _open_text(path: str):
    if path.endswith(COMPRESSIONS):
        return io.TextIOWrapper(_open_binary(path), encoding="utf-8")
    return open(path, encoding="utf-8")


def _txt_documents(path: str) -> Iterator[str]:
    doc: list[str] = []
    with _open_text(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                doc.append(line)
            elif doc:
                yield "\n".join(doc)
                doc = []
    if doc:
        yield "\n".join(doc)


def _record_text(record, text_column: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: records must be JSON objects with a {text_column!r} field, not "
                          f"{type(record).__name__} values")
    if text_column not in record:
        raise ConfigError(f"{where}: no column {text_column!r} (found {sorted(record)}); set --text_column")
    return _document_text(record[text_column], text_column, where)


def _document_text(value, text_column: str, where: str) -> str:
    """A record's text: a string, or a list of strings (some dumps keep a document's paragraphs so), joined
    as paragraphs. Anything else was trained on as its Python repr ("['Anarchism is ...']"): refused."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(p is None or isinstance(p, str) for p in value):
        return "\n".join(p for p in value if p)
    found = _kind(value)
    if isinstance(value, list):
        found = f"a list holding {_kind(next(p for p in value if p is not None and not isinstance(p, str)))}"
    raise ConfigError(f"{where}: {text_column!r} is {found}; allowed: a string, or a list of strings (the "
                      "paragraphs of one document); set --text_column to such a field")


def _kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return {dict: "an object", list: "a list"}.get(type(value), f"a {type(value).__name__}")


def _json_documents(path: str, text_column: str) -> Iterator[str]:
    with _open_text(path) as fh:  # opened again below rather than rewound: a zstd stream reads forward only
        head = fh.read(1)
        while head and head.isspace():
            head = fh.read(1)
    if head == "[":  # a JSON array of records
        with _open_text(path) as fh:
            try:
                records = json.load(fh)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--data {path!r} is not valid JSON: {e.msg} at line {e.lineno}")
        for n, r in enumerate(records, 1):
            yield _record_text(r, text_column, f"{path} record {n}")
        return
    with _open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--data {path!r} line {n} is not valid JSON: {e.msg}")
                yield _record_text(record, text_column, f"{path} line {n}")


def _parquet_documents(path: str, text_column: str) -> Iterator[str]:
    import pyarrow.parquet as pq
    f = pq.ParquetFile(path)
    if text_column not in f.schema_arrow.names:
        raise ConfigError(f"{path}: no column {text_column!r} (found {f.schema_arrow.names}); set --text_column")
    n = 0
    for batch in f.iter_batches(columns=[text_column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            n += 1
            yield _document_text(text, text_column, f"{path} row {n}")


def _hub_documents(name: str, text_column: str, streaming: bool) -> Iterator[str]:
    import datasets
    path, config = hub_source(name)
    try:
        ds = datasets.load_dataset(path, config, split="train", streaming=streaming)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise ConfigError(f"--data {name!r} is neither a local file nor a loadable dataset: {str(e).splitlines()[0]}")
    if text_column not in (ds.column_names or [text_column]):
        raise ConfigError(f"--data {name!r} has no column {text_column!r} (found {ds.column_names}); set --text_column")
    for n, record in enumerate(ds, 1):
        yield _document_text(record[text_column], text_column, f"--data {name!r} record {n}")


# ---------------------------------------------------------------------- segment pairs

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
# The authors' data also ends sentences at ';' and before any character, and drops sentences of 7 words or
# fewer (mostly headings, list items and fragments).
_BERT_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
_BERT_MIN_WORDS = 8
# iter_examples: a "sentence" longer than both is no prose sentence but text without sentence punctuation
# (the packaged Wikipedia sample has none over 1024 characters), cut into pieces of about a prose sentence's
# length (max_seq_length characters: a quarter of a pair's tokens in English) that pack like sentences.
_LONG_SENTENCE_CHARS, _LONG_SENTENCE_CHARS_PER_TOKEN = 2048, 8


def split_sentences(document: str, recipe: str = "contiguous") -> list[str]:
    if recipe == "bert":  # counts words up to the minimum only: a "sentence" may be a 50 MB line
        return [s for para in document.split("\n") for s in _BERT_SENTENCE_END.split(para.strip())
                if len(s.split(maxsplit=_BERT_MIN_WORDS - 1)) >= _BERT_MIN_WORDS]
    return [s for para in document.split("\n") for s in _SENTENCE_END.split(para.strip()) if s]


def bounded_pieces(sentence: str, max_chars: int) -> list[str]:
    """``sentence`` cut into pieces of at most ``max_chars`` characters, at a space in the second half of
    each piece where there is one. A text without sentence punctuation (a 50 MB line) is then tokenised
    and paired like any document, instead of as one sentence of millions of tokens of which one pair can
    use a few hundred (and whose trimming took minutes)."""
    if len(sentence) <= max_chars:
        return [sentence]
    pieces, start = [], 0
    while len(sentence) - start > max_chars:
        end = sentence.rfind(" ", start + max_chars // 2, start + max_chars + 1)
        end = end if end > start else start + max_chars
        pieces.append(sentence[start:end])
        start = end + (sentence[end:end + 1] == " ")
    pieces.append(sentence[start:])
    return [p for p in pieces if p]


def held_out(document: str, eval_fraction: float) -> bool:
    """Whether ``document`` belongs to the held-out split: a hash of its text below ``eval_fraction``. The
    split depends on the text alone (not on order, seed, world size or streaming), so every run that holds
    out the same fraction of a corpus holds out the same documents, and none is ever trained on."""
    if eval_fraction <= 0:
        return False
    digest = hashlib.blake2b(document.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < eval_fraction * 2 ** 64


def select_documents(documents: Iterable[str], eval_fraction: float, side: str) -> Iterator[str]:
    """The documents of one side (``train`` or ``eval``) of the split of ``held_out``."""
    if eval_fraction <= 0:
        yield from (documents if side == "train" else ())
        return
    want = side == "eval"
    yield from (d for d in documents if held_out(d, eval_fraction) == want)


@dataclass(frozen=True)
class PairTemplate:
    """Where a tokenizer puts its special tokens around a pair (BERT, RoBERTa, MPNet, ...)."""

    prefix: tuple
    middle: tuple
    suffix: tuple
    type_a: int
    type_b: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "PairTemplate":
        a = tokenizer("hello", add_special_tokens=False)["input_ids"]
        b = tokenizer("world", add_special_tokens=False)["input_ids"]
        enc = tokenizer("hello", "world", return_token_type_ids=True)
        ids, types = enc["input_ids"], enc.get("token_type_ids") or [0] * len(enc["input_ids"])
        i = _find(ids, a, 0)
        j = _find(ids, b, i + len(a))
        return cls(tuple(ids[:i]), tuple(ids[i + len(a):j]), tuple(ids[j + len(b):]), types[i], types[j])

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def build(self, a: list, b: list) -> tuple[list, list]:
        ids = [*self.prefix, *a, *self.middle, *b, *self.suffix]
        n_a = len(self.prefix) + len(a) + len(self.middle)
        return ids, [self.type_a] * n_a + [self.type_b] * (len(ids) - n_a)


def _find(seq: list, sub: list, start: int) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise ConfigError("the tokenizer's pair template could not be read (is it a fast tokenizer?)")


def document_pairs(sentences: list[list[int]], max_tokens: int, short_seq_prob: float,
                   rng: random.Random, others: Sequence[list[list[int]]] = ()) -> Iterator[tuple[list, list]]:
    """BERT's segment-pair recipe, without the NSP label.

    Sentences are packed into chunks of a target length (shorter with ``short_seq_prob``); each chunk is
    cut at a random sentence boundary into A and B and trimmed to ``max_tokens``. With ``others`` (other
    documents' sentences: the ``bert`` recipe), B is instead taken from a random one of them, from a random
    sentence on, half of the time and whenever the chunk is one sentence; the chunk's sentences B did not use
    go back to be packed again. Without ``others`` (``contiguous``), B is always A's true continuation.
    """
    target = _target(max_tokens, short_seq_prob, rng)
    chunk: list[list[int]] = []
    length = 0
    i = 0
    while i < len(sentences):
        chunk.append(sentences[i])
        length += len(sentences[i])
        if i == len(sentences) - 1 or length >= target:
            cut = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a = [t for s in chunk[:cut] for t in s]
            if others and (len(chunk) == 1 or rng.random() < 0.5):
                other = others[rng.randrange(len(others))]
                b = []
                for s in other[rng.randrange(len(other)):]:
                    b += s
                    if len(b) >= target - len(a):
                        break
                i -= len(chunk) - cut           # B did not use them: pack them again
            elif len(chunk) >= 2:
                b = [t for s in chunk[cut:] for t in s]
            else:  # one long sentence, no other document: cut it inside
                flat = chunk[0]
                cut = rng.randint(1, len(flat) - 1) if len(flat) >= 2 else 0
                a, b = flat[:cut], flat[cut:]
            _truncate_pair(a, b, max_tokens, rng)
            if a and b:
                yield a, b
            chunk, length = [], 0
            target = _target(max_tokens, short_seq_prob, rng)
        i += 1


def _target(max_tokens: int, short_seq_prob: float, rng: random.Random) -> int:
    return rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens


def _truncate_pair(a: list, b: list, max_tokens: int, rng: random.Random) -> None:
    """Trim ``a`` and ``b`` in place to ``max_tokens`` together, BERT's way: one token at a time from the
    longer (``b`` on a tie), from its front or its back at random. Which segment loses each token depends on
    the lengths alone, so the drops are counted first and each list is sliced once (deleting from the front
    of a list one token at a time is quadratic: minutes for one pair of a long line); the random draws, one
    per token, are the same as the one-at-a-time loop's, and so are the result and the rng's state."""
    excess = len(a) + len(b) - max_tokens
    if excess <= 0:
        return
    longer_is_a = len(a) > len(b)
    first = min(excess, abs(len(a) - len(b)))  # the longer alone, down to the other's length
    rest = excess - first                       # then b, a, b, a, ...: equal lengths trim b first
    longer_front = sum(rng.random() < 0.5 for _ in range(first))
    front = [rng.random() < 0.5 for _ in range(rest)]
    a_front, b_front = sum(front[1::2]), sum(front[0::2])
    a_drop, b_drop = rest // 2, rest - rest // 2
    if longer_is_a:
        a_front, a_drop = a_front + longer_front, a_drop + first
    else:
        b_front, b_drop = b_front + longer_front, b_drop + first
    for seg, drop, from_front in ((a, a_drop, a_front), (b, b_drop, b_front)):
        del seg[len(seg) - (drop - from_front):]
        del seg[:from_front]


def iter_examples(documents: Iterable[str], tokenizer, template: PairTemplate, max_seq_length: int,
                  short_seq_prob: float, seed: int, batch_docs: int = 64,
                  recipe: str = "contiguous") -> Iterator[tuple[list, list]]:
    """Documents -> (input_ids, token_type_ids) pairs, tokenising sentences in batches (fast path). The
    ``bert`` recipe draws its random B segments from the other documents of the same batch."""
    rng = random.Random(seed)
    max_tokens = max_seq_length - template.num_special
    long_sentence = max(_LONG_SENTENCE_CHARS, _LONG_SENTENCE_CHARS_PER_TOKEN * max_seq_length)
    buf: list[str] = []

    def pieces(sentence: str) -> list[str]:
        return bounded_pieces(sentence, max_seq_length) if len(sentence) > long_sentence else [sentence]

    def flush():
        sents = [[p for s in split_sentences(d, recipe) for p in pieces(s)] for d in buf]
        flat = [s for ss in sents for s in ss]
        # verbose=False: a sentence longer than the model's maximum is expected (it is cut into pairs below)
        ids = tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"] if flat else []
        docs, k = [], 0
        for ss in sents:
            docs.append([x for x in ids[k:k + len(ss)] if x])
            k += len(ss)
        docs = [d for d in docs if d]
        for j, doc in enumerate(docs):
            others = docs[:j] + docs[j + 1:] if recipe == "bert" else ()
            for a, b in document_pairs(doc, max_tokens, short_seq_prob, rng, others):
                yield template.build(a, b)

    for doc in documents:
        if doc.strip():
            buf.append(doc)
        if len(buf) == batch_docs:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


# ---------------------------------------------------------------------- the cached corpus


@dataclass
class TokenizedCorpus:
    """Ragged storage of examples: flat token ids and types with per-example offsets."""

    ids: torch.Tensor        # int32 [total tokens]
    types: torch.Tensor      # int8  [total tokens]
    offsets: torch.Tensor    # int64 [N + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[s:e], self.types[s:e]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_examples(cls, examples: Iterable[tuple[list, list]]) -> "TokenizedCorpus":
        ids, types, offsets = [], [], [0]
        for i, t in examples:
            ids += i
            types += t
            offsets.append(len(ids))
        return cls(torch.tensor(ids, dtype=torch.int32), torch.tensor(types, dtype=torch.int8),
                   torch.tensor(offsets, dtype=torch.int64))


def tokenizer_digest(tokenizer) -> str:
    """A hash of what decides the tokens: a fast tokenizer's normalizer, pre-tokenizer, model, added tokens
    and post-processor, without its truncation and padding settings, which each call rewrites (a
    tokenizer.json saved with them changes on the first call: the key did, and each new corpus was
    tokenised twice)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return hashlib.sha256(str(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def cache_key(data: str, text_column: str, tokenizer, max_seq_length: int, short_seq_prob: float, seed: int,
              split: tuple = (0.0, "train"), recipe: str = "contiguous") -> str:
    files = local_files(data)
    source = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files] if files else data
    blob = json.dumps([CACHE_VERSION, source, text_column, tokenizer_digest(tokenizer),
                       max_seq_length, short_seq_prob, seed]
                      + ([list(split), recipe] if (split[0] > 0 or recipe != "contiguous") else []))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_or_load(data: str, text_column: str, tokenizer, max_seq_length: int, short_seq_prob: float,
                  seed: int, cache_dir: str, progress: bool = False, split: tuple = (0.0, "train"),
                  recipe: str = "contiguous") -> TokenizedCorpus:
    """Tokenise ``data`` once into ``cache_dir`` (atomically) and return it; load it if cached. ``split``:
    (eval fraction, side): only that side's documents (``held_out``)."""
    key = cache_key(data, text_column, tokenizer, max_seq_length, short_seq_prob, seed, split, recipe)
    path = os.path.join(cache_dir, "tokenized", f"{key}.pt")
    if os.path.isfile(path):
        return TokenizedCorpus(**torch.load(path))
    template = PairTemplate.from_tokenizer(tokenizer)
    docs = select_documents(iter_documents(data, text_column), *split)
    if progress:
        from tqdm import tqdm
        docs = tqdm(docs, desc="tokenising", unit="doc")
    corpus = TokenizedCorpus.from_examples(iter_examples(docs, tokenizer, template, max_seq_length,
                                                         short_seq_prob, seed, recipe=recipe))
    if len(corpus) == 0:
        what = {"train": "no training pairs", "eval": "no held-out pairs"}[split[1]]
        held = f" of the documents --eval_fraction {split[0]} leaves it" if split[0] > 0 else ""
        raise ConfigError(f"--data {data!r} gave {what}{held} (empty corpus, or documents of < 2 tokens)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"ids": corpus.ids, "types": corpus.types, "offsets": corpus.offsets}, tmp)
    os.replace(tmp, path)
    return corpus
