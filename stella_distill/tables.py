"""Rows out of data files, each with the ``file:line`` it came from: the one reader of every format.

The corpus loader (``data.py``) and the evaluation sets (``evaluate.py``: scored sentence pairs, BEIR
folders) read their files here, so a format, a compression or an encoding fault is handled, and worded,
once. Formats: ``.txt`` (one text a line), ``.jsonl``, ``.json`` (a list, or JSON lines), ``.csv`` /
``.tsv`` (delimited, quoted or not), ``.parquet``; the text formats may be gzip/bz2/xz-compressed
(``corpus.jsonl.gz``). Every fault is a :class:`UserError` naming the file and, where there is one,
the line (``corpus.jsonl:17: invalid JSON (Expecting ',' delimiter at column 12)``).

Readers yield ``(where, value)``: ``where`` is the location to put in an error about that row
(``path:line``, or ``path: item k`` for the k-th element of a JSON list, or ``path: row k`` of a
Parquet file), ``value`` is what the row holds (a line of text, a parsed JSON value, the fields of a
delimited line, a Parquet row as a dict). What a row must contain is the caller's business.

Uses the standard library (and pyarrow for Parquet) only.
"""

from __future__ import annotations

import csv
import json
import lzma
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stella_distill.errors import UserError

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".tsv")
COMPRESSIONS = (".gz", ".bz2", ".xz")
# what a truncated or corrupt compressed file raises while it is read (gzip/bz2: OSError; all: EOFError)
DECOMPRESSION_ERRORS = (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error)
QUOTING = ("auto", "csv", "none")


def file_format(path: str | Path) -> tuple[str, str | None]:
    """``(format suffix, compression suffix or None)``: ``a.jsonl.gz`` -> ``(".jsonl", ".gz")``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def is_data_file(path: str | Path) -> bool:
    """Whether ``path``'s name is one of the readable formats (Parquet is never compressed outside)."""
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


def decompression_error(path: Path, exc: BaseException) -> UserError:
    """The one wording of a truncated or corrupt compressed file."""
    return UserError(f"{path}: cannot decompress ({type(exc).__name__}: {exc}); is the file complete?")


def _open_error(path: Path, exc: OSError, what: str) -> UserError:
    if isinstance(exc, FileNotFoundError):
        return UserError(f"{path}: {what} not found")
    if isinstance(exc, IsADirectoryError):
        return UserError(f"{path}: {what} is a folder, expected a file")
    return UserError(f"{path}: cannot read ({exc.strerror or exc})")


def decoded_lines(path: Path, what: str = "file") -> Iterator[tuple[int, str]]:
    """``(line number, text)`` per line, line ends kept; a UTF-8 byte-order mark is dropped.

    Bytes that are not UTF-8 are an error naming the line; so is a compressed file that breaks off.
    """
    path = Path(path)
    try:
        f = open_binary(path)
    except OSError as exc:
        raise _open_error(path, exc, what) from None
    with f:
        lineno = 0
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except IsADirectoryError as exc:
                raise _open_error(path, exc, what) from None
            except DECOMPRESSION_ERRORS as exc:
                raise decompression_error(path, exc) from None
            lineno += 1
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
                ) from None


def read_bytes(path: Path, what: str = "file") -> bytes:
    """The whole (decompressed) content of ``path``."""
    path = Path(path)
    try:
        with open_binary(path) as f:
            return f.read()
    except DECOMPRESSION_ERRORS as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # gzip / bz2 format errors carry none
            raise _open_error(path, exc, what) from None
        raise decompression_error(path, exc) from None


def first_line(path: Path, what: str = "file") -> str:
    """The first line of ``path`` that is not blank ("" for an empty file), without its line end."""
    for _, line in decoded_lines(path, what):
        if line.strip():
            return line.rstrip("\r\n")
    return ""


# ---------------------------------------------------------------------------------------------
# JSON


def json_problem(exc: json.JSONDecodeError) -> str:
    """``msg at column N`` of a JSON error (the line is named by the caller)."""
    msg = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg  # some end in "at" already
    return f"{msg} at column {exc.colno}"


def json_kind(value: Any) -> str:
    """How a JSON value is named in an error: ``a list``, ``a number``, ``null`` ..."""
    names = {list: "a list", dict: "an object", str: "a string", int: "a number", float: "a number"}
    names[bool] = "true/false"
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_json(path: Path, what: str = "file") -> Any:
    """The parsed content of a (possibly compressed) JSON document; faults name the file and line."""
    raw = read_bytes(Path(path), what)
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        lineno = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({json_problem(exc)})") from None


def json_lines(path: Path, what: str = "file") -> Iterator[tuple[str, Any]]:
    """``(path:line, value)`` per non-blank line of a JSON-lines file."""
    for lineno, line in decoded_lines(path, what):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: invalid JSON ({json_problem(exc)})") from None
        yield f"{path}:{lineno}", value


def json_items(path: Path, what: str = "file") -> Iterator[tuple[str, Any, bool]]:
    """The items of a ``.json`` file: ``(where, value, listed)``.

    A document that starts with ``[`` is a list: ``where`` is ``path: item k``, ``listed`` True. Any
    other document is read as JSON lines (many ``.json`` dumps are): ``path:line``, ``listed`` False.
    """
    raw = read_bytes(path, what)
    try:
        body = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from None
    if not body.lstrip().startswith("["):
        for where, value in json_lines(path, what):
            yield where, value, False
        return
    try:
        items = json.loads(body)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({json_problem(exc)})") from None
    for k, item in enumerate(items):
        yield f"{path}: item {k}", item, True


# ---------------------------------------------------------------------------------------------
# Delimited text


def csv_quoted(lines: Iterator[str], delimiter: str, probe: int = 10_000) -> bool:
    """Whether delimited text was written with csv quoting (pandas, the csv module): some field of
    the first ``probe`` lines is wholly quoted with doubled quotes inside (``"a ""quoted"" word"``), a
    form raw text almost never takes. Raw TSV (a text may start with a quote mark) says False."""
    for k, line in enumerate(lines):
        if k >= probe:
            break
        for field in line.rstrip("\r\n").split(delimiter):
            if len(field) >= 2 and field[0] == field[-1] == '"' and ('""' in field[1:-1] or field == '""'):
                return True
    return False


def delimiter_of(path: Path, first: str | None = None) -> str:
    """``,`` for ``.csv`` (unless its first line holds a tab), tab for everything else."""
    if file_format(path)[0] == ".csv" and (first is None or "\t" not in first):
        return ","
    return "\t"


MAX_RECORD_LINES = 1000  # a quoted field spanning more lines than this is an unclosed quote, not a text


def delimited_rows(
    path: Path, delimiter: str, quoting: str = "auto", what: str = "file"
) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` per record of a delimited file, the header line included.

    ``quoting``: ``csv`` reads quoted fields as the csv module does (a quoted field may hold the
    delimiter and line breaks; ``line number`` is the record's last physical line); ``none`` splits
    on the delimiter only (a text may start with a quote mark); ``auto`` is ``csv`` for commas and, for
    tabs, ``csv`` only if the first lines show csv quoting (pandas output).

    Rows are never merged silently: a quote that is never closed, or a quoted field that runs over
    more than ``MAX_RECORD_LINES`` lines (two stray quotes swallowing the rows between them), is an
    error naming the line where the field starts.
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    if quoting == "auto":
        quoted = delimiter == "," or csv_quoted((line for _, line in decoded_lines(path, what)), delimiter)
    else:
        quoted = quoting == "csv"
    reader = csv.reader(
        (line for _, line in decoded_lines(path, what)),
        delimiter=delimiter,
        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
        strict=quoted,
    )
    hint = "fix the quote, or read the file as raw text (quoting: none)"
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise UserError(
                    f"{path}:{start}: a quoted field starts here and is never closed; {hint}"
                ) from None
            raise UserError(f"{path}:{reader.line_num}: cannot parse the line ({exc}); {hint}") from None
        if reader.line_num - start >= MAX_RECORD_LINES:
            raise UserError(
                f"{path}:{start}: a quoted field runs from here to line {reader.line_num} "
                f"(over {MAX_RECORD_LINES} lines): an unclosed quote swallowing rows? {hint}"
            )
        yield reader.line_num, fields


# ---------------------------------------------------------------------------------------------
# Parquet


def parquet_rows(
    path: Path, columns: list[str] | None = None, what: str = "file", hint: str = ""
) -> Iterator[tuple[str, dict]]:
    """``(path: row k, {column: value})`` per row of a Parquet file, read in record batches.

    ``columns`` (if given) are the columns read; each must exist, or the error lists the file's
    columns (``hint``, e.g. the config field that named the column, goes after the column's name).
    """
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except Exception as exc:  # pyarrow raises its own error types for broken files
        raise UserError(f"{path}: cannot read as Parquet ({exc})") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r}{hint}; columns: {', '.join(names)}")
    k = 0
    for batch in pf.iter_batches(columns=columns, batch_size=65536):
        for row in batch.to_pylist():
            k += 1
            yield f"{path}: row {k}", row
