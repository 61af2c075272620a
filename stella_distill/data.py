"""Corpus loading: configured sources -> one list of texts, per-row text hashes and a fingerprint.

Sources (``data.train[]``) are read in order and concatenated: local ``.txt`` (one text a line),
``.jsonl``, ``.json`` (a list or JSON lines), ``.parquet``, ``.csv`` / ``.tsv``, a folder written by
``datasets.save_to_disk`` or holding such files, else a Hugging Face dataset id
(``datasets.load_dataset``). Empty, whitespace-only and non-string texts are skipped and counted;
everything else that is wrong with a file (bad JSON, a missing field, bytes that are not UTF-8) is a
:class:`UserError` naming the file and line.

The corpus fingerprint is a sha256 over the per-row text hashes, so it depends on the texts and
their order only, not on how they were split over files. The teacher cache records it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import lzma
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stella_distill.config import DataConfig, SourceConfig
from stella_distill.errors import UserError, first_line

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".tsv")
COMPRESSIONS = (".gz", ".bz2", ".xz")  # text formats may be compressed: corpus.jsonl.gz, lines.txt.xz
# what a truncated or corrupt compressed file raises while it is read (gzip/bz2: OSError; all: EOFError)
DECOMPRESSION_ERRORS = (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error)


def file_format(path: str | Path) -> tuple[str, str | None]:
    """``(format suffix, compression suffix or None)``: ``a.jsonl.gz`` -> ``(".jsonl", ".gz")``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def _is_data_file(path: str | Path) -> bool:
    fmt, compression = file_format(path)
    return fmt in FILE_SUFFIXES and not (compression and fmt == ".parquet")


def open_binary(path: Path):
    """``path`` opened for reading bytes, decompressed when its name ends in .gz, .bz2 or .xz."""
    compression = file_format(path)[1]
    if compression == ".gz":
        import gzip

        return gzip.open(path, "rb")
    if compression == ".bz2":
        import bz2

        return bz2.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    return path.open("rb")


def _decompression_error(path: Path, exc: Exception) -> UserError:
    return UserError(f"{path}: cannot decompress ({type(exc).__name__}: {exc}); is the file complete?")


_DISK_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Corpus:
    """The training texts in corpus order, with what identifies them.

    ``row_hashes[i]`` is the first 8 bytes of blake2b over ``texts[i]`` (UTF-8) read as a
    little-endian uint64; ``fingerprint`` is the sha256 hex of all row hashes in order. ``stats``
    holds the counts behind the summary line (``read``, ``skipped_empty``, ``skipped_non_string``,
    ``duplicates_dropped``, ``rows``, and ``sources``: the same per source).
    """

    texts: list[str]
    fingerprint: str
    row_hashes: np.ndarray
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def text_hashes(texts: list[str]) -> np.ndarray:
    """Per-text hash: the first 8 bytes of blake2b(text as UTF-8), as little-endian uint64."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8")).digest()[:8] for t in texts)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def corpus_fingerprint(row_hashes: np.ndarray) -> str:
    """sha256 hex over the row hashes (little-endian uint64 bytes, in order)."""
    return hashlib.sha256(np.ascontiguousarray(row_hashes, dtype="<u8").tobytes()).hexdigest()


def load_corpus(data_cfg: DataConfig, log: Callable[[str], Any] = print) -> Corpus:
    """Read every source of ``data_cfg.train`` and return the corpus.

    Order of operations: each source skips empty / non-string texts and keeps at most its own
    ``limit`` texts; sources are concatenated; ``data.dedupe`` drops exact repeats (first one
    kept); ``data.limit`` caps the total. One summary line goes to ``log``.
    """
    if not data_cfg.train:
        raise UserError("data.train: no corpus sources configured")
    texts: list[str] = []
    per_source = []
    for i, src in enumerate(data_cfg.train):
        counts = {"path": src.path, "read": 0, "skipped_empty": 0, "skipped_non_string": 0, "kept": 0}
        for value in _iter_source(src, f"data.train.{i}"):
            counts["read"] += 1
            if not isinstance(value, str):
                counts["skipped_non_string"] += 1
                continue
            value = _drop_trailing_newline(value)
            if not value.strip():
                counts["skipped_empty"] += 1
                continue
            texts.append(value)
            counts["kept"] += 1
            if src.limit is not None and counts["kept"] >= src.limit:
                break
        per_source.append(counts)

    duplicates = 0
    if data_cfg.dedupe:
        seen: set[str] = set()
        unique = []
        for t in texts:
            if t in seen:
                duplicates += 1
                continue
            seen.add(t)
            unique.append(t)
        texts = unique
    if data_cfg.limit is not None:
        texts = texts[: data_cfg.limit]

    stats = {
        "read": sum(s["read"] for s in per_source),
        "skipped_empty": sum(s["skipped_empty"] for s in per_source),
        "skipped_non_string": sum(s["skipped_non_string"] for s in per_source),
        "duplicates_dropped": duplicates,
        "rows": len(texts),
        "sources": per_source,
    }
    if not texts:
        raise UserError(
            f"data.train: the corpus is empty after reading {stats['read']} rows "
            f"({stats['skipped_empty']} empty or whitespace-only, {stats['skipped_non_string']} non-string)"
        )
    log(_summary_line(stats))
    hashes = text_hashes(texts)
    return Corpus(texts=texts, fingerprint=corpus_fingerprint(hashes), row_hashes=hashes, stats=stats)


def _summary_line(stats: dict) -> str:
    sources = "; ".join(f"{s['path']}: {s['kept']}" for s in stats["sources"])
    return (
        f"corpus: {stats['rows']} texts from {len(stats['sources'])} source(s) ({sources}); "
        f"read {stats['read']} rows, skipped {stats['skipped_empty']} empty or whitespace-only and "
        f"{stats['skipped_non_string']} non-string, dropped {stats['duplicates_dropped']} duplicates"
    )


def _drop_trailing_newline(text: str) -> str:
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


# ---------------------------------------------------------------------------------------------
# Sources


def _iter_source(src: SourceConfig, where: str) -> Iterator[Any]:
    """Yield the raw text values (str or anything else, to be skipped) of one source."""
    path = Path(src.path).expanduser()
    if path.is_file():
        yield from _iter_file(path, src.text_field, where, src.quoting)
    elif path.is_dir():
        yield from _iter_folder(path, src, where)
    elif _looks_local(src.path):
        raise UserError(f"{where}.path: {src.path}: file not found")
    else:
        yield from _iter_hub(src, where)


def _looks_local(path: str) -> bool:
    """A path that cannot be a Hub dataset id (``org/name`` or ``name``)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path or _is_data_file(path)


def _iter_file(path: Path, text_field: str, where: str, quoting: str = "auto") -> Iterator[Any]:
    suffix, compression = file_format(path)
    if compression and suffix == ".parquet":
        suffix = ".parquet" + compression  # parquet compresses inside the file; refused below
    if suffix == ".txt":
        for _, line in _decoded_lines(path):
            yield line
    elif suffix == ".jsonl":
        yield from _iter_json_lines(path, text_field, where)
    elif suffix == ".json":
        yield from _iter_json(path, text_field, where)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, text_field, where)
    elif suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, text_field, where, "\t" if suffix == ".tsv" else ",", quoting)
    else:
        raise UserError(
            f"{where}.path: {path}: unsupported file type {suffix or '(none)'!r}; "
            f"expected one of {', '.join(FILE_SUFFIXES)} (text formats also as {', '.join(COMPRESSIONS)}), "
            f"a folder, or a Hugging Face dataset id"
        )


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) per line; bytes that are not UTF-8 are an error naming the line."""
    try:
        f = open_binary(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        lineno = 0
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except DECOMPRESSION_ERRORS as exc:  # a truncated or corrupt compressed file
                raise _decompression_error(path, exc) from None
            lineno += 1
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
                ) from None


def _field_value(row: dict, text_field: str, where: str, loc: str) -> Any:
    if text_field not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise UserError(
            f"{loc}: no field {text_field!r} ({where}.text_field); every row must carry it, a row "
            f"without it is an error, not a skip (this row has: {keys})"
        )
    return row[text_field]


def _iter_json_lines(path: Path, text_field: str, where: str) -> Iterator[Any]:
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: invalid JSON ({_json_problem(exc)})") from None
        if not isinstance(row, dict):
            raise UserError(
                f"{path}:{lineno}: expected a JSON object with field {text_field!r}; got {_json_kind(row)}"
            )
        yield _field_value(row, text_field, where, f"{path}:{lineno}")


def _iter_json(path: Path, text_field: str, where: str) -> Iterator[Any]:
    try:
        with open_binary(path) as f:
            raw = f.read()
    except OSError as exc:
        if exc.errno is None:  # gzip / bz2 format errors carry no errno
            raise _decompression_error(path, exc) from None
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except DECOMPRESSION_ERRORS as exc:
        raise _decompression_error(path, exc) from None
    try:
        body = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from None
    if not body.lstrip().startswith("["):
        yield from _iter_json_lines(path, text_field, where)
        return
    try:
        items = json.loads(body)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({_json_problem(exc)})") from None
    for k, item in enumerate(items):
        loc = f"{path}: item {k}"
        if isinstance(item, dict):
            yield _field_value(item, text_field, where, loc)
        elif isinstance(item, str) or item is None:
            yield item
        else:
            raise UserError(
                f"{loc}: expected an object with field {text_field!r} or a string; got {_json_kind(item)}"
            )


def _json_problem(exc: json.JSONDecodeError) -> str:
    # some messages end in "at" already ("Invalid control character at")
    msg = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg
    return f"{msg} at column {exc.colno}"


def _json_kind(value: Any) -> str:
    names = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def csv_quoted(lines: Iterator[str], delimiter: str, probe: int = 10_000) -> bool:
    """Whether delimited text was written with csv quoting (pandas, the csv module): some field of
    the first ``probe`` lines is wholly quoted with doubled quotes inside (``"a ""quoted"" word"``), a
    form raw text almost never takes. Raw TSV (a text may start with a quote mark) says False."""
    for k, line in enumerate(lines):
        if k >= probe:
            break
        for field_ in line.rstrip("\r\n").split(delimiter):
            if (
                len(field_) >= 2
                and field_[0] == field_[-1] == '"'
                and ('""' in field_[1:-1] or field_ == '""')
            ):
                return True
    return False


def _iter_csv(
    path: Path, text_field: str, where: str, delimiter: str, quoting: str = "auto"
) -> Iterator[Any]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # .csv follows the csv module's quoting (a quoted field may hold commas and newlines); .tsv is
    # split on tabs (a text may start with a quote mark) unless it shows csv quoting (pandas output)
    if quoting == "auto":
        quoted = delimiter == "," or csv_quoted((line for _, line in _decoded_lines(path)), delimiter)
    else:
        quoted = quoting == "csv"
    mode = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
    reader = csv.reader((line for _, line in _decoded_lines(path)), delimiter=delimiter, quoting=mode)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path}: empty file (expected a header row naming {text_field!r})") from None
    if text_field not in header:
        raise UserError(
            f"{path}:1: no column {text_field!r} ({where}.text_field); the header has: {', '.join(header)}"
        )
    col = header.index(text_field)
    for row in reader:
        if not row:
            continue
        if col >= len(row):
            raise UserError(
                f"{path}:{reader.line_num}: row has {len(row)} columns, so no {text_field!r} "
                f"(column {col + 1}); a row without it is an error, not a skip"
            )
        yield row[col]


def _iter_parquet(path: Path, text_field: str, where: str) -> Iterator[Any]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for broken files
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r} ({where}.text_field); columns: {', '.join(names)}")
    for batch in pf.iter_batches(columns=[text_field], batch_size=65536):
        yield from batch.column(0).to_pylist()


def _iter_folder(path: Path, src: SourceConfig, where: str) -> Iterator[Any]:
    if any((path / m).is_file() for m in _DISK_DATASET_MARKERS):
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for unreadable folders
            raise UserError(f"{where}.path: {path}: cannot load the saved dataset ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise UserError(
                    f"{where}.split: {src.split!r} is not a split of {path} (splits: {', '.join(ds)})"
                )
            ds = ds[src.split]
        yield from _dataset_column(ds, src, where)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and _is_data_file(p))
    if not files:
        raise UserError(
            f"{where}.path: {path}: the folder holds no saved dataset and no data files "
            f"({', '.join(FILE_SUFFIXES)})"
        )
    present = set(files)
    for p in files:
        compression = file_format(p)[1]
        plain = p.with_name(p.name[: -len(compression)]) if compression else None
        if plain in present:
            raise UserError(
                f"{where}.path: {path} holds both {plain.name} and {p.name}; keep one of them (both would be read)"
            )
    for p in _files_of_split(path, files, src, where):
        yield from _iter_file(p, src.text_field, where, src.quoting)


SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test",
               "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation"}  # fmt: skip


def _split_of(relative: Path, extra: str) -> str | None:
    """The split a data file's path names, as dataset repositories name them: a folder called after
    the split (``train/part-0.jsonl``), a shard named ``NAME-00000-of-00002.parquet`` (any NAME), or a
    file name that starts with a known split (``test.jsonl``, ``dev_pairs.tsv``). ``extra`` (the
    configured split) counts as a known split name too."""
    known = dict(SPLIT_NAMES)
    known.setdefault(extra.lower(), extra.lower())
    for folder in relative.parts[:-1]:
        if folder.lower() in known:
            return known[folder.lower()]
    name = relative.name.lower()
    shard = re.match(r"^([a-z0-9]+)-\d+-of-\d+\.", name)  # the Hub's shard naming: NAME-00000-of-00003.ext
    if shard:
        return known.get(shard.group(1), shard.group(1))
    return known.get(re.split(r"[-_.]", name, maxsplit=1)[0])


def _files_of_split(folder: Path, files: list[Path], src: SourceConfig, where: str) -> list[Path]:
    """A folder whose files name several splits (a dataset repository) gives the files of
    ``src.split`` only (the test split must never leak into the corpus); other folders give all."""
    splits = {p: _split_of(p.relative_to(folder), src.split) for p in files}
    named = sorted({s for s in splits.values() if s is not None})
    if len(named) < 2:
        return files
    unnamed = [p.relative_to(folder).as_posix() for p in files if splits[p] is None]
    if unnamed:
        raise UserError(
            f"{where}.path: {folder} holds files of the splits {', '.join(named)} and files that name no "
            f"split ({', '.join(unnamed[:3])}{', ...' if len(unnamed) > 3 else ''}); move those out or name them"
        )
    want = SPLIT_NAMES.get(src.split.lower(), src.split.lower())
    chosen = [p for p in files if splits[p] == want]
    if not chosen:
        raise UserError(
            f"{where}.split: {src.split!r}: {folder} holds files of the splits {', '.join(named)} "
            f"(by their names) and none of this one"
        )
    return chosen


def _iter_hub(src: SourceConfig, where: str) -> Iterator[Any]:
    import datasets

    streaming = src.streaming  # rows as they come (with a limit, only those needed are read)
    try:
        ds = datasets.load_dataset(src.path, src.subset, split=src.split, streaming=streaming)
    except ConnectionError as exc:
        first = first_line(exc)
        raise UserError(
            f"{where}.path: {src.path!r} does not exist locally and the Hugging Face Hub could not be "
            f"reached to load it as a dataset ({first})"
        ) from None
    except FileNotFoundError as exc:
        first = first_line(exc)
        raise UserError(
            f"{where}.path: {src.path!r} does not exist locally and is not a dataset on the Hugging Face "
            f"Hub ({first})"
        ) from None
    except Exception as exc:  # e.g. an unknown split or config name
        first = first_line(exc)
        raise UserError(f"{where}.path: cannot load Hugging Face dataset {src.path!r}: {first}") from None
    if not streaming:
        yield from _dataset_column(ds, src, where)
        return
    rows = iter(ds)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (ConnectionError, OSError) as exc:
            first = first_line(exc)
            raise UserError(f"{where}.path: streaming {src.path!r} broke off: {first}") from None
        if src.text_field not in row:
            raise UserError(
                f"{where}.text_field: no column {src.text_field!r} in {src.path} (columns: {', '.join(row)})"
            )
        yield row[src.text_field]


def _dataset_column(ds, src: SourceConfig, where: str) -> Iterator[Any]:
    if src.text_field not in ds.column_names:
        raise UserError(
            f"{where}.text_field: no column {src.text_field!r} in {src.path} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    # Slices, so that a per-source limit stops early instead of materialising a huge column.
    for start in range(0, len(ds), 65536):
        yield from ds[start : start + 65536][src.text_field]
