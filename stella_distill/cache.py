"""The teacher cache: one folder of half-precision rows per teacher, checked before it is trusted.

Layout of ``cache_dir/<teacher.name>/``::

    build.json             what this folder is being built for (teacher fields, corpus, dim,
                           shard size); written first, so a resumed build can be checked
    row_hashes.npy         uint64 text hash of every corpus row (corpus order)
    vectors.npy            (rows, dim) float16 in corpus order; created full-size (zeros) before
                           any encoding, each shard then writes its row range in place + fsync
    shards/shard-00003.json  {index, start, stop, sha256, nonfinite_rows}: written atomically only
                           after the shard's rows are on disk; a shard without it is not done
    manifest.json          written atomically last; carries ``manifest_sha256`` over its own body

Every file is replaced atomically (temp file, fsync, ``os.replace``) and the shard region writes
are idempotent, so a ``kill -9`` at any moment loses at most the shards in flight and a rerun
ends byte-identical to an uninterrupted run.

This module is numpy only: no torch, no trainer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stella_distill.errors import UserError

if TYPE_CHECKING:
    from stella_distill.config import ExperimentConfig, TeacherConfig
    from stella_distill.data import Corpus

FORMAT_VERSION = 1
STORAGE_DTYPE = "float16"
MANIFEST = "manifest.json"
BUILD = "build.json"
VECTORS = "vectors.npy"
ROW_HASHES = "row_hashes.npy"
SHARDS = "shards"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# The fields that decide what a teacher writes, in the order a mismatch is reported.
TEACHER_FIELDS = ("model", "revision", "pooling", "dense", "prompt", "max_length", "normalize", "dtype")


class CacheError(UserError):
    """A teacher cache that is missing, incomplete, corrupted or built for something else."""


# ---------------------------------------------------------------------------------------------
# Small file helpers


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; the file written there then replaces ``path`` atomically.

    On leaving, the temp file is fsynced, renamed over ``path`` and the folder fsynced, so readers
    see the old file or the whole new one. A failed write (disk full, read-only folder) removes the
    temp file and raises ``OSError`` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise named_os_error(exc, path) from None
    _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`replaced_atomically`)."""
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. the folder is gone or read-only: nothing left to clean
        pass


def named_os_error(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path`` if it names no file (writes to an open file name none)."""
    if exc.filename is not None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path, label: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CacheError(
            f"{label}: {path.name} is unreadable ({exc}); remove {path.parent} and rerun precompute"
        ) from None
    if not isinstance(data, dict):
        raise CacheError(
            f"{label}: {path.name} is not a JSON object; remove {path.parent} and rerun precompute"
        )
    return data


def shard_bounds(rows: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of every shard of a ``rows``-row cache."""
    return [(s, min(s + shard_size, rows)) for s in range(0, rows, shard_size)]


def shard_record_path(folder: Path, index: int) -> Path:
    """Where the done-record of shard ``index`` lives."""
    return Path(folder) / SHARDS / f"shard-{index:05d}.json"


def _label(folder: Path) -> str:
    return f"cache/{Path(folder).name}"


def _vectors_offset(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) from a .npy header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if fortran:
            raise ValueError("Fortran-ordered array")
        return f.tell(), shape, dtype


# ---------------------------------------------------------------------------------------------
# What a cache is for


def weights_sha256(folder: str | Path) -> str:
    """sha256 over a local model folder's config.json and weight files (names and bytes, sorted)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if (folder / "config.json").is_file():
        files.insert(0, folder / "config.json")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + _sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def expected_manifest_fields(teacher: TeacherConfig, max_length: int) -> dict:
    """The manifest fields a cache for ``teacher`` at ``max_length`` must carry.

    ``revision`` is the configured revision for Hub ids and ``sha256:<hex>`` of the weight files
    for a local folder, so a retrained or swapped local model is told apart from the old one.
    """
    local = Path(teacher.model).expanduser()
    revision = f"sha256:{weights_sha256(local)}" if local.is_dir() else teacher.revision
    dense = teacher.dense or None  # absent from caches built without one: None == None
    if dense:
        from stella_distill.pooling import dense_location

        where, subfolder = dense_location(teacher.model, dense)
        folder = Path(where).expanduser() / subfolder
        if folder.is_dir():  # a local head is told apart by its weights, like a local model
            dense = f"{dense} (sha256:{weights_sha256(folder)})"
    return {
        "teacher": teacher.name,
        "model": teacher.model,
        "revision": revision,
        "pooling": teacher.pooling,
        "dense": dense,
        "prompt": teacher.prompt,
        "max_length": int(max_length),
        "dtype": teacher.dtype,
        "normalize": bool(teacher.normalize),
    }


def _config_field(key: str, index: int | None) -> str:
    where = f"teachers.{index}" if index is not None else "teacher"
    if key == "max_length":
        return f"{where}.max_length or data.max_length"
    if key == "revision":
        return f"{where}.revision / the weights of {where}.model"
    return f"{where}.{key}"


def _first_field_difference(recorded: dict, expected: dict) -> tuple[str, Any, Any] | None:
    for key in TEACHER_FIELDS:
        if key == "model":
            both_local = str(recorded.get("revision", "")).startswith("sha256:") and str(
                expected.get("revision", "")
            ).startswith("sha256:")
            # A local folder that moved but holds the same weights is the same teacher.
            if both_local and recorded.get("revision") == expected.get("revision"):
                continue
        if recorded.get(key) != expected.get(key):
            return key, recorded.get(key), expected.get(key)
    return None


def compare_teacher(recorded: dict, expected: dict, *, label: str, index: int | None) -> None:
    """Raise :class:`CacheError` naming the first teacher field where ``recorded`` differs."""
    diff = _first_field_difference(recorded, expected)
    if diff is None:
        return
    key, was, now = diff
    raise CacheError(f"{label}: built for {key} {was!r}, config says {now!r} ({_config_field(key, index)})")


def compare_corpus(
    label: str,
    rows: int,
    fingerprint: str,
    stored_hashes: np.ndarray | None,
    corpus_hashes: np.ndarray,
    texts=None,
) -> None:
    """Raise :class:`CacheError` if the cache rows are not the corpus rows, naming the first that differs."""
    if rows != len(corpus_hashes):
        raise CacheError(
            f"{label}: built for a corpus of {rows} rows, the corpus now has {len(corpus_hashes)} "
            f"(data.train / data.limit / data.dedupe changed)"
        )
    from stella_distill.data import corpus_fingerprint

    if fingerprint == corpus_fingerprint(corpus_hashes):
        return
    if stored_hashes is None or len(stored_hashes) != rows:
        raise CacheError(f"{label}: built for another corpus (fingerprint {fingerprint[:12]}) (data.train)")
    differ = np.flatnonzero(
        np.asarray(stored_hashes, dtype=np.uint64) != np.asarray(corpus_hashes, dtype=np.uint64)
    )
    first = int(differ[0]) if len(differ) else 0
    shown = f" {texts[first][:60]!r}" if texts is not None else ""
    raise CacheError(
        f"{label}: built for another corpus: row {first} differs (corpus text{shown}); "
        f"{len(differ)} of {rows} rows differ (data.train)"
    )


# ---------------------------------------------------------------------------------------------
# Writing (used by the precompute job)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest body without its own ``manifest_sha256`` field (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_build(folder: Path) -> dict | None:
    """The folder's ``build.json`` (what it is being built for), or None if there is none."""
    path = Path(folder) / BUILD
    return _read_json(path, _label(folder)) if path.is_file() else None


def start_build(folder: Path, build: dict, row_hashes: np.ndarray) -> None:
    """Record what the folder is built for, then write row_hashes.npy and a zero vectors.npy."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / BUILD, _json_bytes(build))
    (folder / SHARDS).mkdir(exist_ok=True)
    atomic_write(folder / ROW_HASHES, _npy_bytes(np.asarray(row_hashes, dtype="<u8")))
    ensure_vectors_file(folder, build["rows"], build["dim"])


def remove_temp_files(folder: Path) -> None:
    """Delete temp files a killed writer left behind (only while no other writer runs)."""
    for sub in (Path(folder), Path(folder) / SHARDS):
        if sub.is_dir():
            for p in sub.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def ensure_vectors_file(folder: Path, rows: int, dim: int) -> bool:
    """Create ``vectors.npy`` (zeros) unless a file of the right shape is there; True if created.

    A recreated file invalidates every shard record, so those are removed with it.
    """
    path = Path(folder) / VECTORS
    if path.is_file():
        try:
            offset, shape, dtype = _vectors_offset(path)
            if (
                shape == (rows, dim)
                and dtype == np.float16
                and path.stat().st_size == offset + rows * dim * 2
            ):
                return False
        except (OSError, ValueError):
            pass
    for rec in (Path(folder) / SHARDS).glob("shard-*.json"):
        rec.unlink()
    with replaced_atomically(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, dim))
        arr.flush()
        del arr
    return True


def write_shard(folder: Path, index: int, start: int, rows: np.ndarray, nonfinite_rows: list[int]) -> dict:
    """Write one shard's float16 rows at their place in vectors.npy, fsync, then its record."""
    folder = Path(folder)
    rows = np.ascontiguousarray(rows, dtype="<f2")
    path = folder / VECTORS
    offset, shape, _ = _vectors_offset(path)
    data = rows.tobytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        view, position = memoryview(data), offset + start * shape[1] * 2
        while view:  # pwrite may write less than asked (e.g. over 2 GiB on Linux)
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written
        os.fsync(fd)
    except OSError as exc:  # e.g. disk full (a sparse vectors.npy takes its blocks now): no record
        raise named_os_error(exc, path) from None
    finally:
        os.close(fd)
    record = {
        "index": index,
        "start": start,
        "stop": start + len(rows),
        "sha256": hashlib.sha256(data).hexdigest(),
        "nonfinite_rows": [int(r) for r in nonfinite_rows],
    }
    atomic_write(shard_record_path(folder, index), _json_bytes(record))
    return record


def read_shard_record(
    folder: Path, index: int, start: int, stop: int, *, check_bytes: bool = True
) -> dict | None:
    """The record of a finished shard, or None if the shard must be (re)done.

    With ``check_bytes`` the shard's region of vectors.npy is hashed and must match the record.
    """
    path = shard_record_path(folder, index)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or (record.get("index"), record.get("start"), record.get("stop")) != (
        index,
        start,
        stop,
    ):
        return None
    if check_bytes:
        vectors = Path(folder) / VECTORS
        offset, shape, _ = _vectors_offset(vectors)
        if _region_sha256(vectors, offset, start, stop, shape[1] * 2) != record.get("sha256"):
            return None
    return record


def _region_sha256(path: Path, offset: int, start: int, stop: int, row_bytes: int) -> str | None:
    """sha256 of rows [start, stop) of a row-major file, or None if the file is too short."""
    h = hashlib.sha256()
    want = (stop - start) * row_bytes
    with open(path, "rb") as f:
        f.seek(offset + start * row_bytes)
        while want > 0:
            chunk = f.read(min(want, 1 << 24))
            if not chunk:
                return None
            h.update(chunk)
            want -= len(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, build: dict, records: list[dict], *, extra: dict | None = None) -> dict:
    """Write manifest.json (last, atomically) from the build description and all shard records."""
    from stella_distill import __version__

    folder = Path(folder)
    invalid = sorted(r for rec in records for r in rec["nonfinite_rows"])
    manifest = dict(build)
    manifest.update(extra or {})
    manifest.update(
        {
            "format_version": FORMAT_VERSION,
            "storage_dtype": STORAGE_DTYPE,
            "shards": [rec["sha256"] for rec in sorted(records, key=lambda r: r["index"])],
            "row_hashes_sha256": _sha256_file(folder / ROW_HASHES),
            "invalid_rows": invalid,
            "complete": True,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stella_distill_version": __version__,
        }
    )
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write(folder / MANIFEST, _json_bytes(manifest))
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


class TeacherCache:
    """One teacher's finished cache, opened read-only and checked.

    Opening reads and checks the manifest (including its own checksum, so a hand edit is caught),
    the sizes of vectors.npy and row_hashes.npy and, with ``verify``, the sha256 of every shard's
    rows. Any problem is a :class:`CacheError` naming the shard. ``vectors`` is an (N, dim) float16
    read-only memory map in corpus order; ``valid_mask`` is False for rows whose teacher output was
    NaN/inf (stored as zeros).
    """

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = Path(path)
        self.name = self.path.name
        label = _label(self.path)
        self.manifest = _open_manifest(self.path)
        m = self.manifest
        self.dim = int(m["dim"])
        self.rows = int(m["rows"])
        bounds = shard_bounds(self.rows, int(m["shard_size"]))
        if len(m["shards"]) != len(bounds):
            raise CacheError(f"{label}: manifest lists {len(m['shards'])} shards, {len(bounds)} expected")
        self.row_hashes = _open_row_hashes(self.path, m)
        vectors_path = self.path / VECTORS
        if not vectors_path.is_file():
            raise CacheError(f"{label}: {VECTORS} is missing; remove {self.path} and rerun precompute")
        try:
            offset, shape, dtype = _vectors_offset(vectors_path)
        except (OSError, ValueError) as exc:
            raise CacheError(
                f"{label}: {VECTORS} has a broken header ({exc}); remove {self.path} and rerun precompute"
            ) from None
        if shape != (self.rows, self.dim) or dtype != np.float16:
            raise CacheError(
                f"{label}: {VECTORS} holds {dtype} {shape}, manifest says float16 {(self.rows, self.dim)}"
            )
        row_bytes = self.dim * 2
        size = vectors_path.stat().st_size
        if size != offset + self.rows * row_bytes:
            have_rows = (size - offset) // row_bytes
            bad = next((i for i, (_, stop) in enumerate(bounds) if stop > have_rows), len(bounds) - 1)
            start, stop = bounds[bad]
            what = "truncated" if size < offset + self.rows * row_bytes else "longer than the manifest says"
            raise CacheError(
                f"{label}: {VECTORS} is {what} ({size} bytes, expected {offset + self.rows * row_bytes}): "
                f"shard {bad} (rows {start}-{stop - 1}) is damaged; remove {self.path} and rerun precompute"
            )
        if verify:
            for i, (start, stop) in enumerate(bounds):
                if _region_sha256(vectors_path, offset, start, stop, row_bytes) != m["shards"][i]:
                    raise CacheError(
                        f"{label}: shard {i} (rows {start}-{stop - 1}) of {VECTORS} does not match its "
                        f"checksum (corrupted); remove {self.path} and rerun precompute"
                    )
        self.vectors = np.load(vectors_path, mmap_mode="r")
        self.valid_mask = np.ones(self.rows, dtype=bool)
        invalid = np.asarray(m.get("invalid_rows", []), dtype=np.int64)
        self.valid_mask[invalid] = False

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"TeacherCache({str(self.path)!r}, rows={self.rows}, dim={self.dim})"

    def check(
        self,
        *,
        teacher: TeacherConfig,
        max_length: int,
        corpus: Corpus | None = None,
        row_hashes: np.ndarray | None = None,
        index: int | None = None,
    ) -> None:
        """Raise :class:`CacheError` unless this cache was built for ``teacher`` and the corpus.

        The message names the field that differs and the config field to look at
        (``cache/gte: built for pooling 'cls', config says 'mean' (teachers.0.pooling)``); for
        the corpus it names the first row that differs. ``index`` is the teacher's position in
        ``teachers`` (for the field name).
        """
        label = _label(self.path)
        compare_teacher(
            self.manifest, expected_manifest_fields(teacher, max_length), label=label, index=index
        )
        if corpus is not None:
            row_hashes = corpus.row_hashes
        if row_hashes is not None:
            texts = corpus.texts if corpus is not None else None
            compare_corpus(
                label, self.rows, self.manifest["corpus_fingerprint"], self.row_hashes, row_hashes, texts
            )


def _open_manifest(folder: Path) -> dict:
    label = _label(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / BUILD).is_file():
            build = read_build(folder) or {}
            total = len(shard_bounds(int(build.get("rows", 0)), int(build.get("shard_size", 1) or 1)))
            done = len(list((folder / SHARDS).glob("shard-*.json")))
            raise CacheError(
                f"{label}: the cache at {folder} is incomplete ({done} of {total} shards done); "
                f"run `stella-distill precompute CONFIG` to finish it"
            )
        raise CacheError(
            f"{label}: no teacher cache at {folder}; run `stella-distill precompute CONFIG` first"
        )
    manifest = _read_json(path, label)
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise CacheError(
            f"{label}: {MANIFEST} does not match its own checksum (edited by hand?); "
            f"remove {folder} and rerun precompute"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{label}: cache format {manifest.get('format_version')!r} is not the supported {FORMAT_VERSION}; "
            f"remove {folder} and rerun precompute"
        )
    if manifest.get("complete") is not True:
        raise CacheError(f"{label}: the cache is not complete; run `stella-distill precompute CONFIG`")
    return manifest


def _open_row_hashes(folder: Path, manifest: dict) -> np.ndarray:
    label = _label(folder)
    path = folder / ROW_HASHES
    if not path.is_file() or _sha256_file(path) != manifest.get("row_hashes_sha256"):
        raise CacheError(
            f"{label}: {ROW_HASHES} is missing or corrupted; remove {folder} and rerun precompute"
        )
    hashes = np.load(path)
    if hashes.shape != (int(manifest["rows"]),):
        raise CacheError(f"{label}: {ROW_HASHES} has {hashes.shape} rows, manifest says {manifest['rows']}")
    return hashes


def cache_folder(cfg: ExperimentConfig, teacher: TeacherConfig) -> Path:
    """The cache folder of one teacher: ``cache_dir/<teacher.name>``."""
    return Path(cfg.cache_dir).expanduser() / teacher.name


def open_caches(cfg: ExperimentConfig, corpus: Corpus, verify: bool = True) -> list[TeacherCache]:
    """Open and check the cache of every teacher in ``cfg`` against the config and ``corpus``."""
    caches = []
    for i, teacher in enumerate(cfg.teachers):
        cache = TeacherCache(cache_folder(cfg, teacher), verify=verify)
        cache.check(teacher=teacher, max_length=cfg.teacher_max_length(teacher), corpus=corpus, index=i)
        caches.append(cache)
    return caches


def _l2(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def build_target(caches: list[TeacherCache], rows: np.ndarray) -> np.ndarray:
    """Multi-teacher target for corpus ``rows``: float32 ``(len(rows), sum of dims)``.

    Each teacher's rows are L2-normalised, the teachers are concatenated in config order and the
    result is L2-normalised again (Jasper/Stella, arXiv:2412.19048, section 2). Rows that are
    zero (invalid teacher output) stay zero within their teacher's block.
    """
    rows = np.asarray(rows, dtype=np.int64)
    parts = [_l2(np.asarray(c.vectors[rows], dtype=np.float32)) for c in caches]
    return _l2(np.concatenate(parts, axis=1))
