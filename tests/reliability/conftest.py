"""Fixtures of the reliability suite: one fork server for every CLI run, tiny models, a tiny corpus.

The suite drives the real CLI many times (kill -9 and resume, bad inputs, full disks); a fork server
(rel_zygote.py) that has imported torch/transformers/accelerate once makes each run cost a fraction
of a second instead of 5-8 s of imports. Runs that must start from a bare interpreter (the security
scan, a sample of the bad-input cases) use ``python -m stella_distill`` directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from rel_harness import Zygote, base_env, corpus_lines, experiment, write_config, write_lines  # noqa: E402


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    """The fork server (one per session); every run it forks has the sentinel HF_TOKEN set."""
    z = Zygote(base_env(), tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.fixture(scope="session")
def rel_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT teacher (32-d output) and a tiny BERT student, both without dropout."""
    from tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("rel-models")
    return {
        "teacher": make_tiny_bert(root / "teacher", layers=2, hidden=32, seed=21, dropout=0.0),
        "student": make_tiny_bert(root / "student", layers=2, hidden=32, seed=23, dropout=0.0),
    }


@pytest.fixture(scope="session")
def rel_corpus(tmp_path_factory) -> Path:
    """96 distinct short texts, one a line."""
    return write_lines(tmp_path_factory.mktemp("rel-corpus") / "corpus.txt", corpus_lines(96, seed=1))


@pytest.fixture(scope="session")
def pre_reference(tmp_path_factory, rel_models, zygote) -> tuple[Path, Path]:
    """(corpus of 120 texts, its uninterrupted cache folder: 30 shards of 4 rows)."""
    root = tmp_path_factory.mktemp("pre-reference")
    corpus = write_lines(root / "corpus.txt", corpus_lines(120, seed=7))
    cfg = experiment(root, rel_models, corpus)
    res = zygote.run("precompute", write_config(root / "cfg.yaml", cfg))
    assert res.rc == 0, str(res)
    return corpus, Path(cfg["cache_dir"]) / "t1"


@pytest.fixture(scope="session")
def train_reference(tmp_path_factory, rel_models, rel_corpus, zygote) -> tuple[dict, Path]:
    """(the tiny 3-stage experiment with its cache built, the uninterrupted run folder)."""
    root = tmp_path_factory.mktemp("train-reference")
    cfg = experiment(root, rel_models, rel_corpus, output_dir=str(root / "ref"))
    path = write_config(root / "ref.yaml", cfg)
    assert (res := zygote.run("precompute", path)).rc == 0, str(res)
    assert (res := zygote.run("train", path)).rc == 0, str(res)
    return cfg, root / "ref"
