import bz2
import gzip
import json
import lzma
import os
import random
import re
import sys

import pytest
import torch
from transformers import AutoTokenizer

from minimoe.config import PACKAGED_TEACHER, ConfigError
from minimoe.errors import UnreadableFile
from minimoe.data import assets
from minimoe.data.batches import GlobalBatches, StreamingBatches
from minimoe.data import corpus as corpus_lib, readers
from minimoe.data.corpus import (PairTemplate, TokenizedCorpus, build_or_load, document_pairs, iter_examples,
                                 split_sentences)
from minimoe.data.readers import iter_documents


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(assets.resolve_model(PACKAGED_TEACHER))


def test_readers(tmp_path):
    (tmp_path / "a.txt").write_text("Doc one line one.\nDoc one line two.\n\n\nDoc two.\n")
    (tmp_path / "b.jsonl").write_text('{"text": "J1"}\n\n{"text": "J2"}\n')
    (tmp_path / "c.json").write_text(json.dumps([{"body": "A1"}, {"body": "A2"}]))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["P1", "P2"]}), tmp_path / "d.parquet")
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["Doc one line one.\nDoc one line two.",
                                                             "Doc two."]
    assert list(iter_documents(f"{tmp_path}/b.jsonl,{tmp_path}/d.parquet")) == ["J1", "J2", "P1", "P2"]
    assert list(iter_documents(str(tmp_path / "c.json"), "body")) == ["A1", "A2"]
    assert len(list(iter_documents(str(tmp_path / "*.txt")))) == 2
    with pytest.raises(ConfigError, match="no column 'text'"):
        list(iter_documents(str(tmp_path / "c.json")))
    with pytest.raises(ConfigError, match="does not exist"):
        list(iter_documents(str(tmp_path / "missing.txt")))
    (tmp_path / "e.csv").write_text("x")
    with pytest.raises(ConfigError, match="unsupported extension"):
        list(iter_documents(str(tmp_path / "e.csv")))


def test_a_text_field_may_hold_a_list_of_paragraphs_and_nothing_else(tmp_path, monkeypatch):
    # A list was trained on as its repr, "['Anarchism is ...']"; its strings are one document's paragraphs.
    (tmp_path / "a.jsonl").write_text('{"text": ["Anarchism is old.", "It is a view."]}\n'
                                      '{"text": "Plain."}\n')
    assert list(iter_documents(str(tmp_path / "a.jsonl"))) == ["Anarchism is old.\nIt is a view.", "Plain."]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [["P1a", None, "P1b"], None]}), tmp_path / "p.parquet")
    assert list(iter_documents(str(tmp_path / "p.parquet"))) == ["P1a\nP1b", ""]
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": {"title": "T", "body": "B"}}\n')
    with pytest.raises(ConfigError, match=r"b\.jsonl line 2: 'text' is an object; allowed: a string, or a "
                                          r"list of strings \(the paragraphs of one document\)"):
        list(iter_documents(str(tmp_path / "b.jsonl")))
    (tmp_path / "c.json").write_text(json.dumps([{"text": "ok"}, {"text": 7}]))
    with pytest.raises(ConfigError, match=r"c\.json record 2: 'text' is a number \(7\); allowed"):
        list(iter_documents(str(tmp_path / "c.json")))
    pq.write_table(pa.table({"text": [[1, 2]]}), tmp_path / "q.parquet")
    with pytest.raises(ConfigError, match=r"q\.parquet row 1: 'text' is a list holding a number \(1\);"):
        list(iter_documents(str(tmp_path / "q.parquet")))
    (tmp_path / "d.jsonl").write_text('{"text": [["nested"]]}\n')
    with pytest.raises(ConfigError, match=r"d\.jsonl line 1: 'text' is a list holding a list; allowed"):
        list(iter_documents(str(tmp_path / "d.jsonl")))

    class Hub(list):  # what datasets.load_dataset returns, without the network
        column_names = ["text"]

    import datasets
    records = Hub([{"text": ["H1", "H2"]}, {"text": 3.5}])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: records)
    docs = iter_documents("someset")
    assert next(docs) == "H1\nH2"
    with pytest.raises(ConfigError, match=r"--data 'someset' record 2: 'text' is a number \(3\.5\);"):
        next(docs)


def _zstd_open():
    try:
        from compression import zstd  # Python 3.14
        return zstd.open
    except ImportError:
        pass
    try:
        import zstandard
        return zstandard.open
    except ImportError:
        return None


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_corpora_are_read_as_they_come(suffix, tok, tmp_path):
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _zstd_open()}[suffix]
    if opener is None:
        pytest.skip("no zstd library (compression.zstd, zstandard) to write the file")
    cases = [("c.txt", b"Doc one, line one.\nDoc one, line two.\n\nDoc two.\n",
              ["Doc one, line one.\nDoc one, line two.", "Doc two."]),
             ("c.jsonl", b'{"text": "J1"}\n\n{"text": ["J2a", "J2b"]}\n', ["J1", "J2a\nJ2b"]),
             ("c.json", b' [{"text": "A1"}, {"text": "A2"}]', ["A1", "A2"])]
    for name, raw, want in cases:
        path = str(tmp_path / (name + suffix))
        with opener(path, "wb") as fh:
            fh.write(raw)
        assert readers.local_files(path) == [path]
        readers.check_readable([path], "text")
        assert list(iter_documents(path)) == want
    assert len(readers.local_files(str(tmp_path / f"*{suffix}"))) == 3
    data = str(tmp_path / f"c.txt{suffix}")
    with opener(data, "wb") as fh:
        fh.write(b"The cat sat on the mat. It was warm. The dog came by. It barked.\n")
    build_or_load(data, "text", tok, 32, 0.0, 1, str(tmp_path / "cache"))
    assert len(build_or_load(data, "text", tok, 32, 0.0, 1, str(tmp_path / "cache"))) >= 1
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1
    (tmp_path / f"bad.txt{suffix}").write_bytes(b"plain text, not compressed\n" * 10)
    with pytest.raises(UnreadableFile, match=rf"bad\.txt\{suffix}' is truncated or corrupt"):
        readers.check_readable([str(tmp_path / f"bad.txt{suffix}")], "text")


def test_compressed_corpora_need_their_library_and_a_text_file_inside(tmp_path, monkeypatch):
    (tmp_path / "c.jsonl.zst").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "compression.zstd", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ConfigError, match="c.jsonl.zst' is zstd-compressed and no zstd library is installed: "
                                          "pip install zstandard"):
        list(iter_documents(str(tmp_path / "c.jsonl.zst")))
    (tmp_path / "d.parquet.gz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"unsupported extension; allowed: \.txt, \.json, \.jsonl, "
                                          r"\.parquet, and the text ones compressed: \.gz, \.bz2, \.xz, "
                                          r"\.zst"):
        readers.local_files(str(tmp_path / "d.parquet.gz"))
    (tmp_path / "e.txt.xz").write_bytes(lzma.compress(b"Cut short. " * 1000)[:-40])
    with pytest.raises(UnreadableFile, match=r"e\.txt\.xz' is truncated or corrupt"):
        list(iter_documents(str(tmp_path / "e.txt.xz")))


def test_hub_names_are_parsed_as_datasets_names_them_today(tmp_path):
    # org/name was taken for a local path with a slash ("does not exist"): the README's own example failed.
    assert readers.local_files("wikimedia/wikipedia:20231101.en") is None
    assert readers.hub_source("wikimedia/wikipedia:20231101.en") == ("wikimedia/wikipedia", "20231101.en")
    assert readers.local_files("imdb") is None and readers.hub_source("imdb") == ("imdb", None)
    for local in (str(tmp_path / "missing"), "data/sub/missing", "./missing", "corpora/*.jsonl"):
        with pytest.raises(ConfigError, match="does not exist"):
            readers.local_files(local)
    with pytest.raises(ConfigError, match=r"'wikipedia:20231101\.en' is a legacy script dataset that "
                                          r"datasets no longer loads; its data is now 'wikimedia/wikipedia': "
                                          r"--data wikimedia/wikipedia:20231101\.en"):
        readers.hub_source("wikipedia:20231101.en")
    # Every hub name the README gives parses, and none is a legacy one.
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    names = [m for m in re.findall(r"--data[ =]([\w./:-]+)", readme) if _hub_like(m)]
    assert "wikimedia/wikipedia:20231101.en" in names
    for name in names:
        readers.hub_source(name)
    from minimoe.data.tasks import TASKS
    assert {t.hub[0] for t in TASKS.values() if t.hub and t.name != "conll2003"} == {"nyu-mll/glue"}


def _hub_like(name):
    try:
        return not name.startswith("packaged:") and readers.local_files(name) is None
    except ConfigError:  # a local path of the README's examples
        return False


def test_sentences_and_pair_template(tok):
    assert split_sentences("One here. Two there! (Three) ok.\nNew para") == ["One here.", "Two there!",
                                                                             "(Three) ok.", "New para"]
    t = PairTemplate.from_tokenizer(tok)
    ids, types = t.build([7, 8], [9])
    assert ids == [tok.cls_token_id, 7, 8, tok.sep_token_id, 9, tok.sep_token_id]
    assert types == [0, 0, 0, 0, 1, 1] and t.num_special == 3


def test_segment_pairs_are_continuations_within_the_length():
    rng = random.Random(0)
    sents = [list(range(100 * i, 100 * i + n)) for i, n in enumerate([5, 9, 30, 2, 14, 60, 7, 7, 3, 40])]
    pairs = list(document_pairs(sents, 50, 0.0, rng))
    assert pairs
    for a, b in pairs:
        assert a and b and len(a) + len(b) <= 50
        assert a[-1] < b[0]  # B continues A in the document's order


def _truncate_one_at_a_time(a, b, max_tokens, rng):
    """BERT's truncate_seq_pair as it was written here before: the rule _truncate_pair must keep."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        del longer[0 if rng.random() < 0.5 else -1]


def test_truncating_a_pair_keeps_the_one_token_at_a_time_rule_and_random_draws():
    for seed in range(500):
        r = random.Random(seed)
        a, b = list(range(r.randint(0, 200))), list(range(1000, 1000 + r.randint(0, 200)))
        max_tokens = r.randint(1, 260)
        want_a, want_b, want_rng = a[:], b[:], random.Random(seed + 1)
        rng = random.Random(seed + 1)
        _truncate_one_at_a_time(want_a, want_b, max_tokens, want_rng)
        corpus_lib._truncate_pair(a, b, max_tokens, rng)
        assert (a, b) == (want_a, want_b), seed
        assert rng.random() == want_rng.random()  # as many draws: the pairs after it are the same too


def test_one_sentence_of_millions_of_tokens_is_trimmed_in_one_pass():
    # Trimmed one token at a time from the front, this took minutes (quadratic); sliced once, under a second.
    pairs = list(document_pairs([list(range(2_000_000))], 125, 0.0, random.Random(0)))
    assert len(pairs) == 1
    a, b = pairs[0]
    assert len(a) + len(b) == 125 and a[-1] < b[0]


def test_a_long_line_without_sentence_punctuation_is_paired_like_a_document(tok):
    words = ["river", "stone", "alpha", "meadow", "copper", "violet", "harbor", "signal"]
    line = " ".join(words[(i * 7 + i // 8) % 8] for i in range(300_000))  # one 2 MB "sentence"
    t = PairTemplate.from_tokenizer(tok)
    examples = list(iter_examples([line], tok, t, 128, 0.0, 0))
    # Cut into pieces of max_seq_length characters, tokenised and packed as sentences: the line gives a pair
    # per ~125 of its 300k tokens, most of its text (it gave one pair, from one 300k-token sentence).
    assert len(examples) > 1500
    assert all(len(ids) <= 128 and len(ids) == len(types) for ids, types in examples)
    assert sum(len(ids) for ids, _ in examples) > 0.6 * 300_000
    # A long sentence of prose is never cut, whatever max_seq_length: one sentence, one pair, as before.
    sentence = "the cat sat on the mat and looked at the long and winding river for a while, " * 25
    assert 1900 < len(sentence) < 2048
    assert len(list(iter_examples([sentence], tok, t, 32, 0.0, 0))) == 1
    assert len(list(iter_examples([sentence * 2], tok, t, 32, 0.0, 0))) > 10


def test_cache_is_built_once_and_keyed(tok, tmp_path):
    data = tmp_path / "c.txt"
    data.write_text("The cat sat on the mat. It was warm. The dog came by. It barked.\n\n"
                    "Another doc. With text.\n")
    c1 = build_or_load(str(data), "text", tok, 32, 0.0, 1, str(tmp_path / "cache"))
    files = list((tmp_path / "cache" / "tokenized").iterdir())
    c2 = build_or_load(str(data), "text", tok, 32, 0.0, 1, str(tmp_path / "cache"))
    assert torch.equal(c1.ids, c2.ids) and len(files) == 1
    build_or_load(str(data), "text", tok, 64, 0.0, 1, str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2


def test_cache_key_does_not_change_when_the_tokenizer_is_called(tmp_path):
    # A fresh tokenizer: the packaged tokenizer.json carries truncation and padding settings that its first
    # call clears; the key hashed them, so the second build_or_load of a run (rank 0's) tokenised again.
    fresh = AutoTokenizer.from_pretrained(assets.resolve_model(PACKAGED_TEACHER))
    data = tmp_path / "c.txt"
    data.write_text("The cat sat on the mat. It was warm. The dog came by. It barked.\n")
    before = corpus_lib.cache_key(str(data), "text", fresh, 32, 0.0, 1)
    fresh("one", "two", truncation=True, max_length=8, padding="max_length")
    assert corpus_lib.cache_key(str(data), "text", fresh, 32, 0.0, 1) == before
    fresh = AutoTokenizer.from_pretrained(assets.resolve_model(PACKAGED_TEACHER))
    build_or_load(str(data), "text", fresh, 32, 0.0, 1, str(tmp_path / "cache"))
    build_or_load(str(data), "text", fresh, 32, 0.0, 1, str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 1


def _corpus(n):
    return TokenizedCorpus.from_examples([([i] * (1 + i % 5), [0] * (1 + i % 5)) for i in range(n)])


def test_global_batches_split_one_order_over_ranks_and_micro_steps():
    corpus = _corpus(40)

    def samples(world, accum, step):
        out = []
        for r in range(world):
            for b in GlobalBatches(corpus, 2, accum, world, r, 5, 0).micro_batches(step):
                out += b["input_ids"][:, 0].tolist()
        return sorted(out)

    a, b = samples(1, 4, 3), samples(2, 2, 3)  # global batch 8 either way
    assert a == b and len(set(a)) == 8
    assert samples(4, 1, 3) == a
    batch = GlobalBatches(corpus, 4, 1, 1, 0, 5, 0).micro_batches(0)[0]
    assert batch["attention_mask"].sum(1).tolist() == [(int(x) % 5) + 1 for x in batch["input_ids"][:, 0]]


def test_streaming_batches_restart_and_resume():
    def make(epoch, rank, world):
        return iter([([rank, i], [0, 0]) for i in range(7) if i % world == rank])

    s = StreamingBatches(make, 2, 1, 1, 0, 3, 0, shuffle_buffer=4)
    seq = [s.micro_batches(k)[0]["input_ids"][:, 1].tolist() for k in range(8)]
    flat = [x for b in seq for x in b]
    assert sorted(flat[:7]) == list(range(7))  # one full pass, shuffled, then the next epoch
    resumed = StreamingBatches(make, 2, 1, 1, 0, 3, 0, shuffle_buffer=4)
    assert [resumed.micro_batches(k)[0]["input_ids"][:, 1].tolist() for k in range(5, 8)] == seq[5:]
    with pytest.raises(RuntimeError, match="read in order"):
        resumed.micro_batches(3)
    empty = StreamingBatches(lambda e, r, w: iter([]), 2, 1, 1, 0, 3, 0)
    with pytest.raises(ConfigError, match="got no training pairs from the stream"):
        empty.micro_batches(0)
