"""`stella-distill run CONFIG`: precompute -> every stage -> export -> evaluate, resuming whatever finished.

Each step checks what is already on disk and skips it when it is complete and matches the config, so a
second `run` after completion only prints the report.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from stella_distill import run
from stella_distill.config import ExperimentConfig, MRLConfig
from stella_distill.distributed import leave_process_group, on_main
from stella_distill.evalsets import names, read_beir, read_sts
from stella_distill.evaluate import evaluate_model, spearman_cosine
from stella_distill.export import export_run, push_export, write_card
from stella_distill.files import atomic_write
from stella_distill.layout import INFO_FILE
from stella_distill.logs import get_logger
from stella_distill.metrics import trackers
from stella_distill.precompute import TeacherEncoder, run_precompute
from stella_distill.student import StudentModel
from stella_distill.train import train

logger = get_logger(__name__)


def baseline_scores(cfg: ExperimentConfig, sts_files: list[str]) -> dict:
    """STS Spearman before training: the cut student's plain pooled vector, each teacher, and the target
    (normalised teacher vectors concatenated), so the card and report show start, end and ceiling.

    Every model encodes the unique sentences of all files once; keys are eval.json's metric names
    (``sts/<name>``), scores what ``EmbeddingSimilarityEvaluator`` reports (``evaluate.spearman_cosine``).
    """
    pairs = {f"sts/{name}": read_sts(path) for name, path in zip(names(sts_files), sts_files)}
    texts = list(dict.fromkeys(t for s1, s2, _ in pairs.values() for t in s1 + s2))
    index = {t: i for i, t in enumerate(texts)}
    models: dict[str, np.ndarray] = {}
    torch.manual_seed(cfg.seed)
    # only the backbone's pooled vector is scored: no projection, no heads
    plain = dataclasses.replace(cfg.student, target_dim=None, mrl=MRLConfig(mode="none", dims=[]))
    student = StudentModel.from_config(plain, target_dim=1, max_length=cfg.data.max_length).eval()
    with torch.no_grad():
        models["student_start"] = np.concatenate(
            [student.embed(**student.tokenize(texts[i : i + 64])).numpy() for i in range(0, len(texts), 64)]
        )
    normalised = []
    for i, teacher in enumerate(cfg.teachers):
        enc = TeacherEncoder(teacher, max_length=cfg.teacher_max_length(teacher), field=f"teachers.{i}")
        models[f"teacher:{teacher.name}"] = v = enc.encode(texts)
        normalised.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    models["target"] = np.concatenate(normalised, axis=1)
    return {
        metric: {
            name: spearman_cosine(v[[index[t] for t in s1]], v[[index[t] for t in s2]], scores)
            for name, v in models.items()
        }
        for metric, (s1, s2, scores) in pairs.items()
    }


def run_all(cfg: ExperimentConfig) -> dict:
    """Run or resume the whole pipeline and print the report; returns the evaluation results.

    Each step is skipped when what it makes is there and was made from exactly what the config asks
    for now (fingerprints of the inputs and config sections, recorded in the outputs): a changed
    ``export.*`` re-exports, a changed ``evaluate.*`` or input file re-evaluates.
    """
    t0 = time.perf_counter()
    # what would stop the run after hours of precompute and training stops it now
    trackers(cfg)
    for path in cfg.evaluate.sts:
        read_sts(path)
    for path in cfg.evaluate.retrieval:
        read_beir(path)
    run_dir = Path(cfg.output_dir)
    state = PartialState(cpu=not torch.cuda.is_available())
    taken = on_main(state, lambda: run.hold_lock(run_dir, "run"))
    try:
        return _run_all(cfg, run_dir, state, t0)
    finally:
        if taken:
            run.release_lock(run_dir)


def _run_all(cfg: ExperimentConfig, run_dir: Path, state, t0: float) -> dict:
    timings = {}
    t = time.perf_counter()
    run_precompute(cfg)
    timings["precompute_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if run.training_complete(cfg, run_dir):
        logger.info(f"run: training already complete ({run_dir / run.FINAL})")
    else:
        train(cfg)
    timings["train_s"] = time.perf_counter() - t
    # under `accelerate launch`: export and evaluation run once, on the main process, which needs no
    # group for them; leave it together now rather than make the others wait at exit
    leave_process_group()
    if not state.is_main_process:
        return {}

    sts = list(cfg.evaluate.sts)
    baseline_file = run_dir / run.BASELINE_FILE
    baseline_fp = run.baseline_fingerprint(cfg)
    if cfg.evaluate.baseline and sts and run.made_from(baseline_file) != baseline_fp:
        t = time.perf_counter()
        scores = {"made_from": baseline_fp, **baseline_scores(cfg, sts)}
        with run.writing(baseline_file):
            atomic_write(baseline_file, json.dumps(scores, indent=2).encode())
        timings["baseline_s"] = time.perf_counter() - t

    export_dir = Path(cfg.export.out_dir or run_dir / run.EXPORT)
    eval_file = run_dir / run.EVAL_FILE
    export_fp = run.export_fingerprint(cfg, run_dir)
    eval_fp = run.eval_fingerprint(cfg, export_fp)
    export_fresh = run.made_from(export_dir / INFO_FILE) == export_fp
    if export_fresh and run.made_from(eval_file) == eval_fp:
        logger.info(f"run: export and evaluation already complete and current ({export_dir})")
        results = json.loads(eval_file.read_text())
    else:
        t = time.perf_counter()
        if not export_fresh:
            export_run(
                run_dir, export_dir, dim=cfg.export.default_dim, push=False, made_from=export_fp, config=cfg
            )
        timings["export_s"] = time.perf_counter() - t
        t = time.perf_counter()
        results = evaluate_model(
            export_dir, sts=sts, retrieval=list(cfg.evaluate.retrieval), batch_size=cfg.evaluate.batch_size,
            out_dir=run_dir, sts_prompt_name=cfg.evaluate.sts_prompt_name,
            query_prompt_name=cfg.evaluate.query_prompt_name, doc_prompt_name=cfg.evaluate.doc_prompt_name,
            made_from=eval_fp,
        )  # fmt: skip
        timings["evaluate_s"] = time.perf_counter() - t
        # evaluate put its results into the card; the run's facts are collected again too, since the
        # baseline may be newer than a fresh export. Then the folder goes up as it is now.
        write_card(export_dir, cfg=cfg, run_dir=run_dir, repo_id=cfg.export.push_to_hub)
        if cfg.export.push_to_hub:
            push_export(export_dir, cfg.export.push_to_hub, private=cfg.export.private,
                        commit_message=f"stella-distill run {cfg.name}", what="export.push_to_hub")  # fmt: skip
        timings["total_s"] = time.perf_counter() - t0
        (run_dir / run.TIMINGS_FILE).write_text(json.dumps(timings, indent=2))
    print_report(run_dir)
    return results


def print_report(run_dir: Path) -> None:
    """One table: STS per dim after training, against the start and the teachers."""
    eval_file, base_file = run_dir / run.EVAL_FILE, run_dir / run.BASELINE_FILE
    if not eval_file.is_file():
        return
    results = json.loads(eval_file.read_text())
    baseline = json.loads(base_file.read_text()) if base_file.is_file() else {}
    logger.info(f"\nreport for {run_dir}")
    for dim, metrics in sorted(results.get("dims", {}).items(), key=lambda kv: -int(kv[0])):
        cells = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        logger.info(f"  dim {dim}: {cells}")
    for name, scores in baseline.items():
        if not isinstance(scores, dict):
            continue  # made_from
        cells = ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
        logger.info(f"  before training, {name}: {cells}")
    timings = run_dir / run.TIMINGS_FILE
    if timings.is_file():
        t = json.loads(timings.read_text())
        logger.info("  wall time: " + ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in t.items()))
