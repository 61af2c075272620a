"""A sentence-transformers teacher configures itself from its own folder (modules.json and friends).

- The real all-MiniLM-L6-v2 by its Hub id (local HF cache, offline): pooling, prompt and Dense are
  taken from its files; its cached vectors equal `SentenceTransformer(id).encode`; a cache built with
  the settings written out by hand is the same cache (same recorded identity, nothing re-encoded).
- Folders written here by sentence-transformers itself: CLS pooling + a Dense head + Normalize with a
  default prompt, and mean pooling + two chained Dense heads. Each teacher's cached vectors equal what
  `SentenceTransformer(folder).encode` gives, and the cache records the resolved settings.
- An explicit field wins over the folder with one warning line naming it, before precompute; a
  pooling mode stella-distill does not compute is one error line naming `teachers.N.pooling`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import precompute_config
from tiny import TEXTS, make_tiny_bert

from stella_distill.cache import TeacherCache
from stella_distill.config import from_dict
from stella_distill.model_files import read_model_files

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
PASSAGE = "the king and the queen of the city by the river: "
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _st_folder(root: Path, backbone: Path, kind: str) -> Path:
    """A sentence-transformers folder over ``backbone``, saved by sentence-transformers."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    from stella_distill.pooling import dense_class

    Dense = dense_class()
    torch.manual_seed(5)
    if kind == "cls_dense_normalize":
        modules = [
            Transformer(str(backbone)),
            Pooling(32, "cls"),
            Dense(32, 12, activation_function=torch.nn.Tanh()),
        ]
        modules.append(Normalize())
        prompts = {"query": "find: ", "passage": PASSAGE}
        model = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name="passage")
    else:  # mean pooling, two Dense heads, no Normalize, no prompts
        modules = [Transformer(str(backbone)), Pooling(32, "mean"), Dense(32, 16), Dense(16, 8)]
        model = SentenceTransformer(modules=modules)
    folder = root / kind
    model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("st-folders")
    backbone = make_tiny_bert(root / "backbone", layers=2, hidden=32, seed=31, dropout=0.0)
    return {kind: _st_folder(root, backbone, kind) for kind in ("cls_dense_normalize", "mean_two_dense")}


def _encode_with_st(folder: str, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    vectors = SentenceTransformer(folder, device="cpu").encode(texts, convert_to_numpy=True)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _precompute(cfg: dict) -> TeacherCache:
    from stella_distill.precompute import run_precompute

    (folder,) = run_precompute(from_dict(cfg))
    return TeacherCache(folder)


def test_the_folders_say_what_sentence_transformers_saved(folders):
    cls = read_model_files(str(folders["cls_dense_normalize"]), None, "teachers.0.model")
    assert (cls.pooling, cls.dense, cls.normalize, cls.default_prompt) == ("cls", ["2_Dense"], True, PASSAGE)
    two = read_model_files(str(folders["mean_two_dense"]), None, "teachers.0.model")
    assert (two.pooling, two.dense, two.normalize, two.default_prompt) == (
        "mean",
        ["2_Dense", "3_Dense"],
        False,
        "",
    )


@pytest.mark.parametrize("kind", ["cls_dense_normalize", "mean_two_dense"])
def test_a_teacher_folder_configures_itself_and_matches_sentence_transformers(tmp_path, folders, kind):
    folder = str(folders[kind])
    cfg = precompute_config(tmp_path, [{"name": "st", "model": folder}], list(TEXTS))
    teacher = from_dict(cfg).teachers[0]
    if kind == "cls_dense_normalize":
        assert (teacher.pooling, teacher.dense, teacher.prompt) == ("cls", "2_Dense", PASSAGE)
    else:
        assert (teacher.pooling, teacher.dense, teacher.prompt) == ("mean", ["2_Dense", "3_Dense"], "")
    cache = _precompute(cfg)
    expected = _encode_with_st(folder, list(TEXTS))
    got = np.asarray(cache.vectors, dtype=np.float32)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 5e-4  # the cache stores float16
    assert cache.manifest["pooling"] == teacher.pooling and cache.manifest["prompt"] == teacher.prompt
    assert cache.manifest["dense"].startswith("2_Dense (sha256:")
    assert cache.manifest["dense"].count("sha256:") == (1 if kind == "cls_dense_normalize" else 2)


def test_explicit_fields_win_with_one_warning_line_before_precompute(tmp_path, folders):
    folder = str(folders["cls_dense_normalize"])
    teacher = {"name": "st", "model": folder, "pooling": "mean", "prompt": "", "dense": []}
    cfg = precompute_config(tmp_path, [teacher], list(TEXTS))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "stella_distill", "precompute", str(path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: teachers.0.pooling: 'mean' overrides {folder}'s own pooling 'cls' (modules.json); "
        "remove the line to follow the model",
        f"warning: teachers.0.dense: none overrides {folder}'s own Dense modules ['2_Dense'] (modules.json); "
        "remove the line to follow the model",
        f"warning: teachers.0.prompt: '' overrides {folder}'s default prompt 'passage' "
        "(config_sentence_transformers.json); remove the line to follow the model",
    ]
    manifest = json.loads((tmp_path / "cache" / "st" / "manifest.json").read_text())
    assert (manifest["pooling"], manifest["dense"], manifest["prompt"], manifest["dim"]) == (
        "mean",
        None,
        "",
        32,
    )


def test_a_pooling_mode_we_do_not_compute_is_one_error_line(tmp_path, folders):
    folder = tmp_path / "max-pooled"
    (folder / "1_Pooling").mkdir(parents=True)
    for name in ("config.json", "modules.json"):
        (folder / name).write_text((folders["mean_two_dense"] / name).read_text())
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 32, "pooling_mode": "max"})
    )
    cfg = precompute_config(tmp_path, [{"name": "st", "model": str(folder)}], list(TEXTS))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "stella_distill", "check", str(path)], env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (
        f"stella-distill check: error: teachers.0.pooling: {folder} pools with 'max' (modules.json), which "
        "stella-distill does not compute; set teachers.0.pooling to cls, mean or last_token to use one of those instead"
    )
    cfg["teachers"][0]["pooling"] = "mean"  # set by hand: allowed, with a warning
    assert from_dict(cfg).teachers[0].pooling == "mean"


@pytest.fixture(scope="module")
def minilm_in_cache():
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(MINILM, "modules.json"), str):
        pytest.skip(
            f"{MINILM} is not in the local Hugging Face cache (scripts/setup_offline_models.py puts it there)"
        )
    return MINILM


def test_real_minilm_by_hub_id_configures_itself_and_reuses_a_hand_configured_cache(
    tmp_path, minilm_in_cache
):
    texts = list(TEXTS)[:12]
    by_hand = {"name": "minilm", "model": MINILM, "pooling": "mean", "prompt": "", "normalize": True}
    cache = _precompute(precompute_config(tmp_path, [by_hand], texts))
    expected = _encode_with_st(MINILM, texts)
    assert np.abs(np.asarray(cache.vectors, dtype=np.float32) - expected).max() < 5e-4
    built = json.loads((cache.path / "manifest.json").read_text())

    from_folder = precompute_config(tmp_path, [{"name": "minilm", "model": MINILM}], texts)
    teacher = from_dict(from_folder).teachers[0]
    assert (teacher.pooling, teacher.dense, teacher.prompt, teacher.normalize) == ("mean", None, "", True)
    again = _precompute(from_folder)  # the same identity: nothing to encode
    assert json.loads((again.path / "manifest.json").read_text()) == built


def test_a_hub_teacher_whose_modules_json_is_not_cached_is_named_in_a_warning(tmp_path, folders):
    """Offline, with only config.json in the Hub cache: the fallback is said, with the fields to set."""
    snapshot = tmp_path / "hub" / "models--org--teacher" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((folders["mean_two_dense"] / "config.json").read_text())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    cfg = precompute_config(tmp_path, [{"name": "t", "model": "org/teacher", "pooling": "cls"}], ["a"])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run(
        [sys.executable, "-m", "stella_distill", "check", str(path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "warning: teachers.0.model: cannot read org/teacher's modules.json here (offline and not in the local "
        "Hub cache): teachers.0.dense falls back to none, teachers.0.prompt falls back to none; set them to be sure"
    ]
    teacher = yaml.safe_load(done.stdout)["teachers"][0]
    assert (teacher["pooling"], teacher["dense"], teacher["prompt"]) == ("cls", None, "")
