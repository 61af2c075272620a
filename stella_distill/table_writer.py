"""An Arrow IPC stream file written record batch by record batch: fsynced on close, fingerprinted as
it goes (sha256 over a uint64 column), and readable back by row while it grows.

Write failures (disk full, read-only folder) are one :class:`UserError` line naming the file. The
stream format is what Hugging Face ``datasets`` writes and memory-maps (``Dataset.from_file``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
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
        batch_of = np.searchsorted(self._starts, rows, side="right") - 1
        found: dict[int, object] = {}
        for k in sorted(set(batch_of.tolist())):
            source.seek(self._offsets[k])
            message = pa.ipc.read_message(source)
            while message.type != "record batch":  # the schema goes out with the first batch
                message = pa.ipc.read_message(source)
            batch = pa.ipc.read_record_batch(message, self.schema)
            wanted = [r for r, b in zip(rows, batch_of) if b == k]
            local = int_array(np.asarray(wanted) - self._starts[k], pa.int64())
            found.update(zip(wanted, batch.column(self._read).take(local).to_pylist()))
        return [found[r] for r in rows]
