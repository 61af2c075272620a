"""Shared fixtures: tiny random models saved once per session, loaded by path like real ones."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import TEXTS, make_tiny_bert, make_tiny_qwen2  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with a WordPiece tokenizer."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=2, hidden=32, seed=0)


@pytest.fixture(scope="session")
def tiny_bert4(tmp_path_factory) -> Path:
    """A 4-layer, 48-wide random BERT (a second teacher / prunable student)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert4"), layers=4, hidden=48, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A 2-layer random Qwen2 decoder with a left-padding tokenizer."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), layers=2, hidden=32, seed=2)


@pytest.fixture
def texts() -> list[str]:
    """Twenty short texts over the tiny vocabulary."""
    return list(TEXTS)
