"""The evaluation sets: scored sentence pairs (STS) and BEIR retrieval folders, read and checked.

Files are read through ``tables`` (every format, compression and encoding fault handled and worded
once); this module knows what the rows of an evaluation set must hold: which columns are the
sentences and the score, how a BEIR folder is laid out. Errors name the file and line.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from stella_distill import tables
from stella_distill.errors import UserError

STS_COLUMNS = {  # accepted header names (lower case, '-' and ' ' read as '_'), first match wins
    "sentence 1": ("sentence1", "sentence_1", "sentence_a", "sent1", "s1", "text1", "text_1", "text_a"),
    "sentence 2": ("sentence2", "sentence_2", "sentence_b", "sent2", "s2", "text2", "text_2", "text_b"),
    "score": ("score", "gold_score", "gold", "similarity", "similarity_score", "relatedness_score",
              "label", "sim"),
}  # fmt: skip
STS_FILE = "STS file"


def read_sts(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Read a scored sentence-pair file: ``(sentences 1, sentences 2, gold scores)``.

    Formats (Spearman ignores the score scale, so 0-5, 1-5 and 0-1 sets all work):

    - STS-B's own distribution (``sts-dev.csv``): tab-separated, no header, columns 5, 6 and 7 are
      score, sentence 1 and sentence 2, later columns ignored. Split on tabs only (the csv module
      mis-reads the stray quotes of STS-B);
    - a delimited file with a header naming the columns (``.tsv``/``.txt`` tab-separated, ``.csv``
      comma-separated, quotes as the csv module reads them): sentence 1 as ``sentence1``,
      ``sentence_a``, ``text1``..., sentence 2 likewise, the score as ``score``, ``label``,
      ``similarity``, ``relatedness_score``... (``STS_COLUMNS``; SICK, MTEB and sentence-transformers
      dumps use these);
    - JSON lines (``.jsonl``, or ``.json`` holding a list of objects) and Parquet with those names.

    Text formats may be gzip/bz2/xz-compressed (``stsbenchmark.tsv.gz``). A file holding several
    splits in a ``split`` column (sentence-transformers' stsbenchmark.tsv.gz) is read as
    ``FILE::SPLIT`` (``stsbenchmark.tsv.gz::test``); without the suffix it is refused, not mixed.
    Blank lines are skipped; a malformed line, a missing column or a non-numeric score raises
    ``UserError`` naming the file (and line).
    """
    name, _, split = str(path).partition("::")
    path = Path(name)
    suffix = tables.file_format(path)[0]
    if suffix == ".parquet":
        rows = list(tables.parquet_rows(path, what=STS_FILE))
    elif suffix in (".jsonl", ".json"):
        rows = _json_rows(path)
    else:
        first = tables.first_line(path, STS_FILE)
        cols = first.split("\t")
        if len(cols) >= 7 and (_is_number(cols[4]) or _key(cols[4]) == "score"):
            if split:
                raise UserError(
                    f"{path}: '::{split}' selects a split, but STS-B's layout has no split column"
                )
            return _read_stsb(path)  # STS-B's own layout: the score is the 5th column
        rows = _delimited_rows(path, tables.delimiter_of(path, first))
    return _pairs(path, _one_split(path, rows, split))


def _one_split(path: Path, rows: list[tuple[str, dict]], split: str) -> list[tuple[str, dict]]:
    """The rows of ``split`` when the file has a ``split`` column; all rows when it has none."""
    column = next((k for k in (rows[0][1] if rows else {}) if _key(k) == "split"), None)
    if column is None:
        if split:
            raise UserError(f"{path}: '::{split}' selects a split, but the file has no 'split' column")
        return rows
    values = sorted({str(r.get(column)) for _, r in rows})
    if not split:
        if len(values) == 1:
            return rows
        raise UserError(
            f"{path}: holds several splits ({', '.join(values)}) in its {column!r} column; "
            f"name one as {path}::{values[-1] if 'test' not in values else 'test'}"
        )
    chosen = [(n, r) for n, r in rows if str(r.get(column)) == split]
    if not chosen:
        raise UserError(f"{path}: no rows of split {split!r} (splits: {', '.join(values)})")
    return chosen


def _read_stsb(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for lineno, line in tables.decoded_lines(path, STS_FILE):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 7:
            raise UserError(
                f"{path}:{lineno}: expected at least 7 tab-separated columns (genre, file, year, id, score, "
                f"sentence 1, sentence 2); got {len(cols)}"
            )
        try:
            score = float(cols[4])
        except ValueError:
            if not scores and cols[4].strip().lower() == "score":
                continue
            raise UserError(f"{path}:{lineno}: the score column (5th) is not a number: {cols[4]!r}") from None
        if not math.isfinite(score):
            raise UserError(f"{path}:{lineno}: the score column (5th) is not finite: {cols[4]!r}")
        s1.append(cols[5])
        s2.append(cols[6])
        scores.append(score)
    return _checked(path, s1, s2, scores)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def _header_index(names: list[str]) -> dict[str, str] | None:
    """``{role: column name}`` when ``names`` holds a column for each of the three roles, else None."""
    keys = {_key(n): n for n in names}
    found = {}
    for role, aliases in STS_COLUMNS.items():
        match = next((keys[a] for a in aliases if a in keys), None)
        if match is None:
            return None
        found[role] = match
    return found


def _delimited_rows(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = []
    header: list[str] | None = None
    for lineno, cols in tables.delimited_rows(path, delimiter, "auto", STS_FILE):
        if not any(c.strip() for c in cols):
            continue
        if header is None:
            header = cols
            if _header_index(header) is None:
                raise UserError(
                    f"{path}:{lineno}: no header naming the sentence and score columns "
                    f"(e.g. sentence1, sentence2, score; got {', '.join(repr(c) for c in header[:8])}), "
                    f"and not STS-B's 7 tab-separated columns"
                )
            continue
        if len(cols) != len(header):
            sep = "tab" if delimiter == "\t" else "comma"
            raise UserError(
                f"{path}:{lineno}: {len(cols)} {sep}-separated columns, the header has {len(header)}"
            )
        rows.append((f"{path}:{lineno}", dict(zip(header, cols))))
    return rows


def _json_rows(path: Path) -> list[tuple[str, dict]]:
    if tables.file_format(path)[0] == ".json":
        items = [(where, value) for where, value, _ in tables.json_items(path, STS_FILE)]
    else:
        items = list(tables.json_lines(path, STS_FILE))
    for where, row in items:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object with sentence and score fields")
    return items


def _pairs(path: Path, rows: list[tuple[str, dict]]) -> tuple[list[str], list[str], np.ndarray]:
    """Sentence pairs and scores from ``(where, {column: value})`` records."""
    if not rows:
        raise UserError(f"{path}: no sentence pairs (an empty file, or a header without rows)")
    names = list(rows[0][1])
    index = _header_index(names)
    if index is None:
        wanted = "; ".join(f"{role}: one of {', '.join(a[:4])}..." for role, a in STS_COLUMNS.items())
        raise UserError(
            f"{path}: needs sentence and score columns ({wanted}); found {', '.join(map(str, names))}"
        )
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for where, row in rows:
        a, b, raw = (row.get(index[r]) for r in ("sentence 1", "sentence 2", "score"))
        if not isinstance(a, str) or not isinstance(b, str):
            raise UserError(f"{where}: the sentences must be text")
        try:
            score = float(raw)
        except (TypeError, ValueError):
            raise UserError(f"{where}: {index['score']!r} is not a number: {raw!r}") from None
        if not math.isfinite(score):
            raise UserError(f"{where}: {index['score']!r} is not finite: {raw!r}")
        s1.append(a)
        s2.append(b)
        scores.append(score)
    return _checked(path, s1, s2, scores)


def _checked(path: Path, s1: list[str], s2: list[str], scores: list[float]):
    if len(scores) < 2:
        raise UserError(f"{path}: needs at least 2 sentence pairs; found {len(scores)}")
    if len(set(scores)) < 2:
        raise UserError(f"{path}: every gold score is the same ({scores[0]}): Spearman is undefined")
    return s1, s2, np.asarray(scores, dtype=np.float64)


def names(paths: list[str | Path]) -> list[str]:
    """Short unique names for evaluation files/folders (``sts/<name>`` in eval.json and baseline.json): the name without its format and compression
    suffixes (``sts-dev``; ``stsbenchmark:test`` for ``stsbenchmark.tsv.gz::test``), or
    parent/name when names repeat."""
    stems = []
    for p in paths:
        name, _, split = str(p).partition("::")
        path = Path(name)
        fmt, compression = tables.file_format(path)
        cut = len(fmt or "") + len(compression or "")
        stem = path.name[: len(path.name) - cut] if cut and len(path.name) > cut else path.name
        stems.append(f"{stem}:{split}" if split else stem)
    names = [
        s if stems.count(s) == 1 else f"{Path(str(p).partition('::')[0]).parent.name}/{s}"
        for s, p in zip(stems, paths)
    ]
    # still clashing (a.tsv beside a.tsv.gz, or one file given twice): the path as given, then a count
    names = [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]
    return [n if names.count(n) == 1 else f"{n}#{names[:k].count(n) + 1}" for k, n in enumerate(names)]


@dataclasses.dataclass
class BeirSet:
    """A BEIR retrieval set: corpus, the queries that have relevant documents, graded relevance."""

    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}; only queries with a positive


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    rows = []
    for where, row in tables.json_lines(path):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        for f in fields:
            if not isinstance(row.get(f), (str, int)) or (f == "_id" and str(row[f]) == ""):
                raise UserError(f"{where}: missing or non-text field {f!r}")
        rows.append(row)
    return rows


def _qrels_file(folder: Path, split: str) -> Path:
    qdir = folder / "qrels"
    if (qdir / f"{split}.tsv").is_file():
        return qdir / f"{split}.tsv"
    found = sorted(qdir.glob("*.tsv")) if qdir.is_dir() else []
    if len(found) == 1:
        return found[0]
    names = ", ".join(p.name for p in found) or "none"
    raise UserError(f"{folder}: BEIR folder needs qrels/{split}.tsv (found in qrels/: {names})")


def read_beir(folder: str | Path, split: str = "test") -> BeirSet:
    """Read a BEIR folder: ``corpus.jsonl`` ({_id, title, text}), ``queries.jsonl`` ({_id, text}) and
    ``qrels/<split>.tsv`` (query-id, corpus-id, score; a header line). Documents are ``title + " " + text``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: BEIR folder not found")
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: BEIR folder has no {name}")
    qrels_path = _qrels_file(folder, split)
    corpus = _read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    queries = {str(r["_id"]): str(r["text"]) for r in _read_jsonl(folder / "queries.jsonl", ("_id", "text"))}
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in tables.decoded_lines(qrels_path, "qrels file"):
        if not line.strip():
            continue
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) < 3:
            raise UserError(f"{qrels_path}:{lineno}: expected query-id, corpus-id, score (tab-separated)")
        try:
            rel = int(float(cols[2]))
        except ValueError:
            if lineno == 1:
                continue  # the header line
            raise UserError(f"{qrels_path}:{lineno}: score {cols[2]!r} is not a number") from None
        qrels.setdefault(cols[0], {})[cols[1]] = rel
    qrels = {q: docs for q, docs in qrels.items() if any(r > 0 for r in docs.values())}
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise UserError(
            f"{qrels_path}: query id {missing[0]!r} is not in queries.jsonl ({len(missing)} missing)"
        )
    if not qrels or not corpus:
        raise UserError(f"{folder}: no query with a relevant document, or an empty corpus")
    titles = [str(r.get("title") or "").strip() for r in corpus]
    texts = [(t + " " + str(r["text"])).strip() if t else str(r["text"]) for t, r in zip(titles, corpus)]
    qids = sorted(qrels)
    return BeirSet([str(r["_id"]) for r in corpus], texts, qids, [queries[q] for q in qids], qrels)
