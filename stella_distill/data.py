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

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stella_distill import tables
from stella_distill.config import DataConfig, SourceConfig
from stella_distill.errors import UserError, first_line
from stella_distill.fingerprints import corpus_fingerprint, text_hashes
from stella_distill.hub import looks_local
from stella_distill.logs import get_logger
from stella_distill.tables import COMPRESSIONS, FILE_SUFFIXES, file_format, is_data_file

_DISK_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

logger = get_logger(__name__)


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


def load_corpus(data_cfg: DataConfig, log: Callable[[str], Any] | None = None) -> Corpus:
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
    (log or logger.info)(_summary_line(stats))
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
    elif looks_local(src.path):
        raise UserError(f"{where}.path: {src.path}: file not found")
    else:
        yield from _iter_hub(src, where)


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


# ---------------------------------------------------------------------------------------------
# Row splits and batch orders


def split_rows(valid: np.ndarray, eval_fraction: float, eval_limit: int | None, seed: int):
    """Split the valid row ids into (train_rows, eval_rows), seeded and independent of world size."""
    rows = np.flatnonzero(valid)
    n_eval = int(round(len(rows) * eval_fraction))
    if eval_limit is not None:
        n_eval = min(n_eval, eval_limit) if eval_fraction > 0 else eval_limit
    n_eval = min(n_eval, max(len(rows) - 1, 0))
    perm = np.random.default_rng(seed + 7919).permutation(len(rows))
    eval_rows = np.sort(rows[perm[:n_eval]])
    train_rows = np.sort(rows[perm[n_eval:]])
    return train_rows, eval_rows


def batch_order(
    rows: np.ndarray, lengths: np.ndarray, global_batch: int, seed: int, group_by_length: bool
) -> list[np.ndarray]:
    """One epoch of global batches: a seeded shuffle, optionally grouped by length (mega-batches of
    50 batches sorted by length, then the batches shuffled) so little compute goes to padding."""
    rng = np.random.default_rng(seed)
    order = rows[rng.permutation(len(rows))]
    if group_by_length:
        mega = global_batch * 50
        chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def stage_batches(train_rows, lengths, global_batch, seed, group_by_length):
    """Endless stream of global batches for one stage: epoch after epoch, each seeded by its index."""
    epoch = 0
    while True:
        batches = batch_order(train_rows, lengths, global_batch, seed * 100003 + epoch, group_by_length)
        if not batches:
            raise UserError(
                f"stages: a global batch of {global_batch} rows is larger than the {len(train_rows)} training rows"
            )
        yield from batches
        epoch += 1
