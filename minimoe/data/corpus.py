"""Documents -> BERT-style ``[CLS] A [SEP] B [SEP]`` segment pairs, tokenised once and cached.

``readers.py`` reads the documents from a ``--data`` source. Rank 0 tokenises into a cache keyed by
everything that changes the result; the other ranks load it. ``batches.py`` turns the result into
per-rank micro-batches.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from ..config import PAIR_RECIPES, ConfigError  # noqa: F401 - PAIR_RECIPES: the recipes built here
from .readers import iter_documents, local_files

CACHE_VERSION = 2  # 2: the tokenizer's hash leaves out truncation and padding; long lines are cut


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
