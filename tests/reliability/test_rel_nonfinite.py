"""Non-finite teacher output: reported by row, stored as zeros, listed invalid, never trained on.

The poisoned teacher is a real model folder: a copy of the tiny BERT whose word-embedding rows for
"queen" and "moon" are NaN and +inf, so every text holding one of those words comes out NaN (attention
spreads it over the text) while the texts beside it in the same batch stay finite.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rel_harness import assert_user_error, corpus_lines, experiment, write_config, write_lines

POISONED = {5: "queen", 40: "moon", 77: "queen"}


@pytest.fixture(scope="module")
def poisoned_run(rel_models, zygote, tmp_path_factory):
    """A clean teacher and a poisoned one over 96 texts, precomputed and trained (3 stages)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("nonfinite")
    bad = root / "bad-teacher"
    shutil.copytree(rel_models["teacher"], bad)
    weights = load_file(str(bad / "model.safetensors"))
    vocab = AutoTokenizer.from_pretrained(str(bad)).get_vocab()
    table = weights["embeddings.word_embeddings.weight"]
    table[vocab["queen"]] = float("nan")
    table[vocab["moon"]] = float("inf")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})

    lines = corpus_lines(96, seed=11, exclude=tuple(set(POISONED.values())))
    for row, word in POISONED.items():
        lines[row] = f"{lines[row]} {word}"
    corpus = write_lines(root / "corpus.txt", lines)
    cfg = experiment(root, rel_models, corpus)
    cfg["teachers"].append({"name": "bad", "model": str(bad), "pooling": "cls", "shard_size": 16})
    path = write_config(root / "cfg.yaml", cfg)
    pre = zygote.run("precompute", path)
    assert pre.rc == 0, str(pre)
    train = zygote.run("train", path)
    assert train.rc == 0, str(train)
    return cfg, pre, train


def test_precompute_reports_the_rows_and_lists_them_invalid(poisoned_run):
    from stella_distill.cache import TeacherCache

    cfg, pre, _ = poisoned_run
    assert "cache/bad: 3 rows gave NaN/inf vectors (rows 5, 40, 77); stored as zeros" in pre.err, pre.err
    assert "teacher t1: 96 rows, dim 32" in pre.out and "0 invalid" in pre.out
    bad = TeacherCache(Path(cfg["cache_dir"]) / "bad")
    assert bad.manifest["invalid_rows"] == sorted(POISONED)
    vectors = np.asarray(bad.vectors, dtype=np.float32)
    assert np.isfinite(vectors).all() and not vectors[sorted(POISONED)].any()
    assert (np.linalg.norm(np.delete(vectors, sorted(POISONED), axis=0), axis=1) > 0.99).all()
    clean = TeacherCache(Path(cfg["cache_dir"]) / "t1")
    assert clean.valid_mask.all()  # the same texts are fine for the other teacher


def test_training_never_sees_the_invalid_rows(poisoned_run):
    from stella_distill.cache import TeacherCache
    from stella_distill.data import batch_order, split_rows

    cfg, _, train = poisoned_run
    assert "train: 85 training rows, 8 held out" in train.out, train.out  # 96 - 3 invalid - 8 held out
    rows = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert len(losses) == 9 and all(
        np.isfinite(v) for r in losses for k, v in r.items() if k.startswith("loss")
    )
    evals = [r["eval/cosine"] for r in rows if "eval/cosine" in r]
    assert len(evals) == 3 and np.isfinite(evals).all()
    # The rows the trainer draws from: its own split over the caches' valid rows, and every batch of it.
    caches = [TeacherCache(Path(cfg["cache_dir"]) / t["name"]) for t in cfg["teachers"]]
    valid = np.logical_and.reduce([c.valid_mask for c in caches])
    train_rows, eval_rows = split_rows(valid, 0.0, cfg["data"]["eval_limit"], cfg["seed"])
    assert len(train_rows) == 85 and len(eval_rows) == 8
    assert not set(POISONED) & (set(train_rows.tolist()) | set(eval_rows.tolist()))
    lengths = np.ones(96, dtype=np.int64)
    for seed in range(3):
        for batch in batch_order(train_rows, lengths, 8, seed, group_by_length=True):
            assert not set(POISONED) & set(batch.tolist())


@pytest.fixture(scope="module")
def all_nan(poisoned_run, zygote, tmp_path_factory):
    """Every text holds a poisoned word: the bad teacher gives no valid row at all."""
    cfg, _, _ = poisoned_run
    cfg = copy.deepcopy(cfg)
    tmp = tmp_path_factory.mktemp("all-nan")
    lines = [f"{line} queen" for line in corpus_lines(40, seed=12, exclude=("queen", "moon"))]
    cfg["data"]["train"] = [{"path": str(write_lines(tmp / "corpus.txt", lines))}]
    cfg["cache_dir"], cfg["output_dir"] = str(tmp / "cache"), str(tmp / "run")
    path = write_config(tmp / "cfg.yaml", cfg)
    return path, zygote.run("precompute", path)


def test_a_teacher_that_is_nan_everywhere_is_reported(all_nan):
    _, pre = all_nan
    assert pre.rc == 0 and "cache/bad: 40 rows gave NaN/inf vectors (rows 0, 1, 2, 3, 4, ...)" in pre.err, (
        str(pre)
    )


def test_a_teacher_that_is_nan_everywhere_stops_before_training(all_nan, zygote):
    path, _ = all_nan
    res = zygote.run("train", path)
    assert_user_error(res, "no valid training rows", "invalid_rows")
