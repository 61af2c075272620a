"""Score an exported model per output dim: STS, retrieval, teacher fidelity, optionally MTEB.

The model is loaded through sentence-transformers (``export.load``), i.e. exactly what users get.
Reported per dim, correlations and retrieval metrics x100:

- ``sts/<name>``: Spearman of cosine vs gold score on a scored sentence-pair file (STS-B's own tab
  layout, or csv/tsv/jsonl/json/parquet with sentence1/sentence2/score columns: ``read_sts``);
- ``retrieval/<name>/ndcg@10``, ``retrieval/<name>/recall@100`` on a BEIR folder (``corpus.jsonl``,
  ``queries.jsonl``, ``qrels/test.tsv``), computed as pytrec_eval/BEIR do (linear gain, queries with
  at least one relevant document, a document never retrieved for a query of the same id);
- ``fidelity/cosine`` (full dim, raw mean cosine) and ``fidelity/similarity_spearman`` (every dim):
  agreement with the teachers' target on held-out cached rows, given ``--config`` (and ``--cache``);
- ``mteb/<task>``: MTEB main score, with ``--mteb`` and the ``mteb`` package installed.

``eval.json`` (``{"model", "mode", "default_dim", "dims": {dim: {metric: value}}, "inputs"}``) and
``metrics_by_dim.png`` are written to ``out_dir`` (default: the model folder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stella_distill.data import DECOMPRESSION_ERRORS, csv_quoted, file_format, open_binary
from stella_distill.errors import UserError
from stella_distill.export import DIM_PLOT, EVAL_FILE, load, plot_metrics_by_dim, read_layout, set_dim

FIDELITY_PAIRS_ROWS = 2000  # similarity Spearman uses at most this many rows (n^2 / 2 pairs)


# ---------------------------------------------------------------------------------------------
# Reading inputs


def _read_text(path: Path, what: str) -> str:
    try:
        with open_binary(path) as f:
            data = f.read()
        return data.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: {what} is a folder, expected a file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except DECOMPRESSION_ERRORS as exc:
        raise UserError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from None


STS_COLUMNS = {  # accepted header names (lower case, '-' and ' ' read as '_'), first match wins
    "sentence 1": ("sentence1", "sentence_1", "sentence_a", "sent1", "s1", "text1", "text_1", "text_a"),
    "sentence 2": ("sentence2", "sentence_2", "sentence_b", "sent2", "s2", "text2", "text_2", "text_b"),
    "score": ("score", "gold_score", "gold", "similarity", "similarity_score", "relatedness_score",
              "label", "sim"),
}  # fmt: skip


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
    suffix = file_format(path)[0]
    if suffix == ".parquet":
        rows, where = _parquet_rows(path), "row"
    elif suffix in (".jsonl", ".json"):
        rows, where = _json_rows(path)
    else:
        text = _read_text(path, "STS file").lstrip("\ufeff")
        first = next((line for line in text.splitlines() if line.strip()), "")
        cols = first.split("\t")
        if len(cols) >= 7 and (_is_number(cols[4]) or _key(cols[4]) == "score"):
            if split:
                raise UserError(
                    f"{path}: '::{split}' selects a split, but STS-B's layout has no split column"
                )
            return _read_stsb(path, text)  # STS-B's own layout: the score is the 5th column
        rows, where = _delimited_rows(path, text, "," if suffix == ".csv" and "\t" not in first else "\t")
    return _pairs(path, _one_split(path, rows, split), where)


def _one_split(path: Path, rows: list[tuple[int, dict]], split: str) -> list[tuple[int, dict]]:
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


def _read_stsb(path: Path, text: str) -> tuple[list[str], list[str], np.ndarray]:
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for lineno, line in enumerate(text.splitlines(), 1):
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


def _delimited_rows(path: Path, text: str, delimiter: str) -> tuple[list[tuple[int, dict]], str]:
    import csv

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    lines = text.splitlines()
    # TSV is split on tabs (STS texts hold stray quotes) unless it shows csv quoting (pandas output)
    quoted = delimiter == "," or csv_quoted(iter(lines), delimiter)
    reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    rows: list[tuple[int, dict]] = []
    header: list[str] | None = None
    while True:
        try:
            cols = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise UserError(f"{path}:{reader.line_num}: cannot parse the line ({exc})") from None
        lineno = reader.line_num  # the physical line (a quoted field may span several)
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
        rows.append((lineno, dict(zip(header, cols))))
    return rows, "line"


def _json_rows(path: Path) -> tuple[list[tuple[int, dict]], str]:
    text = _read_text(path, "STS file").lstrip("\ufeff")
    if file_format(path)[0] == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        rows, where = list(enumerate(data if isinstance(data, list) else [data], 1)), "row"
    else:
        where = "line"
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except ValueError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    for lineno, row in rows:
        if not isinstance(row, dict):
            loc = f"{path}:{lineno}" if where == "line" else f"{path}: row {lineno}"
            raise UserError(f"{loc}: expected a JSON object with sentence and score fields")
    return rows, where


def _parquet_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except FileNotFoundError:
        raise UserError(f"{path}: STS file not found") from None
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: cannot read as Parquet ({exc})") from None
    return list(enumerate(table.to_pylist(), 1))


def _pairs(path: Path, rows: list[tuple[int, dict]], where: str) -> tuple[list[str], list[str], np.ndarray]:
    """Sentence pairs and scores from ``(line or row number, {column: value})`` records."""
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
    for lineno, row in rows:
        loc = f"{path}:{lineno}" if where == "line" else f"{path}: row {lineno}"
        a, b, raw = (row.get(index[r]) for r in ("sentence 1", "sentence 2", "score"))
        if not isinstance(a, str) or not isinstance(b, str):
            raise UserError(f"{loc}: the sentences must be text")
        try:
            score = float(raw)
        except (TypeError, ValueError):
            raise UserError(f"{loc}: {index['score']!r} is not a number: {raw!r}") from None
        if not math.isfinite(score):
            raise UserError(f"{loc}: {index['score']!r} is not finite: {raw!r}")
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
    for lineno, line in enumerate(_read_text(path, "file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object")
        for f in fields:
            if not isinstance(row.get(f), (str, int)) or (f == "_id" and str(row[f]) == ""):
                raise UserError(f"{path}:{lineno}: missing or non-text field {f!r}")
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
    for lineno, line in enumerate(_read_text(qrels_path, "qrels file").splitlines(), 1):
        if not line.strip():
            continue
        cols = line.rstrip("\n").split("\t")
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


# ---------------------------------------------------------------------------------------------
# Metrics


def ndcg_at_k(ranked: list[str], rels: dict[str, int], k: int = 10) -> float:
    """nDCG@k with linear gain (pytrec_eval's ``ndcg_cut``): sum rel_i / log2(i + 2) over the top k,
    divided by the same sum over the ideal ordering of all judged documents."""
    dcg = sum(max(rels.get(doc, 0), 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: list[str], rels: dict[str, int], k: int = 100) -> float:
    """Share of the relevant documents (relevance > 0) found in the top k."""
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def rank_documents(
    queries: np.ndarray,
    docs: np.ndarray,
    k: int,
    exclude: list[int | None] | None = None,
    query_block: int = 1024,
    doc_block: int = 32768,
) -> np.ndarray:
    """Indices ``(n_queries, k')`` of the highest dot products, best first (``k' = min(k, n_docs)``,
    one less when documents are excluded).

    Exact search in blocks (memory ``query_block x doc_block`` scores): each corpus block's top k is
    merged into the running top k. ``exclude[i]`` (a document index or None) is never returned for
    query ``i``.
    """
    import torch

    k = min(k, len(docs) - (1 if exclude and any(e is not None for e in exclude) else 0))
    d_all = torch.from_numpy(np.ascontiguousarray(docs, dtype=np.float32))
    out = np.empty((len(queries), k), dtype=np.int64)
    for q0 in range(0, len(queries), query_block):
        q = torch.from_numpy(np.ascontiguousarray(queries[q0 : q0 + query_block], dtype=np.float32))
        best_s = torch.full((len(q), 0), -math.inf)
        best_i = torch.zeros((len(q), 0), dtype=torch.long)
        for d0 in range(0, len(d_all), doc_block):
            scores = q @ d_all[d0 : d0 + doc_block].T
            if exclude:
                for row, e in enumerate(exclude[q0 : q0 + len(q)]):
                    if e is not None and d0 <= e < d0 + scores.shape[1]:
                        scores[row, e - d0] = -math.inf
            s, i = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_s, merged_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + d0], 1)
            order = merged_s.argsort(dim=1, descending=True, stable=True)[:, :k]
            best_s, best_i = merged_s.gather(1, order), merged_i.gather(1, order)
        out[q0 : q0 + len(q)] = best_i.numpy()
    return out


def retrieval_metrics(ranked: list[list[str]], beir: BeirSet) -> dict[str, float]:
    """Mean nDCG@10 and recall@100 (x100) over the queries of ``beir`` given each one's ranking."""
    ndcg = [ndcg_at_k(r, beir.qrels[q], 10) for q, r in zip(beir.query_ids, ranked)]
    recall = [recall_at_k(r, beir.qrels[q], 100) for q, r in zip(beir.query_ids, ranked)]
    return {"ndcg@10": 100 * float(np.mean(ndcg)), "recall@100": 100 * float(np.mean(recall))}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    value = float(spearmanr(a, b).statistic)
    return value if math.isfinite(value) else float("nan")


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fidelity_metrics(student: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Agreement of student vectors ``(n, d)`` with target vectors ``(n, T)`` on the same rows.

    ``fidelity/similarity_spearman``: Spearman (x100) between the upper triangles (i < j) of the
    cosine-similarity matrices ``S S^T`` and ``T T^T`` over the rows (the first
    ``FIDELITY_PAIRS_ROWS``), i.e. whether the student orders text pairs like the teachers.
    ``fidelity/cosine``: mean cosine of each student row to its target row (only when d == T).
    """
    s, t = _l2(student), _l2(target)
    out = {}
    if s.shape[1] == t.shape[1]:
        out["fidelity/cosine"] = float(np.mean(np.sum(s * t, axis=1)))
    n = min(len(s), FIDELITY_PAIRS_ROWS)
    iu = np.triu_indices(n, k=1)
    out["fidelity/similarity_spearman"] = 100 * _spearman((s[:n] @ s[:n].T)[iu], (t[:n] @ t[:n].T)[iu])
    return out


# ---------------------------------------------------------------------------------------------
# Encoding and per-task scoring


def _encode(
    model, texts: list[str], batch_size: int, prompt_name: str | None = None, prompt: str | None = None
):
    """L2-normalised float32 embeddings; a SentenceTransformer gets prompts, any other ``.encode`` not."""
    from sentence_transformers import SentenceTransformer

    if isinstance(model, SentenceTransformer):
        emb = model.encode(
            list(texts),
            batch_size=batch_size,
            prompt_name=prompt_name,
            prompt=prompt,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)
    if prompt_name is not None or prompt:
        raise ValueError("prompts need a SentenceTransformer model")
    emb = model.encode(list(texts), batch_size=batch_size)
    emb = emb.detach().cpu().numpy() if hasattr(emb, "detach") else np.asarray(emb)
    return _l2(emb).astype(np.float32)


def sts_spearman(model, path: str | Path, batch_size: int = 64, prompt_name: str | None = None) -> float:
    """Spearman x100 of cosine(sentence 1, sentence 2) vs the gold scores of a ``read_sts`` file.

    ``model`` is a ``SentenceTransformer`` (``prompt_name`` picks one of its prompts; None means its
    default prompt, if any) or any object whose ``encode(texts, batch_size=...)`` returns vectors.
    """
    s1, s2, scores = read_sts(path)
    unique = list(dict.fromkeys(s1 + s2))
    emb = _encode(model, unique, batch_size, prompt_name).astype(np.float64)
    index = {t: i for i, t in enumerate(unique)}
    a = emb[[index[t] for t in s1]]
    b = emb[[index[t] for t in s2]]
    return 100 * _spearman(np.sum(a * b, axis=1), scores)


def retrieval_scores(
    model,
    beir: BeirSet,
    batch_size: int = 64,
    query_prompt_name: str | None = None,
    doc_prompt_name: str | None = None,
    ignore_identical_ids: bool = True,
) -> dict[str, float]:
    """nDCG@10 and recall@100 (x100) of ``model`` on a BEIR set (exact search by cosine)."""
    q = _encode(model, beir.query_texts, batch_size, query_prompt_name)
    d = _encode(model, beir.doc_texts, batch_size, doc_prompt_name)
    position = {doc: i for i, doc in enumerate(beir.doc_ids)}
    exclude = [position.get(qid) for qid in beir.query_ids] if ignore_identical_ids else None
    top = rank_documents(q, d, 100, exclude)
    ranked = [[beir.doc_ids[i] for i in row] for row in top]
    return retrieval_metrics(ranked, beir)


def run_mteb(model, tasks: list[str], output_folder: str | Path) -> dict[str, float]:
    """Run MTEB ``tasks`` on ``model`` and return ``{"mteb/<task>": main score x100}``.

    Works with mteb 2 (``mteb.evaluate``, result cache off so each dim is scored) and mteb 1
    (``mteb.MTEB(tasks).run``). Needs network access to the task datasets; not exercised offline.
    """
    mteb = _import_mteb()
    task_objs = mteb.get_tasks(tasks=list(tasks))
    if hasattr(mteb, "evaluate"):
        try:
            result = mteb.evaluate(model, task_objs, cache=None)
        except TypeError:
            result = mteb.evaluate(model, task_objs)
        task_results = result.task_results
    else:
        task_results = mteb.MTEB(tasks=task_objs).run(model, output_folder=str(output_folder))
    return {f"mteb/{r.task_name}": 100 * float(r.get_score()) for r in task_results}


def _import_mteb():
    try:
        import mteb
    except ImportError:
        raise UserError("--mteb: the mteb package is not installed; pip install mteb") from None
    return mteb


# ---------------------------------------------------------------------------------------------
# Teacher fidelity inputs


def heldout_rows(valid: np.ndarray, data_cfg, seed: int) -> tuple[np.ndarray, bool]:
    """The trainer's held-out rows for ``data_cfg`` and ``seed``, and whether they were truly held out.

    Without a held-out split (``data.eval_fraction`` 0 and no ``data.eval_limit``) the last
    ``min(1000, n)`` valid rows are used instead; they were trained on, and the flag says so.
    """
    from stella_distill.train import split_rows

    _, rows = split_rows(valid, data_cfg.eval_fraction, data_cfg.eval_limit, seed)
    if len(rows):
        return np.asarray(rows, dtype=np.int64), True
    valid_rows = np.flatnonzero(valid)
    return valid_rows[-min(1000, len(valid_rows)) :], False


def fidelity_inputs(
    config, cache_dir: str | Path | None = None, rows=None
) -> tuple[list[str], np.ndarray, str, dict]:
    """Texts, target ``(n, T)``, training prompt and a description of the rows used for fidelity.

    ``config`` is an experiment YAML path or an ``ExperimentConfig``; its teacher caches are opened
    from ``cache_dir`` (default: the config's ``cache_dir``) and checked against the config and the
    corpus it names.
    """
    from stella_distill.cache import build_target, open_caches
    from stella_distill.config import ExperimentConfig, load_config
    from stella_distill.data import load_corpus

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    if cache_dir is not None:
        cfg = dataclasses.replace(cfg, cache_dir=str(cache_dir))
    corpus = load_corpus(cfg.data)
    caches = open_caches(cfg, corpus)
    if rows is None:
        valid = np.logical_and.reduce([np.asarray(c.valid_mask, dtype=bool) for c in caches])
        rows, heldout = heldout_rows(valid, cfg.data, cfg.seed)
    else:
        rows, heldout = np.asarray(rows, dtype=np.int64), True
        if len(rows) and (rows.min() < 0 or rows.max() >= len(corpus)):
            raise UserError(f"rows: row ids must be in [0, {len(corpus)}); got {rows.min()}..{rows.max()}")
    if len(rows) < 2:
        raise UserError(f"{cfg.cache_dir}: fewer than 2 rows to measure teacher fidelity on")
    target = build_target(caches, rows)
    texts = [corpus.texts[i] for i in rows]
    prompt = cfg.student.prompt if cfg.student is not None else ""
    return texts, target, prompt, {"rows": len(rows), "heldout": heldout}


# ---------------------------------------------------------------------------------------------
# Entry point


def _names(paths: list[str | Path]) -> list[str]:
    """Short unique names for input files/folders: the name without its format and compression
    suffixes (``sts-dev``; ``stsbenchmark:test`` for ``stsbenchmark.tsv.gz::test``), or
    parent/name when names repeat."""
    stems = []
    for p in paths:
        name, _, split = str(p).partition("::")
        path = Path(name)
        fmt, compression = file_format(path)
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


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def format_table(dims: dict[int, dict[str, float]]) -> str:
    """A plain-text table: one row per dim, one column per metric."""
    names = sorted({k for m in dims.values() for k in m})
    widths = [max(len(n), 8) for n in names]
    lines = ["dim".rjust(6) + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for d in sorted(dims, reverse=True):
        cells = []
        for n, w in zip(names, widths):
            v = dims[d].get(n)
            cells.append(
                (
                    "-" if v is None or not math.isfinite(v) else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
                ).rjust(w)
            )
        lines.append(str(d).rjust(6) + "  " + "  ".join(cells))
    return "\n".join(lines)


def _check_prompt_names(model_dir: Path, **names: str | None) -> None:
    """Every given prompt name must be one of the export's prompts (config_sentence_transformers.json)."""
    wanted = {k: v for k, v in names.items() if v is not None}
    if not wanted:
        return
    try:
        prompts = (
            json.loads((model_dir / "config_sentence_transformers.json").read_text()).get("prompts") or {}
        )
    except (OSError, ValueError):
        prompts = {}
    for what, name in wanted.items():
        if name not in prompts:
            offered = ", ".join(sorted(prompts)) or "none"
            raise UserError(
                f"--{what}-prompt-name / evaluate.{what}_prompt_name: {name!r} is not a prompt of {model_dir} "
                f"(its prompts: {offered})"
            )


def evaluate_model(
    model_dir: str | Path,
    *,
    dims: list[int] | None = None,
    sts: list[str] = [],  # noqa: B006 - read only; the CLI passes lists
    retrieval: list[str] = [],  # noqa: B006
    cache_dir: str | Path | None = None,
    config=None,
    mteb_tasks: list[str] = [],  # noqa: B006
    batch_size: int = 64,
    out_dir: str | Path | None = None,
    rows=None,
    sts_prompt_name: str | None = None,
    query_prompt_name: str | None = None,
    doc_prompt_name: str | None = None,
    device: str | None = None,
) -> dict:
    """``stella-distill evaluate``: score the export at ``model_dir`` for every dim in ``dims``.

    ``dims`` defaults to every offered dim. Inputs are read and checked before the model loads.
    Fidelity needs ``config`` (and ``cache_dir`` when the cache moved; held-out ``rows`` default to
    the trainer's split). ``*_prompt_name`` pick prompts of the model (None: its default prompt). Prints a table,
    writes ``eval.json`` and ``metrics_by_dim.png`` into ``out_dir`` (default ``model_dir``) and
    returns the ``eval.json`` content.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "modules.json").is_file():
        raise UserError(f"{model_dir}: not an exported sentence-transformers folder (no modules.json)")
    layout = read_layout(model_dir)
    dims = [int(d) for d in (dims or layout.dims)]
    for d in dims:
        if not (d in layout.dims or (layout.mode == "truncate" and 1 <= d <= layout.full_dim)):
            raise UserError(f"--dims: {d} is not offered by {model_dir}; offered dims: {layout.dims}")
    if cache_dir is not None and config is None:
        raise UserError("--cache needs --config: the experiment whose teachers and corpus built the cache")
    _check_prompt_names(model_dir, sts=sts_prompt_name, query=query_prompt_name, doc=doc_prompt_name)
    if mteb_tasks:
        _import_mteb()
    sts_sets = [(name, str(p), read_sts(p)) for name, p in zip(_names(sts), sts)]
    beir_sets = [(name, read_beir(p)) for name, p in zip(_names(retrieval), retrieval)]
    fidelity = fidelity_inputs(config, cache_dir, rows) if config is not None else None
    if fidelity is not None and fidelity[1].shape[1] != layout.full_dim:
        raise UserError(
            f"{cache_dir}: the teachers' target has {fidelity[1].shape[1]} dims but {model_dir} outputs "
            f"{layout.full_dim}; this cache does not belong to this model"
        )
    out_dir = Path(out_dir) if out_dir is not None else model_dir
    try:  # an unwritable --out fails now, not after the scoring
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out: cannot create {exc.filename or out_dir}: {exc.strerror or exc}") from None

    model = load(model_dir, dim=dims[0], device=device)
    results: dict[int, dict[str, float]] = {}
    for d in dims:
        set_dim(model, model_dir, d, layout)
        metrics: dict[str, float] = {}
        for name, path, _ in sts_sets:
            metrics[f"sts/{name}"] = sts_spearman(model, path, batch_size, sts_prompt_name)
        for name, beir in beir_sets:
            scores = retrieval_scores(model, beir, batch_size, query_prompt_name, doc_prompt_name)
            metrics.update({f"retrieval/{name}/{k}": v for k, v in scores.items()})
        if fidelity is not None:
            texts, target, prompt, _ = fidelity
            vectors = _encode(model, texts, batch_size, prompt=prompt)
            metrics.update(fidelity_metrics(vectors, target))
        if mteb_tasks:
            metrics.update(run_mteb(model, mteb_tasks, out_dir / "mteb" / str(d)))
        results[d] = metrics

    result = {
        "model": str(model_dir),
        "mode": layout.mode,
        "default_dim": layout.default_dim,
        "dims": {str(d): _json_safe(m) for d, m in results.items()},
        "inputs": {
            "sts": [p for _, p, _ in sts_sets],
            "retrieval": [str(p) for p in retrieval],
            "fidelity": fidelity[3] if fidelity is not None else None,
            "mteb": list(mteb_tasks),
            "batch_size": batch_size,
        },
    }
    try:
        (out_dir / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        plot = plot_metrics_by_dim(result, out_dir / DIM_PLOT)
    except OSError as exc:
        raise UserError(f"--out: cannot write {exc.filename or out_dir}: {exc.strerror or exc}") from None
    if any(results.values()):
        print(format_table(results))
    else:
        print("evaluate: nothing to score (give --sts, --retrieval, --cache with --config, or --mteb)")
    print(f"evaluate: wrote {out_dir / EVAL_FILE}" + (f" and {plot}" if plot else ""))
    return result
