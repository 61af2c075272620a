"""Arrow IPC stream files: written record batch by record batch (:class:`TableWriter`: fsynced on
close, fingerprinted as it goes, readable back by row while it grows), memory-mapped whole
(:func:`open_table`), and read by row (:class:`TextColumn`).

The stream format is what Hugging Face ``datasets`` writes and memory-maps (``Dataset.from_file``).
Write failures (disk full, read-only folder) are one :class:`UserError` line naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from stella_distill.errors import UserError, write_failure
from stella_distill.files import named_os_error


# pa.array() and Array.to_numpy() import pandas on first use (measured: +32 MB resident, +50 MB
# peak per process); building from and reading through buffers keeps it out of every process.
def int_array(values: np.ndarray, type: pa.DataType) -> pa.Array:
    """A primitive Arrow array over ``values`` (converted to ``type``'s numpy dtype), without pandas."""
    values = np.ascontiguousarray(values, dtype=type.to_pandas_dtype())
    return pa.Array.from_buffers(type, len(values), [None, pa.py_buffer(values)])


def as_numpy(array: pa.Array) -> np.ndarray:
    """A zero-copy numpy view of a primitive Arrow array without nulls, without pandas."""
    dtype = np.dtype(array.type.to_pandas_dtype())
    return np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )


@contextlib.contextmanager
def written(path: Path, what: str = "the corpus table"):
    """A failed write (disk full, read-only) as one line naming the file."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {what}: {write_failure(named_os_error(exc, path))}") from None


class TableWriter:
    """Appends record batches to an Arrow IPC stream file (use it as a context manager).

    ``fingerprint`` (after a clean exit) is the sha256 hex over the little-endian bytes of the uint64
    column ``fingerprint_column`` of every row in order; ``values_at(rows)`` reads column
    ``read_column`` of rows already written back from the file.
    """

    def __init__(self, path: Path, schema: pa.Schema, *, fingerprint_column: str, read_column: str):
        self.path = path
        self.schema = schema
        self.rows = 0
        self.fingerprint = ""
        self._hashed = schema.get_field_index(fingerprint_column)
        self._read = schema.get_field_index(read_column)
        self._sha = hashlib.sha256()
        self._starts: list[int] = []  # first row of each batch
        self._offsets: list[int] = []  # file offset of each batch's message

    def __enter__(self) -> TableWriter:
        with written(self.path):
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
        return self

    def __exit__(self, *exc) -> None:
        with written(self.path):
            try:
                self._writer.close()
            finally:
                self._sink.close()
            if exc[0] is None:
                with open(self.path, "rb+") as f:
                    os.fsync(f.fileno())
                self.fingerprint = self._sha.hexdigest()

    def write(self, batch: pa.RecordBatch) -> np.ndarray:
        """Append ``batch`` (with the file's schema); returns the row ids it got."""
        self._starts.append(self.rows)
        with written(self.path):
            self._offsets.append(self._sink.tell())
            self._writer.write_batch(batch)
        hashed = as_numpy(batch.column(self._hashed))
        self._sha.update(np.ascontiguousarray(hashed, dtype="<u8").tobytes())
        rows = np.arange(self.rows, self.rows + batch.num_rows, dtype=np.int64)
        self.rows += batch.num_rows
        return rows

    def values_at(self, rows: list[int]) -> list:
        """Column ``read_column`` of rows already written, in the order asked."""
        source = pa.memory_map(str(self.path))
        rows = np.asarray(rows, dtype=np.int64)
        batch_of = np.searchsorted(self._starts, rows, side="right") - 1
        order = np.argsort(batch_of, kind="stable")
        bounds = np.searchsorted(batch_of[order], np.arange(len(self._starts) + 1))
        out: list = [None] * len(rows)
        for k in np.flatnonzero(np.diff(bounds)).tolist():
            source.seek(self._offsets[k])
            message = pa.ipc.read_message(source)
            while message.type != "record batch":  # the schema goes out with the first batch
                message = pa.ipc.read_message(source)
            batch = pa.ipc.read_record_batch(message, self.schema)
            positions = order[bounds[k] : bounds[k + 1]]
            local = int_array(rows[positions] - self._starts[k], pa.int64())
            for pos, value in zip(positions.tolist(), batch.column(self._read).take(local).to_pylist()):
                out[pos] = value
        return out


def open_table(path: Path) -> pa.Table | None:
    """The table in the stream file at ``path``, memory-mapped (nothing is read until used), or None
    if the file is missing or not a whole Arrow stream."""
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowInvalid):
        return None


class TextColumn(Sequence):
    """A string column of a (memory-mapped) table, read on demand.

    ``texts[i]`` is one str; ``texts[a:b]`` and ``texts[rows]`` (a list or array of row ids) are lists.
    Nothing is held beyond what a call returns.
    """

    def __init__(self, column: pa.ChunkedArray):
        self._column = column
        self._chunks = column.chunks
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._column.slice(start, max(stop - start, 0)).to_pylist()
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"corpus row {key} out of range (0..{len(self) - 1})")
            k = int(np.searchsorted(self._starts, i, side="right")) - 1
            return self._chunks[k][i - int(self._starts[k])].as_py()
        rows = np.asarray(key, dtype=np.int64)
        if rows.ndim != 1:
            raise TypeError("corpus rows must be an int, a slice or a 1-d list of row ids")
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"corpus rows out of range (0..{len(self) - 1})")
        # chunk by chunk: a take over the whole column would first concatenate it (a copy of every text)
        out: list = [None] * len(rows)
        chunk_of = np.searchsorted(self._starts, rows, side="right") - 1
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.searchsorted(chunk_of[order], np.arange(len(self._chunks) + 1))
        for k in np.flatnonzero(np.diff(bounds)):
            positions = order[bounds[k] : bounds[k + 1]]
            local = int_array(rows[positions] - self._starts[k], pa.int64())
            for pos, text in zip(positions.tolist(), self._chunks[k].take(local).to_pylist()):
                out[pos] = text
        return out

    def __iter__(self) -> Iterator[str]:
        for chunk in self._chunks:
            for start in range(0, len(chunk), 4096):
                yield from chunk.slice(start, 4096).to_pylist()
