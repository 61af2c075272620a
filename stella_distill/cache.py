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

Every file is replaced atomically and the shard writes are idempotent: a ``kill -9`` at any moment loses
at most the shards in flight, and a rerun ends byte-identical to an uninterrupted run. numpy only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stella_distill.errors import UserError
from stella_distill.files import (
    atomic_write,
    give_lock,
    json_bytes,
    named_os_error,
    npy_bytes,
    npy_header,
    replaced_atomically,
    sha256_file,
    sha256_rows,
    take_lock,
)
from stella_distill.fingerprints import corpus_mismatch, teacher_identity, teacher_mismatch
from stella_distill.tables import read_json
from stella_distill.version import __version__

if TYPE_CHECKING:
    from stella_distill.config import ExperimentConfig, TeacherConfig
    from stella_distill.data import Corpus

FORMAT_VERSION = 1
STORAGE_DTYPE = "float16"
_MANIFEST = "manifest.json"
_BUILD = "build.json"
_VECTORS = "vectors.npy"
_ROW_HASHES = "row_hashes.npy"
_SHARDS = "shards"


class CacheError(UserError):
    """A teacher cache that is missing, incomplete, corrupted or built for something else."""


def _read_json(path: Path, label: str) -> dict:
    try:
        data: Any = read_json(path)
    except UserError as exc:
        data = exc
    if not isinstance(data, dict):
        problem = data if isinstance(data, UserError) else "not a JSON object"
        raise CacheError(
            f"{label}: {path.name} is unreadable ({problem}); remove {path.parent} and rerun precompute"
        )
    return data


def shard_bounds(rows: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of every shard of a ``rows``-row cache."""
    return [(s, min(s + shard_size, rows)) for s in range(0, rows, shard_size)]


def _shard_record_path(folder: Path, index: int) -> Path:
    """Where the done-record of shard ``index`` lives."""
    return Path(folder) / _SHARDS / f"shard-{index:05d}.json"


def _label(folder: Path) -> str:
    return f"cache/{Path(folder).name}"


def _check_identity(label: str, *mismatches: str | None) -> None:
    """Raise :class:`CacheError` with the first mismatch (``fingerprints.*_mismatch``), if any."""
    for message in mismatches:
        if message:
            raise CacheError(f"{label}: {message}")


# ---------------------------------------------------------------------------------------------
# Writing: the build protocol (the precompute job's only way into the cache)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest body without its own ``manifest_sha256`` field (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class CacheBuild:
    """Building one teacher's cache folder: plan, start, write each shard, finish.

    ::

        build = CacheBuild.plan(folder, teacher, index=i, max_length=n, corpus=corpus)   # one process
        if not build.skip:
            todo = build.start(dim, corpus.row_hashes)   # one process: files created; shards left to do
            build.write_shard(k, vectors)                # any process, each shard of `todo` once
            manifest = build.finish(commit)              # one process, after every shard

    ``plan`` decides: skip (a complete cache that matches teacher and corpus), resume (an unfinished
    build for the same teacher and corpus) or start afresh; anything else in the folder is refused,
    never overwritten. The object holds plain data only (paths, dicts, ints), so the process that
    planned can hand it to the others. Failed writes (disk full, read-only folder) are a
    :class:`CacheError` naming the path; finished shards stay recorded, so a rerun continues.
    """

    def __init__(self, folder: Path, build: dict, *, index: int, skip: bool, resume_dim: int | None):
        self.folder = Path(folder)
        self.label = _label(self.folder)
        self.index = index  # the teacher's position in the config, for field names in errors
        self.build = build  # what the folder is built for (build.json, without the dim until start)
        self.skip = skip
        self.resume_dim = resume_dim  # the dim of an unfinished build, None when starting afresh

    @classmethod
    def plan(
        cls, folder: Path, teacher: TeacherConfig, *, index: int, max_length: int, corpus: Corpus
    ) -> CacheBuild:
        """Decide what to do with ``folder`` for ``teacher`` over ``corpus`` (see the class doc)."""
        folder = Path(folder)
        label = _label(folder)
        refuse = f"; precompute will not overwrite it: remove {folder} to rebuild it"
        expected = teacher_identity(teacher, max_length)
        build = {
            **expected,
            "rows": len(corpus),
            "corpus_fingerprint": corpus.fingerprint,
            "shard_size": teacher.shard_size,
        }
        if (folder / _MANIFEST).is_file():
            try:
                cache = TeacherCache(folder, verify=True)
                cache.check(
                    teacher=teacher, max_length=max_length, corpus=corpus, index=index, identity=expected
                )
            except CacheError as exc:
                raise CacheError(str(exc) if "remove" in str(exc) else f"{exc}{refuse}") from None
            return cls(folder, build, index=index, skip=True, resume_dim=None)
        old = _read_build(folder)
        if old is not None:
            try:
                _check_identity(
                    label,
                    teacher_mismatch(old, expected, index),
                    corpus_mismatch(int(old["rows"]), old["corpus_fingerprint"], None, corpus.row_hashes,
                                    corpus_fingerprint=corpus.fingerprint),
                )  # fmt: skip
            except CacheError as exc:
                raise CacheError(f"{exc} (an unfinished build){refuse}") from None
            if old.get("shard_size") != teacher.shard_size:
                raise CacheError(
                    f"{label}: an unfinished build uses shard_size {old.get('shard_size')}, config says "
                    f"{teacher.shard_size} (teachers.{index}.shard_size); set it back to resume or remove {folder}"
                )
            return cls(folder, build, index=index, skip=False, resume_dim=int(old["dim"]))
        if folder.exists() and any(
            not p.name.startswith(".") and p.name != _SHARDS for p in folder.iterdir()
        ):
            raise CacheError(
                f"{label}: {folder} exists and is not a stella-distill cache; remove it or pick another cache_dir"
            )
        with _writes(folder):  # an unwritable cache_dir fails before the teacher loads
            folder.mkdir(parents=True, exist_ok=True)
        return cls(folder, build, index=index, skip=False, resume_dim=None)

    def bounds(self) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` corpus rows of every shard."""
        return shard_bounds(int(self.build["rows"]), int(self.build["shard_size"]))

    def start(self, dim: int, row_hashes: np.ndarray) -> list[int]:
        """Create (or check) the folder's files for ``dim``-d vectors; return the shards still to encode."""
        if self.resume_dim is not None and self.resume_dim != dim:
            raise CacheError(
                f"{self.label}: an unfinished build has dim {self.resume_dim}, the teacher gives {dim}"
            )
        self.build["dim"] = int(dim)
        folder = self.folder
        with _writes(folder):
            _remove_temp_files(folder)
            if self.resume_dim is None or not (folder / _ROW_HASHES).is_file():
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write(folder / _BUILD, json_bytes(self.build))
                (folder / _SHARDS).mkdir(exist_ok=True)
                atomic_write(folder / _ROW_HASHES, npy_bytes(np.asarray(row_hashes, dtype="<u8")))
            _ensure_vectors_file(folder, int(self.build["rows"]), int(dim))
        return [i for i, (a, b) in enumerate(self.bounds()) if _read_shard_record(folder, i, a, b) is None]

    def write_shard(self, index: int, vectors: np.ndarray) -> int:
        """Store shard ``index``'s float32 vectors as float16 rows; returns how many rows are invalid.

        NaN/inf from the teacher, or values beyond float16's range, are stored as zeros and listed in
        the shard record (``invalid_rows`` of the manifest). The rows go to their place in vectors.npy
        and are fsynced before the record is written, so a shard without a record is simply redone.
        """
        start, stop = self.bounds()[index]
        if vectors.shape[0] != stop - start:
            raise ValueError(f"{self.label}: shard {index} needs {stop - start} rows, got {vectors.shape[0]}")
        with np.errstate(over="ignore", invalid="ignore"):
            half = np.asarray(vectors).astype(np.float16)
        bad = ~np.isfinite(half).all(axis=1)
        half[bad] = 0
        with _writes(self.folder):
            _write_shard(self.folder, index, start, half, (np.flatnonzero(bad) + start).tolist())
        return int(bad.sum())

    def finish(self, commit: str | None = None) -> dict:
        """Write the manifest from every shard's record (``commit``: the model's Hub commit, if any)."""
        records = [
            _read_shard_record(self.folder, i, a, b, check_bytes=False)
            for i, (a, b) in enumerate(self.bounds())
        ]
        missing = [i for i, r in enumerate(records) if r is None]
        if missing:  # another job removed them (no lock held?), or a disk lost them
            raise CacheError(
                f"{self.label}: shards {missing[:10]} have no record after encoding; rerun precompute to redo them"
            )
        with _writes(self.folder):
            return _write_manifest(self.folder, self.build, records, extra={"commit": commit})


def hold_build_lock(folder: Path) -> bool:
    """Take the lock of building ``folder`` (``.<name>.lock`` beside it; two builds would undo each other's
    shards), or refuse naming the job that holds it. See ``files.take_lock``."""
    folder = Path(folder)
    with _writes(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        taken, holder = take_lock(folder.parent / f".{folder.name}.lock", "stella-distill precompute")
    if holder is not None:
        raise CacheError(f"{_label(folder)}: {holder} is building this cache now; wait for it to finish")
    return taken


def release_build_lock(folder: Path) -> None:
    give_lock(Path(folder).parent / f".{Path(folder).name}.lock")


@contextlib.contextmanager
def _writes(folder: Path) -> Iterator[None]:
    """Turn a failed cache write (disk full, read-only or missing folder) into one line naming the path."""
    try:
        yield
    except OSError as exc:
        try:
            done = len(list((folder / _SHARDS).glob("shard-*.json")))
        except OSError:
            done = 0
        kept = f"the {done} finished shards are kept; " if done else ""
        raise CacheError(
            f"{_label(folder)}: cannot write {exc.filename or folder}: {exc.strerror or exc}; {kept}"
            f"free space or fix the folder, then rerun precompute to continue"
        ) from None


def _read_build(folder: Path) -> dict | None:
    """The folder's ``build.json`` (what it is being built for), or None if there is none."""
    path = Path(folder) / _BUILD
    return _read_json(path, _label(folder)) if path.is_file() else None


def _remove_temp_files(folder: Path) -> None:
    """Delete temp files a killed writer left behind (only while no other writer runs)."""
    for sub in (Path(folder), Path(folder) / _SHARDS):
        if sub.is_dir():
            for p in sub.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def _ensure_vectors_file(folder: Path, rows: int, dim: int) -> bool:
    """Create ``vectors.npy`` (zeros) unless a file of the right shape is there; True if created.

    A recreated file invalidates every shard record, so those are removed with it.
    """
    path = Path(folder) / _VECTORS
    if path.is_file():
        try:
            offset, shape, dtype = npy_header(path)
            if (
                shape == (rows, dim)
                and dtype == np.float16
                and path.stat().st_size == offset + rows * dim * 2
            ):
                return False
        except (OSError, ValueError):
            pass
    for rec in (Path(folder) / _SHARDS).glob("shard-*.json"):
        rec.unlink()
    with replaced_atomically(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, dim))
        arr.flush()
        del arr
    return True


def _write_shard(folder: Path, index: int, start: int, rows: np.ndarray, nonfinite_rows: list[int]) -> dict:
    """Write one shard's float16 rows at their place in vectors.npy, fsync, then its record."""
    folder = Path(folder)
    rows = np.ascontiguousarray(rows, dtype="<f2")
    path = folder / _VECTORS
    offset, shape, _ = npy_header(path)
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
    atomic_write(_shard_record_path(folder, index), json_bytes(record))
    return record


def _read_shard_record(
    folder: Path, index: int, start: int, stop: int, *, check_bytes: bool = True
) -> dict | None:
    """The record of a finished shard, or None if the shard must be (re)done.

    With ``check_bytes`` the shard's region of vectors.npy is hashed and must match the record.
    """
    path = _shard_record_path(folder, index)
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
        vectors = Path(folder) / _VECTORS
        offset, shape, _ = npy_header(vectors)
        if sha256_rows(vectors, offset, start, stop, shape[1] * 2) != record.get("sha256"):
            return None
    return record


def _write_manifest(folder: Path, build: dict, records: list[dict], *, extra: dict | None = None) -> dict:
    """Write manifest.json (last, atomically) from the build description and all shard records."""
    folder = Path(folder)
    invalid = sorted(r for rec in records for r in rec["nonfinite_rows"])
    manifest = dict(build)
    manifest.update(extra or {})
    manifest.update(
        {
            "format_version": FORMAT_VERSION,
            "storage_dtype": STORAGE_DTYPE,
            "shards": [rec["sha256"] for rec in sorted(records, key=lambda r: r["index"])],
            "row_hashes_sha256": sha256_file(folder / _ROW_HASHES),
            "invalid_rows": invalid,
            "complete": True,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stella_distill_version": __version__,
        }
    )
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write(folder / _MANIFEST, json_bytes(manifest))
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
        vectors_path = self.path / _VECTORS
        if not vectors_path.is_file():
            raise CacheError(f"{label}: {_VECTORS} is missing; remove {self.path} and rerun precompute")
        try:
            offset, shape, dtype = npy_header(vectors_path)
        except (OSError, ValueError) as exc:
            raise CacheError(
                f"{label}: {_VECTORS} has a broken header ({exc}); remove {self.path} and rerun precompute"
            ) from None
        if shape != (self.rows, self.dim) or dtype != np.float16:
            raise CacheError(
                f"{label}: {_VECTORS} holds {dtype} {shape}, manifest says float16 {(self.rows, self.dim)}"
            )
        row_bytes = self.dim * 2
        size = vectors_path.stat().st_size
        if size != offset + self.rows * row_bytes:
            have_rows = (size - offset) // row_bytes
            bad = next((i for i, (_, stop) in enumerate(bounds) if stop > have_rows), len(bounds) - 1)
            start, stop = bounds[bad]
            what = "truncated" if size < offset + self.rows * row_bytes else "longer than the manifest says"
            raise CacheError(
                f"{label}: {_VECTORS} is {what} ({size} bytes, expected {offset + self.rows * row_bytes}): "
                f"shard {bad} (rows {start}-{stop - 1}) is damaged; remove {self.path} and rerun precompute"
            )
        if verify:
            for i, (start, stop) in enumerate(bounds):
                if sha256_rows(vectors_path, offset, start, stop, row_bytes) != m["shards"][i]:
                    raise CacheError(
                        f"{label}: shard {i} (rows {start}-{stop - 1}) of {_VECTORS} does not match its "
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
        identity: dict | None = None,
    ) -> None:
        """Raise :class:`CacheError` unless this cache was built for ``teacher`` and the corpus.

        The message names the field that differs and the config field to look at (``cache/gte: built for
        pooling 'cls', config says 'mean' (teachers.0.pooling)``), or the first corpus row that differs.
        ``index``: the teacher's position; ``identity``: its ``teacher_identity`` when already known.
        """
        label = _label(self.path)
        identity = identity or teacher_identity(teacher, max_length)
        _check_identity(label, teacher_mismatch(self.manifest, identity, index))
        if corpus is not None:
            row_hashes = corpus.row_hashes
        if row_hashes is not None:
            texts = corpus.texts if corpus is not None else None
            recorded = self.manifest["corpus_fingerprint"]
            _check_identity(label, corpus_mismatch(self.rows, recorded, self.row_hashes, row_hashes, texts))


def _open_manifest(folder: Path) -> dict:
    label = _label(folder)
    path = folder / _MANIFEST
    if not path.is_file():
        if (folder / _BUILD).is_file():
            build = _read_build(folder) or {}
            total = len(shard_bounds(int(build.get("rows", 0)), int(build.get("shard_size", 1) or 1)))
            done = len(list((folder / _SHARDS).glob("shard-*.json")))
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
            f"{label}: {_MANIFEST} does not match its own checksum (edited by hand?); "
            f"remove {folder} and rerun precompute"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{label}: cache format {manifest.get('format_version')!r} is not the supported {FORMAT_VERSION}; "
            f"remove {folder} and rerun precompute"
        )
    if manifest.get("complete") is not True:
        raise CacheError(f"{label}: the cache is not complete; run `stella-distill precompute CONFIG`")
    _check_manifest_values(manifest, label, folder)
    return manifest


def _check_manifest_values(m: dict, label: str, folder: Path) -> None:
    """The numbers a reader relies on have the right types and ranges (a hand edit can keep a valid
    checksum by recomputing it)."""

    def count(key: str, least: int) -> int:
        value = m.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CacheError(
                f"{label}: {_MANIFEST} field {key!r} is {value!r}, not a whole number >= {least}; "
                f"remove {folder} and rerun precompute"
            )
        return value

    rows, _, _ = count("rows", 1), count("dim", 1), count("shard_size", 1)
    invalid = m.get("invalid_rows", [])
    shards = m.get("shards")
    if not isinstance(shards, list) or not all(isinstance(h, str) for h in shards):
        raise CacheError(f"{label}: {_MANIFEST} field 'shards' is not a list of checksums; remove {folder}")
    if not isinstance(invalid, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and 0 <= r < rows for r in invalid
    ):
        raise CacheError(
            f"{label}: {_MANIFEST} field 'invalid_rows' holds values that are not row numbers; remove {folder}"
        )


def _open_row_hashes(folder: Path, manifest: dict) -> np.ndarray:
    label = _label(folder)
    path = folder / _ROW_HASHES
    if not path.is_file() or sha256_file(path) != manifest.get("row_hashes_sha256"):
        raise CacheError(
            f"{label}: {_ROW_HASHES} is missing or corrupted; remove {folder} and rerun precompute"
        )
    hashes = np.load(path, mmap_mode="r")  # page cache shared by the processes, not 8 B a row in each
    if hashes.shape != (int(manifest["rows"]),):
        raise CacheError(f"{label}: {_ROW_HASHES} has {hashes.shape} rows, manifest says {manifest['rows']}")
    return hashes


def peek_dim(folder: Path) -> int | None:
    """The dim a finished cache records (its manifest read, nothing verified), or None if there is none."""
    try:
        dim = json.loads((Path(folder) / _MANIFEST).read_text(encoding="utf-8")).get("dim")
    except (OSError, ValueError, AttributeError):
        return None
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def cache_folder(cfg: ExperimentConfig, teacher: TeacherConfig) -> Path:
    """The cache folder of one teacher: ``cache_dir/<teacher.name>``."""
    return Path(cfg.cache_dir).expanduser() / teacher.name


def open_caches(cfg: ExperimentConfig, corpus: Corpus, verify: bool = True) -> list[TeacherCache]:
    """Open every teacher's cache; with ``verify``, read every shard's checksum and check each against
    its teacher and ``corpus`` (one process of a job); without, the manifest, sizes and row hashes only."""
    caches = []
    for i, teacher in enumerate(cfg.teachers):
        cache = TeacherCache(cache_folder(cfg, teacher), verify=verify)
        if verify:
            cache.check(teacher=teacher, max_length=cfg.teacher_max_length(teacher), corpus=corpus, index=i)
        caches.append(cache)
    return caches


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero), in ``x``'s dtype."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def build_target(caches: list[TeacherCache], rows: np.ndarray) -> np.ndarray:
    """Multi-teacher target for corpus ``rows``: float32 ``(len(rows), sum of dims)``.

    Each teacher's rows are L2-normalised, the teachers are concatenated in config order and the
    result is L2-normalised again (Jasper/Stella, arXiv:2412.19048, section 2). Rows that are
    zero (invalid teacher output) stay zero within their teacher's block.
    """
    rows = np.asarray(rows, dtype=np.int64)
    parts = [l2_normalize(np.asarray(c.vectors[rows], dtype=np.float32)) for c in caches]
    return l2_normalize(np.concatenate(parts, axis=1))
