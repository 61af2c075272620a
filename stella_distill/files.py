"""Writing files so that a reader sees the old content or the whole new one, never a torn one, and
reading back what was written (hashes of files and of row ranges, ``.npy`` headers).

Every file a job may be killed while writing (cache shards and manifests, checkpoints, exports) goes
through here: written beside its place, fsynced, renamed over it, the folder fsynced.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


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
        remove_quietly(tmp)
        raise named_os_error(exc, path) from None
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`replaced_atomically`)."""
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data)


def remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. the folder is gone or read-only: nothing left to clean
        pass


def named_os_error(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path`` if it names no file (writes to an open file name none)."""
    if exc.filename is not None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented, key-sorted JSON bytes (what our JSON files hold: stable, diffable)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def json_digest(*parts: Any) -> str:
    """A short, stable hash of JSON-able ``parts`` (key order does not count; other values by ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _sha256(path: Path, start: int = 0, length: int | None = None) -> tuple[Any, int]:
    """sha256 over ``length`` bytes of ``path`` from byte ``start`` (None: to its end), and the number of
    bytes read (fewer at the file's end), through one reused 1 MiB buffer: no memory piles up, even in
    threads hashing many files at once."""
    h = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    read = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while length is None or read < length:
            n = f.readinto(view if length is None else view[: min(len(buffer), length - read)])
            if not n:
                break
            h.update(view[:n])
            read += n
    return h, read


def sha256_file(path: Path) -> str:
    """sha256 hex of a file's bytes."""
    return _sha256(path)[0].hexdigest()


def sha256_range(path: Path, start: int, length: int) -> bytes:
    """sha256 digest of ``length`` bytes of ``path`` from byte ``start`` (fewer at its end)."""
    return _sha256(path, start, length)[0].digest()


def sha256_rows(path: Path, offset: int, start: int, stop: int, row_bytes: int) -> str | None:
    """sha256 of rows [start, stop) of a row-major file whose rows start at byte ``offset``, or None
    if the file is too short."""
    want = (stop - start) * row_bytes
    h, read = _sha256(path, offset + start * row_bytes, want)
    return h.hexdigest() if read == want else None


def npy_header(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """``(data offset, shape, dtype)`` from a .npy file's header (C order only)."""
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
# Folders


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not glibc, or glibc before 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: this kernel or file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(new: Path, target: Path, old: Path) -> None:
    """Put the folder ``new`` in place of ``target``; ``target``'s former content ends up at ``old``.

    Where the kernel can, the two folders are exchanged in one atomic step, so ``target`` always holds
    one whole version. Elsewhere ``target`` is renamed to ``old`` first and ``new`` to ``target`` next:
    a crash between the two leaves the former version whole at ``old`` (never deleted here), from
    where the next writer restores it. The caller removes ``old`` once it no longer needs it.
    """
    new, target, old = Path(new), Path(target), Path(old)
    if not target.exists():
        os.replace(new, target)
    elif _exchange(new, target):
        os.replace(new, old)  # ``new`` now holds the former version
    else:
        os.replace(target, old)
        os.replace(new, target)
    fsync_dir(target.parent)


def open_as_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir``/``open`` would (the umask's):
    temp folders (``mkdtemp``: 0700) and some writers' files (safetensors: 0600) are private."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


# ---------------------------------------------------------------------------------------------
# One writer at a time


_held: dict[Path, Any] = {}  # lock files this process holds (their open files)


def take_lock(lock_file: Path, who: str) -> tuple[bool, str | None]:
    """Take the advisory lock ``lock_file`` for this process: ``(True, None)`` when taken now,
    ``(False, None)`` when this process held it already, ``(False, holder)`` when another process holds
    it (``holder`` says which). A ``flock``: the system drops it when the process ends, however it ends,
    so a killed job never leaves a stale lock behind."""
    lock_file = Path(lock_file)
    if lock_file in _held:
        return False, None
    f = open(lock_file, "a+")  # noqa: SIM115 - held open until give_lock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()[:200] or "another process"
        f.close()
        return False, holder
    f.seek(0)
    f.truncate()
    f.write(f"{who} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    f.flush()
    _held[lock_file] = f
    return True, None


def give_lock(lock_file: Path) -> None:
    """Give ``lock_file`` back (a no-op if this process does not hold it)."""
    f = _held.pop(Path(lock_file), None)
    if f is not None:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
