"""Reading documents from a ``--data`` source: the local files it names, or a ``datasets`` hub dataset.

Sources: a hub name (``name`` or ``org/name``, then ``:config``), or local ``.txt`` (documents separated
by blank lines), ``.json``/``.jsonl`` (one record per document, ``text_column``) and ``.parquet`` files,
comma-separated or as a glob; the text ones may be compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``:
``wiki.jsonl.gz``), and are read streaming. The checks here run before any process group starts, so a
wrong source stops a run in one line. ``corpus.py`` turns the documents into segment pairs.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
import re
from typing import Iterator, Optional

from ..config import ConfigError
from ..errors import reading

TEXT_EXTENSIONS = (".txt", ".json", ".jsonl")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # text files only: read streaming, never decompressed to disk
LOCAL_EXTENSIONS = (TEXT_EXTENSIONS + (".parquet",)
                    + tuple(ext + c for ext in TEXT_EXTENSIONS for c in COMPRESSIONS))
_ALLOWED = f"{', '.join(TEXT_EXTENSIONS)}, .parquet, and the text ones compressed: {', '.join(COMPRESSIONS)}"


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
            raise ConfigError(f"--data {p!r} is a folder; give its files, e.g. "
                              f"--data '{p.rstrip('/')}/*.jsonl'")
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
        raise ConfigError(f"{path}: no column {text_column!r} (found {f.schema_arrow.names}); "
                          "set --text_column")
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
        raise ConfigError(f"--data {name!r} is neither a local file nor a loadable dataset: "
                          f"{str(e).splitlines()[0]}")
    if text_column not in (ds.column_names or [text_column]):
        raise ConfigError(f"--data {name!r} has no column {text_column!r} (found {ds.column_names}); "
                          "set --text_column")
    for n, record in enumerate(ds, 1):
        yield _document_text(record[text_column], text_column, f"--data {name!r} record {n}")
