"""The corpus: every configured source read once into a memory-mapped Arrow table, in corpus order.

``load_corpus(data_cfg, cache_dir=...)`` returns a :class:`Corpus` whose texts live in an Arrow IPC
file under ``cache_dir``: the first verb that needs the corpus builds the table, every later verb and
every process memory-maps it, so no process holds the texts in its own memory and none reads the
sources again while they are unchanged. Layout of ``cache_dir/corpus/<key>/`` (``key``: a hash of the
``data`` fields that shape the corpus)::

    corpus.json            written last: the table's file name, rows, fingerprint, the sources (every
                           local file's size, modification time and sha256; every Hub dataset's
                           commit) and the counts of the summary line
    corpus-<fp>.arrow      Arrow IPC stream (``datasets.Dataset.from_file`` opens it too): columns
                           ``text``, ``row_hash`` (uint64), ``chars`` (int64), in corpus order; the
                           sources' description in the schema metadata
    .lock                  held by the process that builds

Building reads the sources in order (``sources.py``) and streams rows into the table in bounded
memory: each source skips empty, whitespace-only and non-string texts (counted) and keeps at most its
own ``limit``; ``data.dedupe`` drops repeats of an earlier text (by row hash; texts are compared only
when hashes collide); ``data.limit`` caps the total and stops reading there. One process builds (rank 0
under ``torchrun`` / ``accelerate launch``; other jobs wait for its lock), into a temporary file that is
renamed into place before ``corpus.json`` names it, so a killed build leaves nothing that is used. A
table is reused only while every source is what it was: same files by content (size and time are the
quick look, the sha256 decides), same Hub commits.

Row hashes are the first 8 bytes of blake2b over each text, the fingerprint a sha256 over them in order
(``fingerprints.py``): the same as before the table existed, so teacher caches stay valid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from stella_distill import sources
from stella_distill.arrow_table import TableWriter, TextColumn, as_numpy, int_array, open_table, written
from stella_distill.config import CORPUS_FOLDER, DataConfig
from stella_distill.dedupe import Deduper
from stella_distill.errors import UserError, write_failure
from stella_distill.files import atomic_write, fsync_dir, named_os_error, remove_quietly
from stella_distill.fingerprints import text_hashes
from stella_distill.logs import get_logger

FORMAT = 1  # bump when the table's content or layout changes: older tables are then rebuilt
MANIFEST = "corpus.json"
_LOCK = ".lock"
_META_KEY = b"stella_distill.corpus"
SCHEMA = pa.schema([("text", pa.large_string()), ("row_hash", pa.uint64()), ("chars", pa.int64())])
# One record batch holds at most this many rows / characters: the builder's memory is about one batch.
_BATCH_ROWS = 16384
_BATCH_CHARS = 2 << 20
# How long the other processes wait for rank 0's build (the default collective timeout is far
# shorter than streaming a large Hub dataset).
_BUILD_WAIT = timedelta(hours=24)
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)

logger = get_logger(__name__)


class Corpus:
    """The training texts in corpus order, memory-mapped from the corpus table, with what identifies them.

    ``texts`` reads rows on demand (:class:`TextColumn`). ``row_hashes[i]`` is the first 8 bytes of
    blake2b over ``texts[i]`` (UTF-8) as a little-endian uint64; ``fingerprint`` is the sha256 hex of
    all row hashes in order; ``lengths[i]`` is ``len(texts[i])`` (int32 unless a text is longer).
    ``row_hashes`` and ``lengths`` are fresh arrays on every access (8 and 4 bytes a row): keep what
    you need. ``stats`` holds the counts
    behind the summary line (``read``, ``skipped_empty``, ``skipped_non_string``,
    ``duplicates_dropped``, ``rows``, ``stopped_at_limit``, and ``sources``: the same per source);
    ``path`` is the table file.
    """

    def __init__(self, table: pa.Table, fingerprint: str, stats: dict, path: Path):
        self._table = table
        self.texts = TextColumn(table.column("text"))
        self.fingerprint = fingerprint
        self.stats = stats
        self.path = path

    def __len__(self) -> int:
        return self._table.num_rows

    @property
    def row_hashes(self) -> np.ndarray:
        return _column_array(self._table, "row_hash", np.uint64)

    @property
    def lengths(self) -> np.ndarray:
        # int32 where it fits: half the memory of a per-row array every training process holds
        chars = self._table.column("chars")
        fits = len(chars) == 0 or max(int(as_numpy(c).max(initial=0)) for c in chars.chunks) < 2**31
        return _column_array(self._table, "chars", np.int32 if fits else np.int64)


def _column_array(table: pa.Table, name: str, dtype) -> np.ndarray:
    out, start = np.empty(table.num_rows, dtype=dtype), 0
    for chunk in table.column(name).chunks:
        out[start : start + len(chunk)] = as_numpy(chunk)
        start += len(chunk)
    return out


def load_corpus(data_cfg: DataConfig, log: Callable[[str], Any] | None = None, *, cache_dir=None) -> Corpus:
    """The corpus of ``data_cfg.train``, from its table in ``cache_dir`` (built there first if needed).

    Under ``torchrun`` / ``accelerate launch`` (an initialised process group) rank 0 checks or builds the
    table while the others wait, then every process opens it; an error stops every rank with the same
    message. Without ``cache_dir``, or when ``cache_dir`` cannot be written, the table is built in a
    temporary folder that is gone when the process ends. One summary line goes to ``log`` (default:
    this module's logger, at info).
    """
    if not data_cfg.train:
        raise UserError("data.train: no corpus sources configured")
    log = log or logger.info
    dist = _process_group()
    if dist is None:
        path, manifest, temp = _prepare(data_cfg, cache_dir, log)
        return _open(path, manifest, temp)
    group = dist.new_group(backend="gloo", timeout=_BUILD_WAIT)
    outcome: list[Any] = [None]
    temp = None
    if dist.get_rank() == 0:
        try:
            path, manifest, temp = _prepare(data_cfg, cache_dir, log)
            outcome[0] = ("ok", (str(path), manifest))
        except UserError as exc:
            outcome[0] = ("user_error", exc)
        except BaseException as exc:
            outcome[0] = ("crash", f"{type(exc).__name__}: {exc}")
            dist.broadcast_object_list(outcome, src=0, group=group)
            raise
    dist.broadcast_object_list(outcome, src=0, group=group)
    kind, value = outcome[0]
    if kind == "user_error":
        raise value
    if kind == "crash":
        raise RuntimeError(f"building the corpus table failed on rank 0: {value}")
    path, manifest = Path(value[0]), value[1]
    corpus, problem = None, None
    try:
        if dist.get_rank() != 0 and not path.is_file():  # rank 0's temporary table is on another machine
            path, manifest, temp = _prepare(data_cfg, None, lambda _: None)
        corpus = _open(path, manifest, None)
    except UserError as exc:
        problem = str(exc)
    problems: list[Any] = [None] * dist.get_world_size()
    # every process has it mapped (a temporary folder may go now), or all stop with the same line
    dist.all_gather_object(problems, problem, group=group)
    # The group is not destroyed here: a gloo group torn down right after its last collective can
    # abort the peer still finishing it ("terminate called without an active exception", 2 runs in 6
    # of the 2-process precompute test); the verb's end destroys every group after a barrier.
    if temp is not None:
        shutil.rmtree(temp, ignore_errors=True)
    problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise UserError(problem)
    return corpus


def _process_group():
    """``torch.distributed`` when a process group of 2 or more is initialised, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return dist


def _open(path: Path, manifest: dict, temp: Path | None) -> Corpus:
    """Memory-map the table at ``path`` and check it is the one ``manifest`` describes."""
    table = _table(path)
    if table is None or table.num_rows != manifest["rows"]:
        raise UserError(
            f"{path}: the corpus table does not match {MANIFEST}; delete its folder to rebuild it"
        )
    if temp is not None:  # the mapping keeps the file's data; nothing is left behind
        shutil.rmtree(temp, ignore_errors=True)
    return Corpus(table, manifest["fingerprint"], manifest["stats"], path)


def _table(path: Path) -> pa.Table | None:
    table = open_table(path)
    return table if table is not None and table.schema.remove_metadata().equals(SCHEMA) else None


# ---------------------------------------------------------------------------------------------
# Checking or building the table (one process)


def describe(data_cfg: DataConfig) -> dict:
    """The ``data`` fields that shape the corpus (local paths made absolute); the table's key hashes it."""
    rows = []
    for src in data_cfg.train:
        path = str(Path(src.path).expanduser().absolute()) if sources.is_local(src) else src.path
        rows.append({"path": path, "text_field": src.text_field, "split": src.split, "subset": src.subset,
                     "revision": src.revision, "limit": src.limit, "quoting": src.quoting})  # fmt: skip
    return {"format": FORMAT, "train": rows, "limit": data_cfg.limit, "dedupe": data_cfg.dedupe}


def table_folder(cache_dir: str | Path, data_cfg: DataConfig) -> Path:
    """``cache_dir/corpus/<key>``: where the table of ``data_cfg`` lives."""
    key = hashlib.sha256(json.dumps(describe(data_cfg), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / CORPUS_FOLDER / key


def _prepare(data_cfg: DataConfig, cache_dir, log) -> tuple[Path, dict, Path | None]:
    """``(table file, manifest, temporary folder or None)``: a table that matches the sources now."""
    description = describe(data_cfg)
    identities = sources.identities(data_cfg.train)
    if cache_dir is None:
        return _build_temporary(data_cfg, description, identities, log)
    folder = table_folder(cache_dir, data_cfg)
    manifest = _read_manifest(folder)
    reason = _stale(manifest, folder, description, identities, log)
    if reason is None:
        _tidy(folder, manifest["table"])
        log(_summary_line(manifest["stats"]) + f"; table {folder / manifest['table']} (sources unchanged)")
        return folder / manifest["table"], manifest, None
    try:
        created = _make_folder(folder)
        lock = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise UserError(
                f"cannot write the corpus table: {write_failure(named_os_error(exc, folder))}"
            ) from None
        # e.g. shared teacher caches mounted read-only: this run still gets its table
        log(f"corpus: cannot write the table in {folder} ({exc.strerror}); building it in a temporary folder")
        return _build_temporary(data_cfg, description, identities, log)
    with _locked(lock, folder, created, log):
        manifest = _read_manifest(folder)  # another job may have built it while we waited
        if _stale(manifest, folder, description, identities, lambda _: None) is None:
            log(
                _summary_line(manifest["stats"])
                + f"; table {folder / manifest['table']} (built by another job)"
            )
            return folder / manifest["table"], manifest, None
        old = manifest["table"] if manifest else None  # stale, but kept until its successor is in place
        _remove_leftovers(folder, keep=old)
        manifest, seconds = _build(folder, data_cfg, description, identities)
        previous = None if reason == "none yet" else reason
        note = f"; rebuilt: {previous}" if previous else ""
        log(
            _summary_line(manifest["stats"])
            + f"; table {folder / manifest['table']} (built in {seconds:.1f} s{note})"
        )
        _remove_leftovers(folder, keep=manifest["table"])
    return folder / manifest["table"], manifest, None


def _build_temporary(data_cfg, description, identities, log) -> tuple[Path, dict, Path]:
    temp = Path(tempfile.mkdtemp(prefix="stella-distill-corpus-"))
    try:
        manifest, _ = _build(temp, data_cfg, description, identities)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    log(_summary_line(manifest["stats"]))
    return temp / manifest["table"], manifest, temp


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _stale(manifest, folder, description, identities, log) -> str | None:
    """Why the table in ``folder`` cannot be used for these sources, or None if it can."""
    if manifest is None:
        return "none yet"
    if manifest.get("description") != description:
        return "the data config changed"
    recorded = manifest.get("identities") or []
    for i, (was, now) in enumerate(zip(recorded, identities)):
        if "hub" in now:
            if now["commit"] is None and was.get("commit") is not None:
                log(f"corpus: data.train.{i}: cannot ask the Hub where {now['hub']} is now; using the table "
                    f"built from its commit {was['commit']}")  # fmt: skip
            elif now["commit"] != was.get("commit"):
                return (f"data.train.{i}: {now['hub']} moved from commit {was.get('commit')} to {now['commit']} "
                        f"(set data.train.{i}.revision: {was.get('commit')} to keep the old corpus)")  # fmt: skip
        else:
            change = sources.changed_files(was, now)
            if change:
                return f"data.train.{i}: {change}"
    if len(recorded) != len(identities):
        return "the data config changed"
    table = _table(folder / str(manifest.get("table")))
    if table is None or table.num_rows != manifest.get("rows"):
        return f"{folder / str(manifest.get('table'))} is missing or unreadable"
    return None


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created (outermost first)."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        for p in reversed(missing):
            with contextlib.suppress(FileExistsError):
                p.mkdir()
                made.append(p)
    except OSError:
        for p in reversed(made):
            p.rmdir()
        raise
    return made


@contextlib.contextmanager
def _locked(fd: int, folder: Path, created: list[Path], log):
    """Hold the lock file open as ``fd`` (other jobs wait here); if the body fails, remove the folders
    this job created while they are empty (a failed build leaves ``cache_dir`` as it found it)."""
    ok = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"corpus: another job is building the table in {folder}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
        ok = True
    finally:
        if not ok and created:
            remove_quietly(folder / _LOCK)
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()  # only if empty: never what others put there
        os.close(fd)


def _leftovers(folder: Path, keep: str | None) -> list[Path]:
    """This module's temporary files in ``folder`` and the tables other than ``keep``."""
    found = []
    for p in folder.iterdir():
        name = p.name
        table = name.startswith("corpus-") and (name.endswith(".arrow") or ".arrow.tmp" in name)
        if (table and name != keep) or (name.startswith(f".{MANIFEST}.") and name.endswith(".tmp")):
            found.append(p)
    return found


def _remove_leftovers(folder: Path, keep: str | None) -> None:
    """Remove what :func:`_leftovers` finds; called with the lock held, so no builder is writing them."""
    for p in _leftovers(folder, keep):
        remove_quietly(p)


def _tidy(folder: Path, keep: str) -> None:
    """Remove what a build killed after its manifest left behind (the table it replaced), if no job is
    building now; never waits, and does nothing where the folder is read-only."""
    if not _leftovers(folder, keep):
        return
    try:
        fd = os.open(folder / _LOCK, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _remove_leftovers(folder, keep)
    except OSError:  # locked by a builder, or read-only
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The build


def _build(
    folder: Path, data_cfg: DataConfig, description: dict, identities: list[dict]
) -> tuple[dict, float]:
    """Read every source into ``folder/corpus-<fp>.arrow`` and write ``corpus.json`` naming it, last."""
    import time

    started = time.perf_counter()
    meta = json.dumps({"description": description, "identities": identities}, sort_keys=True)
    schema = SCHEMA.with_metadata({_META_KEY: meta.encode()})
    tmp = folder / f"corpus-{os.getpid()}.arrow.tmp"
    try:
        with TableWriter(tmp, schema, fingerprint_column="row_hash", read_column="text") as writer:
            stats = _fill(writer, data_cfg, identities)
        _check_unchanged(identities)
        if stats["rows"] == 0:
            raise UserError(
                f"data.train: the corpus is empty after reading {stats['read']} rows "
                f"({stats['skipped_empty']} empty or whitespace-only, {stats['skipped_non_string']} non-string)"
            )
        name = f"corpus-{writer.fingerprint[:16]}.arrow"
        manifest = {"format": FORMAT, "table": name, "rows": stats["rows"], "fingerprint": writer.fingerprint,
                    "description": description, "identities": identities, "stats": stats}  # fmt: skip
        with written(folder):
            os.replace(tmp, folder / name)
            fsync_dir(folder)
            atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    finally:
        remove_quietly(tmp)
    return manifest, time.perf_counter() - started


def _check_unchanged(identities: list[dict]) -> None:
    """Refuse a table whose local sources changed while it was built (what was hashed is not what was read)."""
    for i, ident in enumerate(identities):
        for f in ident.get("files", []):
            try:
                st = os.stat(f["path"])
            except OSError:
                st = None
            if st is None or (st.st_size, st.st_mtime_ns) != (f["size"], f["mtime_ns"]):
                raise UserError(
                    f"data.train.{i}: {f['path']} changed while the corpus table was being built; run again"
                )


def _fill(writer: TableWriter, data_cfg: DataConfig, identities: list[dict]) -> dict:
    """Stream every source into ``writer``; return the counts of the summary line."""
    per_source = []
    table = _Rows(writer, data_cfg)
    pending: list[str] = []  # the next record batch
    for i, src in enumerate(data_cfg.train):
        read = empty = non_string = kept = chars = 0
        limit = -1 if src.limit is None else src.limit
        if not table.full:
            streaming, commit = sources.streams(src, data_cfg.limit), identities[i].get("commit")
            rows = sources.iter_source(src, f"data.train.{i}", streaming=streaming, revision=commit)
            room = table.room()
            for value in rows:  # the hot loop: one pass per text, no calls it can do without
                read += 1
                if not isinstance(value, str):
                    non_string += 1
                    continue
                if value.endswith("\n"):
                    value = value[:-2] if value.endswith("\r\n") else value[:-1]
                if not value or value.isspace():  # what strip() would empty, without copying the text
                    empty += 1
                    continue
                kept += 1
                pending.append(value)
                chars += len(value)
                if len(pending) >= room or chars >= _BATCH_CHARS:
                    table.flush(pending)
                    pending, chars, room = [], 0, table.room()
                    if table.full:
                        break
                if kept == limit:
                    break
            rows.close()  # a source stopped early releases its file or stream now
        per_source.append({"path": src.path, "read": read, "skipped_empty": empty,
                           "skipped_non_string": non_string, "kept": kept})  # fmt: skip
    table.flush(pending)
    totals = {k: sum(s[k] for s in per_source) for k in ("read", "skipped_empty", "skipped_non_string")}
    return {**totals, "duplicates_dropped": table.duplicates, "rows": writer.rows,
            "stopped_at_limit": table.full, "sources": per_source}  # fmt: skip


def _summary_line(stats: dict) -> str:
    sources_ = "; ".join(f"{s['path']}: {s['kept']}" for s in stats["sources"])
    stopped = "; stopped reading at data.limit" if stats.get("stopped_at_limit") else ""
    return (
        f"corpus: {stats['rows']} texts from {len(stats['sources'])} source(s) ({sources_}); "
        f"read {stats['read']} rows, skipped {stats['skipped_empty']} empty or whitespace-only and "
        f"{stats['skipped_non_string']} non-string, dropped {stats['duplicates_dropped']} duplicates{stopped}"
    )


def _record_batch(texts: list[str], hashes: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    # Built from one joined buffer: pa.array(texts) grows its buffers by doubling and its allocator
    # keeps the peak (measured: +55 MB resident for 4 MiB batches; this way +10 MB).
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    text = pa.LargeStringArray.from_buffers(
        len(encoded), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))
    )
    chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    return pa.record_batch(
        [text, int_array(hashes, pa.uint64()), int_array(chars, pa.int64())], schema=schema
    )


class _Rows:
    """Rows on their way into the table, a record batch at a time: deduplicated, cut at ``data.limit``."""

    def __init__(self, writer: TableWriter, data_cfg: DataConfig):
        self.writer = writer
        self.limit = data_cfg.limit
        self.seen = Deduper(writer.values_at) if data_cfg.dedupe else None
        self.duplicates = 0
        self.full = False  # data.limit rows are in the table: stop reading

    def room(self) -> int:
        """How many queued texts make a batch: with a limit, as soon as they could fill it, so that
        reading stops at the row that does."""
        return _BATCH_ROWS if self.limit is None else min(_BATCH_ROWS, self.limit - self.writer.rows)

    def flush(self, texts: list[str]) -> None:
        """Write what of ``texts`` is new (and fits under ``data.limit``) as one record batch."""
        if not texts:
            return
        hashes = text_hashes(texts)
        if self.seen is not None:
            keep = np.flatnonzero(self.seen.first_occurrences(texts, hashes))
            self.duplicates += len(texts) - len(keep)
            texts, hashes = [texts[k] for k in keep], hashes[keep]
        if self.limit is not None:
            room = self.limit - self.writer.rows
            texts, hashes = texts[:room], hashes[:room]
        if texts:
            rows = self.writer.write(_record_batch(texts, hashes, self.writer.schema))
            if self.seen is not None:
                self.seen.add(hashes, rows)
        self.full = self.limit is not None and self.writer.rows >= self.limit


# ---------------------------------------------------------------------------------------------
# Row splits and batch orders


def split_rows(valid: np.ndarray, eval_fraction: float, eval_limit: int | None, seed: int):
    """Split the valid row ids into (train_rows, eval_rows), seeded and independent of world size.

    The held-out rows are the sorted first ``n_eval`` of a seeded permutation of the valid rows, the
    training rows the sorted rest; no 8-byte array of the corpus's length is made."""
    valid = np.asarray(valid, dtype=bool)
    dtype = np.dtype(np.int32 if len(valid) < 2**31 else np.int64)  # row ids: 4 bytes a row where they fit
    rows = np.empty(int(np.count_nonzero(valid)), dtype=dtype)
    filled = 0
    for start in range(0, len(valid), 1 << 22):  # flatnonzero by blocks: its int64 result stays small
        found = np.flatnonzero(valid[start : start + (1 << 22)])
        rows[filled : filled + len(found)] = found + start
        filled += len(found)
    n_eval = int(round(len(rows) * eval_fraction))
    if eval_limit is not None:
        n_eval = min(n_eval, eval_limit) if eval_fraction > 0 else eval_limit
    n_eval = min(n_eval, max(len(rows) - 1, 0))
    order = np.arange(len(rows), dtype=dtype)
    np.random.default_rng(seed + 7919).shuffle(order)  # == permutation(len(rows)), in the smaller dtype
    eval_rows = np.sort(rows[order[:n_eval]])
    kept = np.ones(len(rows), dtype=bool)
    kept[order[:n_eval]] = False
    del order  # rows are sorted, so the rest in order is the sorted rest: no sorted copy of a permutation
    return rows[kept], eval_rows


def batch_order(
    rows: np.ndarray, lengths: np.ndarray, global_batch: int, seed: int, group_by_length: bool
) -> np.ndarray:
    """One epoch of global batches, one per row of the returned ``(n_batches, global_batch)`` array: a
    seeded shuffle, optionally grouped by length (mega-batches of 50 batches sorted by length, then the
    batches shuffled) so little compute goes to padding. Costs two copies of ``rows``, nothing wider."""
    rng = np.random.default_rng(seed)
    order = np.array(rows)
    rng.shuffle(order)  # == rows[rng.permutation(len(rows))], without the int64 permutation
    if group_by_length:
        mega = global_batch * 50
        for i in range(0, len(order), mega):
            chunk = order[i : i + mega]
            order[i : i + mega] = chunk[np.argsort(-lengths[chunk], kind="stable")]
    n_batches = len(order) // global_batch
    batches = order[: n_batches * global_batch].reshape(n_batches, global_batch)
    if group_by_length:
        batches = batches[rng.permutation(n_batches)]
    return batches


def stage_batches(train_rows, lengths, global_batch, seed, group_by_length):
    """Endless stream of global batches for one stage: epoch after epoch, each seeded by its index."""
    epoch = 0
    while True:
        batches = batch_order(train_rows, lengths, global_batch, seed * 100003 + epoch, group_by_length)
        if len(batches) == 0:
            raise UserError(
                f"stages: a global batch of {global_batch} rows is larger than the {len(train_rows)} training rows"
            )
        yield from batches
        epoch += 1
