"""Score an exported model per output dim: STS, retrieval, teacher fidelity, optionally MTEB.

The model is loaded through sentence-transformers (``layout.load``), i.e. exactly what users get,
and scored with sentence-transformers' own evaluators; our tolerant readers (``evalsets``) stand in
front of them. Reported per dim, correlations and retrieval metrics x100:

- ``sts/<name>``: ``EmbeddingSimilarityEvaluator``'s Spearman of cosine vs gold score on a scored
  sentence-pair file (STS-B's own tab layout, or csv/tsv/jsonl/json/parquet with sentence1/sentence2/
  score columns: ``read_sts``);
- ``retrieval/<name>/{ndcg@10,mrr@10,map@100,recall@100}``: ``InformationRetrievalEvaluator`` on a
  BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv``). Like that evaluator, every
  judgment above 0 counts as relevant (binary gain: graded sets such as TREC-COVID score otherwise than
  BEIR's graded nDCG; ``--mteb`` gives those) and a document with the query's id is not skipped;
- ``fidelity/cosine`` (full dim, raw mean cosine) and ``fidelity/similarity_spearman`` (every dim):
  agreement with the teachers' target on held-out cached rows, given ``--config`` (and ``--cache``);
- ``mteb/<task>``: MTEB main score, with ``--mteb`` and the ``mteb`` package installed.

In truncate mode the evaluators get ``truncate_dim``; in heads mode the dim's own head is swapped in.
``eval.json`` (``{"model", "mode", "default_dim", "dims": {dim: {metric: value}}, "inputs"}``) and
``metrics_by_dim.png`` are written to ``out_dir`` (default: the model folder). An export of ours also
keeps the results (merged with earlier ones) in its own ``eval.json`` and gets its card rewritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from stella_distill.cache import build_target, l2_normalize, open_caches
from stella_distill.card import load_facts
from stella_distill.config import ExperimentConfig, load_config
from stella_distill.data import load_corpus, split_rows
from stella_distill.errors import UserError
from stella_distill.evalsets import BeirSet, names, read_beir, read_sts
from stella_distill.export import write_card
from stella_distill.files import atomic_write
from stella_distill.layout import is_export_root, load, read_layout, set_dim
from stella_distill.logs import get_logger
from stella_distill.plots import DIM_PLOT, plot_metrics_by_dim
from stella_distill.pooling import with_prompt
from stella_distill.run import EVAL_FILE, find_eval
from stella_distill.student import nonfinite_tensors

logger = get_logger(__name__)
FIDELITY_PAIRS_ROWS = 2000  # similarity Spearman uses at most this many rows (n^2 / 2 pairs)


# ---------------------------------------------------------------------------------------------
# Metrics


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


def spearman_cosine(a: np.ndarray, b: np.ndarray, scores) -> float:
    """Spearman x100 of cosine(a_i, b_i) vs ``scores``: what ``EmbeddingSimilarityEvaluator`` reports,
    for vectors already computed (the teachers and the untrained student of ``baseline.json``)."""
    return 100 * _spearman(np.sum(_l2_64(a) * _l2_64(b), axis=1), np.asarray(scores, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# Scoring through sentence-transformers' evaluators


def _finite(emb: np.ndarray, what: str) -> np.ndarray:
    bad = int((~np.isfinite(emb).all(axis=1)).sum())
    if bad:
        raise UserError(
            f"{what}: the model gave NaN/inf vectors for {bad} of {len(emb)} texts; no score reported"
        )
    return emb


def _cut(model, texts) -> list[str]:
    """Texts cut to a length far beyond what the model reads (``pooling.with_prompt``), so that one
    pathological text cannot exhaust memory inside an evaluator."""
    return with_prompt(list(texts), "", model.max_seq_length or None)


def _score(value: float, what: str) -> float:
    """A score x100, or ``UserError``: a NaN/inf score (NaN/inf vectors, or every similarity the same)
    is never reported as a result."""
    if not math.isfinite(value):
        raise UserError(f"{what}: no finite score (NaN/inf vectors, or the same similarity for every pair)")
    return 100 * value


@contextlib.contextmanager
def _default_prompt(model, prompt_name: str | None):
    """``model.encode`` applies ``prompt_name`` while inside (None: the model's own default prompt);
    ``EmbeddingSimilarityEvaluator`` has no prompt option of its own."""
    before = model.default_prompt_name
    if prompt_name is not None:
        model.default_prompt_name = prompt_name
    try:
        yield model
    finally:
        model.default_prompt_name = before


def sts_spearman(
    model,
    pairs,
    batch_size: int = 64,
    prompt_name: str | None = None,
    truncate_dim: int | None = None,
) -> float:
    """Spearman x100 of cosine(sentence 1, sentence 2) vs the gold scores, by ``EmbeddingSimilarityEvaluator``.

    ``pairs`` is a ``read_sts`` file (path) or its ``(sentences 1, sentences 2, scores)``; ``model`` a
    ``SentenceTransformer``; ``prompt_name`` one of its prompts (None: its default prompt, if any).
    """
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    s1, s2, scores = read_sts(pairs) if isinstance(pairs, (str, Path)) else pairs
    evaluator = EmbeddingSimilarityEvaluator(
        _cut(model, s1), _cut(model, s2), [float(x) for x in scores], batch_size=batch_size,
        main_similarity="cosine", write_csv=False, truncate_dim=truncate_dim,
    )  # fmt: skip
    with _default_prompt(model, prompt_name):
        return _score(float(evaluator(model)[evaluator.primary_metric]), "STS")


RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "map@100", "recall@100")


def retrieval_scores(
    model,
    beir: BeirSet,
    batch_size: int = 64,
    query_prompt_name: str | None = None,
    doc_prompt_name: str | None = None,
    truncate_dim: int | None = None,
) -> dict[str, float]:
    """``RETRIEVAL_METRICS`` (x100) of ``model`` on a BEIR set by ``InformationRetrievalEvaluator``
    (exact search by cosine). Prompts left None follow sentence-transformers' ``encode_query`` /
    ``encode_document``: its ``query`` / ``document`` prompt if the model has one, else its default."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    evaluator = InformationRetrievalEvaluator(
        queries=dict(zip(beir.query_ids, _cut(model, beir.query_texts))),
        corpus=dict(zip(beir.doc_ids, _cut(model, beir.doc_texts))),
        relevant_docs={q: {d for d, r in rels.items() if r > 0} for q, rels in beir.qrels.items()},
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[100], map_at_k=[100],
        batch_size=batch_size, write_csv=False, truncate_dim=truncate_dim,
        score_functions={"cosine": cos_sim}, main_score_function="cosine",
        query_prompt_name=query_prompt_name, corpus_prompt_name=doc_prompt_name,
    )  # fmt: skip
    metrics = evaluator(model)
    return {m: _score(float(metrics[f"cosine_{m}"]), "retrieval") for m in RETRIEVAL_METRICS}


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


def _merge(old: dict | None, new: dict) -> dict:
    """``new`` over ``old`` (two evaluations of the same folder): per dim and metric, the newer wins."""
    if not isinstance(old, dict) or not isinstance(old.get("dims"), dict):
        return new
    dims = {d: dict(m) for d, m in old["dims"].items() if isinstance(m, dict)}
    for d, m in new["dims"].items():
        dims.setdefault(d, {}).update(m)
    inputs = dict(old.get("inputs") or {})
    for key, value in new["inputs"].items():
        if isinstance(value, list) and isinstance(inputs.get(key), list):
            inputs[key] = list(dict.fromkeys(inputs[key] + value))
        elif value is not None or key not in inputs:
            inputs[key] = value
    return {**new, "dims": dict(sorted(dims.items(), key=lambda kv: -int(kv[0]))), "inputs": inputs}


def _write_result(out_dir: Path, result: dict, baseline: dict | None) -> Path | None:
    """``eval.json`` and ``metrics_by_dim.png`` into ``out_dir``; the plot's path, if drawn."""
    try:
        atomic_write(out_dir / EVAL_FILE, (json.dumps(result, indent=2) + "\n").encode())
        return plot_metrics_by_dim(result, out_dir / DIM_PLOT, baseline)
    except OSError as exc:
        raise UserError(f"--out: cannot write {exc.filename or out_dir}: {exc.strerror or exc}") from None


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
    the trainer's split). ``*_prompt_name`` pick prompts of the model (None: see ``sts_spearman`` and
    ``retrieval_scores``). Prints a table, writes ``eval.json`` and ``metrics_by_dim.png`` into
    ``out_dir`` (default ``model_dir``) and returns the ``eval.json`` content. An export of ours
    (``stella_distill.json`` with its file list) keeps these results, merged over earlier ones, in its
    own ``eval.json``, and its model card is rewritten to show them (model-index included).
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
    sts_sets = [(name, str(p), read_sts(p)) for name, p in zip(names(sts), sts)]
    beir_sets = [(name, read_beir(p)) for name, p in zip(names(retrieval), retrieval)]
    fidelity = fidelity_inputs(config, cache_dir, rows) if config is not None else None
    if fidelity is not None and fidelity[1].shape[1] != layout.full_dim:
        raise UserError(
            f"{cache_dir or 'cache_dir'}: the teachers' target has {fidelity[1].shape[1]} dims but {model_dir} outputs "
            f"{layout.full_dim}; this cache does not belong to this model"
        )
    if out_dir is None and not is_export_root(model_dir):
        raise UserError(
            f"--out: {model_dir} is not an export of stella-distill, and its files are not ours to change; "
            f"name a folder for eval.json and the plot with --out"
        )
    out_dir = Path(out_dir) if out_dir is not None else model_dir
    try:  # an unwritable --out fails now, not after the scoring
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out: cannot create {exc.filename or out_dir}: {exc.strerror or exc}") from None

    model = load(model_dir, dim=dims[0], device=device)
    bad = nonfinite_tensors(model)  # a model with NaN/inf weights gives no score worth reporting
    if bad:
        raise UserError(
            f"{model_dir}: {len(bad)} weight tensors hold NaN/inf (e.g. {bad[0]}); nothing to evaluate"
        )
    results: dict[int, dict[str, float]] = {}
    for d in dims:
        set_dim(model, model_dir, d, layout)
        truncate = d if layout.mode == "truncate" else None
        metrics: dict[str, float] = {}
        for name, _, pairs in sts_sets:
            metrics[f"sts/{name}"] = sts_spearman(model, pairs, batch_size, sts_prompt_name, truncate)
        for name, beir in beir_sets:
            scores = retrieval_scores(model, beir, batch_size, query_prompt_name, doc_prompt_name, truncate)
            metrics.update({f"retrieval/{name}/{k}": v for k, v in scores.items()})
        if fidelity is not None:
            texts, target, prompt, _ = fidelity
            vectors = model.encode(
                _cut(model, texts), batch_size=batch_size, prompt=prompt, convert_to_numpy=True,
                show_progress_bar=False,
            )  # fmt: skip
            metrics.update(fidelity_metrics(_finite(vectors, "evaluate"), target))
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
    ours = is_export_root(model_dir)
    baseline = load_facts(model_dir).get("baseline") if ours else None
    kept = _merge(find_eval(model_dir), result) if ours else None
    plot = _write_result(out_dir, kept if out_dir == model_dir and ours else result, baseline)
    if any(results.values()):
        logger.info(format_table(results))
    else:
        logger.info("evaluate: nothing to score (give --sts, --retrieval, --cache with --config, or --mteb)")
    logger.info(f"evaluate: wrote {out_dir / EVAL_FILE}" + (f" and {plot}" if plot else ""))
    if ours and any(results.values()):
        if out_dir != model_dir:
            _write_result(model_dir, kept, baseline)
        logger.info(f"evaluate: {write_card(model_dir)} now shows these results (and its model-index)")
    elif not ours:
        logger.info(
            f"evaluate: {model_dir} is not an export of stella-distill; its own files are left as they are"
        )
    return result
