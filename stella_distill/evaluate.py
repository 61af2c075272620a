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
from pathlib import Path
from typing import Any

import numpy as np

from stella_distill import tables
from stella_distill.cache import build_target, l2_normalize, open_caches
from stella_distill.card import DIM_PLOT, plot_metrics_by_dim
from stella_distill.config import ExperimentConfig, load_config
from stella_distill.data import load_corpus, split_rows
from stella_distill.errors import UserError
from stella_distill.evalsets import BeirSet, read_beir, read_sts
from stella_distill.export import load, read_layout, set_dim
from stella_distill.logs import get_logger
from stella_distill.pooling import with_prompt
from stella_distill.run import EVAL_FILE

logger = get_logger(__name__)
FIDELITY_PAIRS_ROWS = 2000  # similarity Spearman uses at most this many rows (n^2 / 2 pairs)


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


def _l2_64(x: np.ndarray) -> np.ndarray:
    return l2_normalize(np.asarray(x, dtype=np.float64))


def fidelity_metrics(student: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Agreement of student vectors ``(n, d)`` with target vectors ``(n, T)`` on the same rows.

    ``fidelity/similarity_spearman``: Spearman (x100) between the upper triangles (i < j) of the
    cosine-similarity matrices ``S S^T`` and ``T T^T`` over the rows (the first
    ``FIDELITY_PAIRS_ROWS``), i.e. whether the student orders text pairs like the teachers.
    ``fidelity/cosine``: mean cosine of each student row to its target row (only when d == T).
    """
    s, t = _l2_64(student), _l2_64(target)
    out = {}
    if s.shape[1] == t.shape[1]:
        out["fidelity/cosine"] = float(np.mean(np.sum(s * t, axis=1)))
    n = min(len(s), FIDELITY_PAIRS_ROWS)
    iu = np.triu_indices(n, k=1)
    out["fidelity/similarity_spearman"] = 100 * _spearman((s[:n] @ s[:n].T)[iu], (t[:n] @ t[:n].T)[iu])
    return out


# ---------------------------------------------------------------------------------------------
# Encoding and per-task scoring


def _check_finite_weights(model, model_dir: Path) -> None:
    """A model with NaN/inf weights gives no score worth reporting: refuse it before any encoding."""
    import torch

    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise UserError(
            f"{model_dir}: {len(bad)} weight tensors hold NaN/inf (e.g. {bad[0]}); nothing to evaluate"
        )


def _finite(emb: np.ndarray, what: str) -> np.ndarray:
    bad = int((~np.isfinite(emb).all(axis=1)).sum())
    if bad:
        raise UserError(
            f"{what}: the model gave NaN/inf vectors for {bad} of {len(emb)} texts; no score reported"
        )
    return emb


def _encode(
    model, texts: list[str], batch_size: int, prompt_name: str | None = None, prompt: str | None = None
):
    """L2-normalised float32 embeddings; a SentenceTransformer gets prompts, any other ``.encode`` not.

    Texts are cut to a length far beyond what the model reads (``pooling.with_prompt``), so one
    pathological text cannot exhaust memory; NaN/inf vectors are an error, never a score.
    """
    from sentence_transformers import SentenceTransformer

    if isinstance(model, SentenceTransformer):
        texts = with_prompt(list(texts), "", model.max_seq_length or None)
        emb = model.encode(
            list(texts),
            batch_size=batch_size,
            prompt_name=prompt_name,
            prompt=prompt,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return _finite(np.asarray(emb, dtype=np.float32), "evaluate")
    if prompt_name is not None or prompt:
        raise ValueError("prompts need a SentenceTransformer model")
    emb = model.encode(list(texts), batch_size=batch_size)
    emb = emb.detach().cpu().numpy() if hasattr(emb, "detach") else np.asarray(emb)
    return _finite(_l2_64(emb).astype(np.float32), "evaluate")


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
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    if cache_dir is not None:
        cfg = dataclasses.replace(cfg, cache_dir=str(cache_dir))
    corpus = load_corpus(cfg.data, cache_dir=cfg.cache_dir)
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
    texts = corpus.texts[rows]
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
    prompts = read_layout(model_dir).prompts
    for what, name in names.items():
        if name is not None and name not in prompts:
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
    made_from: str | None = None,
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
    _check_finite_weights(model, model_dir)
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
        **({"made_from": made_from} if made_from is not None else {}),
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
        logger.info(format_table(results))
    else:
        logger.info("evaluate: nothing to score (give --sts, --retrieval, --cache with --config, or --mteb)")
    logger.info(f"evaluate: wrote {out_dir / EVAL_FILE}" + (f" and {plot}" if plot else ""))
    return result
