"""Corpus sources: what one ``data.train[]`` entry holds, read row by row, and what identifies it.

A source is a local file (``.txt`` one text a line, ``.jsonl``, ``.json`` (a list or JSON lines),
``.parquet``, ``.csv`` / ``.tsv``; the text formats also gzip/bz2/xz-compressed), a folder written by
``datasets.save_to_disk`` or holding such files, or else a Hugging Face dataset id
(``datasets.load_dataset``). :func:`iter_source` yields each row's raw text value (a string, or anything
else, which the corpus skips and counts) in the source's order, holding one row (or one small slice of
a saved dataset) at a time. Everything that is wrong with a file (bad JSON, a missing field, bytes that
are not UTF-8) is a :class:`UserError` naming the file and line.

:func:`identities` says what each source is made of, so that the corpus table built from it can be
trusted later: for local data, every file read with its size, modification time and sha256 of its
bytes; for a Hub dataset, its id, split, subset and the commit its revision resolves to.

Readers never know about the corpus table (``data.py``) that these rows fill.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stella_distill import tables
from stella_distill.config import SourceConfig
from stella_distill.errors import UserError, first_line
from stella_distill.files import sha256_range
from stella_distill.hub import looks_local
from stella_distill.tables import COMPRESSIONS, FILE_SUFFIXES, file_format, is_data_file

_DISK_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# rows of a saved dataset taken at once: bounded memory even for rows that are long documents
_DATASET_SLICE = 4096
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_BLOCK = 64 << 20  # bytes hashed by one thread at a time


def iter_source(src: SourceConfig, where: str, *, streaming: bool, revision: str | None) -> Iterator[Any]:
    """Yield the raw text values of one source (a str, or anything else, to be skipped), in order.

    ``where`` is the source's config path (``data.train.0``) for errors. ``streaming`` and
    ``revision`` (a resolved commit, or the configured revision) apply to Hub datasets only.
    """
    path = Path(src.path).expanduser()
    if path.is_file():
        yield from _iter_file(path, src.text_field, where, src.quoting)
    elif path.is_dir():
        yield from _iter_folder(path, src, where)
    elif looks_local(src.path):
        raise UserError(f"{where}.path: {src.path}: file not found")
    else:
        yield from _iter_hub(src, where, streaming, revision)


def streams(src: SourceConfig, data_limit: int | None) -> bool:
    """Whether a Hub source is streamed: as configured, else whenever a limit caps what is read
    (``limit`` of the source, or ``data.limit``): then only the rows needed are fetched."""
    if src.streaming is not None:
        return src.streaming
    return src.limit is not None or data_limit is not None


def is_local(src: SourceConfig) -> bool:
    """Whether a source is local data (an existing file or folder, or a name that can only be a path)."""
    return Path(src.path).expanduser().exists() or looks_local(src.path)


# ---------------------------------------------------------------------------------------------
# Identity


def identities(srcs: list[SourceConfig]) -> list[dict]:
    """What the rows of each source are made of, as recorded with the corpus table.

    Local data: ``{"files": [{"path", "size", "mtime_ns", "sha256"}, ...]}`` for every file the source
    reads; ``sha256`` is that of the file's bytes, or for a file over 64 MiB the sha256 of the sha256
    of each 64 MiB block, so that threads hash blocks of one big file at once too (hashlib releases the
    GIL: on N cores a 25 GB file takes about 1/N of a single pass). A Hub dataset: ``{"hub": id,
    "commit": ...}``, the commit the configured revision points at now, or None when the Hub cannot be
    asked (offline).
    """
    found: list[dict] = []
    entries: list[dict] = []  # every local file's entry, in the order of ``files``
    files: list[tuple[Path, int]] = []
    for i, src in enumerate(srcs):
        if not is_local(src):
            found.append({"hub": src.path, "commit": hub_commit(src)})
            continue
        found.append({"files": []})
        for p in local_files(src, f"data.train.{i}"):
            st = p.stat()
            entries.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
            found[-1]["files"].append(entries[-1])
            files.append((p, st.st_size))
    for entry, digest in zip(entries, _digests(files)):  # all files at once: one pool of threads
        entry["sha256"] = digest
    return found


def _digests(files: list[tuple[Path, int]]) -> list[str]:
    blocks = [
        (k, path, start) for k, (path, size) in enumerate(files) for start in range(0, max(size, 1), _BLOCK)
    ]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(blocks)))) as pool:
        parts = list(pool.map(lambda block: sha256_range(block[1], block[2], _BLOCK), blocks))
    per_file: list[list[bytes]] = [[] for _ in files]
    for (k, _, _), digest in zip(blocks, parts):
        per_file[k].append(digest)
    return [d[0].hex() if size <= _BLOCK else hashlib.sha256(b"".join(d)).hexdigest()
            for d, (_, size) in zip(per_file, files)]  # fmt: skip


def local_files(src: SourceConfig, where: str) -> list[Path]:
    """The files a local source reads, absolute, in reading order (a saved dataset: all its files)."""
    path = Path(src.path).expanduser().absolute()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{where}.path: {src.path}: file not found")
    if _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    return _files_of_split(path, _data_files(path, where), src, where)


def changed_files(recorded: dict, now: dict) -> str | None:
    """How the files of one source differ between two :func:`identity` records, or None.

    Size and modification time are the quick look; the sha256 of the bytes decides: a file that was
    only touched (same bytes) is unchanged, one edited in place with its time restored is not.
    """
    old = {f["path"]: f for f in recorded.get("files", [])}
    new = {f["path"]: f for f in now.get("files", [])}
    for name in new:
        if name not in old:
            return f"{name} is new"
    for name, was in old.items():
        cur = new.get(name)
        if cur is None:
            return f"{name} is gone"
        if cur["size"] != was["size"]:
            return f"{name} changed (size {was['size']} -> {cur['size']} bytes)"
        if cur["sha256"] != was["sha256"]:
            when = "same size and time" if cur["mtime_ns"] == was["mtime_ns"] else "same size"
            return f"{name} changed (content differs, {when})"
    return None


def hub_commit(src: SourceConfig) -> str | None:
    """The commit ``src.revision`` (default: the main branch) of Hub dataset ``src.path`` points at now.

    A full commit id is its own answer; anything else asks the Hub (one small API call, no data). None
    when the Hub cannot be asked (``HF_HUB_OFFLINE``, no network, no such dataset): loading the
    dataset then reports what is wrong, or reads the local Hub cache.
    """
    if src.revision and _COMMIT.match(src.revision):
        return src.revision
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(src.path, revision=src.revision).sha
    except Exception:  # offline mode, connection errors, unknown or gated ids: load_dataset says which
        return None


# ---------------------------------------------------------------------------------------------
# Files


def _iter_file(path: Path, text_field: str, where: str, quoting: str = "auto") -> Iterator[Any]:
    suffix, compression = file_format(path)
    if compression and suffix == ".parquet":
        suffix = ".parquet" + compression  # parquet compresses inside the file; refused below
    if suffix == ".txt":
        for _, line in tables.decoded_lines(path):
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


def _field_value(row: dict, text_field: str, where: str, loc: str) -> Any:
    if text_field not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise UserError(
            f"{loc}: no field {text_field!r} ({where}.text_field); every row must carry it, a row "
            f"without it is an error, not a skip (this row has: {keys})"
        )
    return row[text_field]


def _json_text(loc: str, item: Any, listed: bool, text_field: str, where: str) -> Any:
    """The text of one JSON row: an object's ``text_field``, or the item itself in a list of texts."""
    if isinstance(item, dict):
        return _field_value(item, text_field, where, loc)
    if listed and (isinstance(item, str) or item is None):
        return item
    wanted = (
        f"an object with field {text_field!r} or a string"
        if listed
        else f"a JSON object with field {text_field!r}"
    )
    raise UserError(f"{loc}: expected {wanted}; got {tables.json_kind(item)}")


def _iter_json_lines(path: Path, text_field: str, where: str) -> Iterator[Any]:
    for loc, row in tables.json_lines(path):
        yield _json_text(loc, row, False, text_field, where)


def _iter_json(path: Path, text_field: str, where: str) -> Iterator[Any]:
    for loc, item, listed in tables.json_items(path):
        yield _json_text(loc, item, listed, text_field, where)


def _iter_csv(
    path: Path, text_field: str, where: str, delimiter: str, quoting: str = "auto"
) -> Iterator[Any]:
    rows = tables.delimited_rows(path, delimiter, quoting)
    try:
        _, header = next(rows)
    except StopIteration:
        raise UserError(f"{path}: empty file (expected a header row naming {text_field!r})") from None
    if text_field not in header:
        raise UserError(
            f"{path}:1: no column {text_field!r} ({where}.text_field); the header has: {', '.join(header)}"
        )
    col = header.index(text_field)
    for lineno, row in rows:
        if not row:
            continue
        if col >= len(row):
            raise UserError(
                f"{path}:{lineno}: row has {len(row)} columns, so no {text_field!r} "
                f"(column {col + 1}); a row without it is an error, not a skip"
            )
        yield row[col]


def _iter_parquet(path: Path, text_field: str, where: str) -> Iterator[Any]:
    hint = f" ({where}.text_field)"
    for _, row in tables.parquet_rows(path, [text_field], hint=hint):
        yield row[text_field]


# ---------------------------------------------------------------------------------------------
# Folders


def _is_saved_dataset(path: Path) -> bool:
    return any((path / m).is_file() for m in _DISK_DATASET_MARKERS)


def _iter_folder(path: Path, src: SourceConfig, where: str) -> Iterator[Any]:
    if _is_saved_dataset(path):
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
    for p in _files_of_split(path, _data_files(path, where), src, where):
        yield from _iter_file(p, src.text_field, where, src.quoting)


def _data_files(path: Path, where: str) -> list[Path]:
    """The data files under a folder, sorted; a file beside its own compressed copy is refused."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p))
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
    return files


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


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def _iter_hub(src: SourceConfig, where: str, streaming: bool, revision: str | None) -> Iterator[Any]:
    import datasets

    try:
        ds = datasets.load_dataset(
            src.path, src.subset, split=src.split, streaming=streaming, revision=revision or src.revision
        )
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
    column = ds.select_columns([src.text_field])
    # Slices, so that a limit stops early and long documents never pile up in memory.
    for start in range(0, len(column), _DATASET_SLICE):
        yield from column[start : start + _DATASET_SLICE][src.text_field]
