"""The bad-input catalogue: every case exits 2 with one line that names the file and line or the field.

Config-only cases run the literal ``python -m stella_distill check`` (no torch import: ~0.2 s each).
Cases that need models, data, a cache or a checkpoint run ``precompute`` / ``train`` in the fork
server (the same ``cli.main`` in a fresh forked process); two of them also run through
``python -m stella_distill`` to pin that both entry points answer alike. docs/reliability.md lists
every case with its message.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rel_harness import (
    assert_user_error,
    corpus_lines,
    experiment,
    python_m,
    write_config,
    write_lines,
)

# ---------------------------------------------------------------------------------------------
# Config-only cases: `stella-distill check CONFIG [overrides]`


@dataclass
class Case:
    """One bad input: how to make it and the substrings its one error line must hold."""

    id: str
    needles: list[str]
    edit: Any = None  # function(cfg dict) -> None
    text: str | None = None  # raw config file text instead of an edited dict
    raw: bytes | None = None  # raw config bytes
    overrides: list[str] = field(default_factory=list)


def put(key: str, value: Any):
    """An edit that sets the dotted ``key`` (creating it: unknown keys are made this way)."""

    def edit(cfg: dict) -> None:
        *parts, last = key.split(".")
        node = cfg
        for part in parts:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def drop(key: str):
    def edit(cfg: dict) -> None:
        *parts, last = key.split(".")
        node = cfg
        for part in parts:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return edit


def known(cls_keys: str) -> str:
    return f"unknown key (known keys: {cls_keys}"


CONFIG_CASES = [
    # YAML syntax
    Case("yaml-unclosed-flow", ["{cfg}:6:1: YAML syntax error"], text="name: x\noutput_dir: o\ncache_dir: c\nteachers: [{name: t, model: m}\n\nstages: []\n"),
    Case("yaml-bad-indent", ["{cfg}:2:13: YAML syntax error: mapping values are not allowed here"], text="name: x\n  output_dir: o\n"),
    Case("yaml-tab", ["{cfg}:2:1: YAML syntax error: found character '\\t' that cannot start any token"], text="name: x\n\toutput_dir: o\n"),
    Case("yaml-top-level-list", ["{cfg}: the top level must be a mapping of fields; got list"], text="- name: x\n"),
    Case("config-not-utf8", ["{cfg}: not UTF-8 text"], raw=b"name: caf\xe9\n"),
    Case("config-missing", ["{cfg}.missing: config file not found"]),
    # unknown keys at every level
    Case("unknown-top", ["nmae: " + known("name, output_dir, cache_dir, seed")], put("nmae", "x")),
    Case("unknown-data", ["data.shuffle: " + known("train, limit, max_length")], put("data.shuffle", True)),
    Case("unknown-data-source", ["data.train.0.textfield: " + known("path, text_field")], put("data.train.0.textfield", "t")),
    Case("unknown-teacher", ["teachers.0.pool: " + known("name, model, revision, pooling")], put("teachers.0.pool", "cls")),
    Case("unknown-student", ["student.layers: " + known("model, revision, pooling, keep_layers")], put("student.layers", [0])),
    Case("unknown-student-mrl", ["student.mrl.dim: " + known("mode, dims")], put("student.mrl.dim", 16)),
    Case("unknown-stage", ["stages.0.learning_rate: " + known("name, trainable")], put("stages.0.learning_rate", 1e-4)),
    Case("unknown-loss-weight", ["stages.0.loss_weights.cos: " + known("cosine, similarity, relative_similarity")], put("stages.0.loss_weights", {"cos": 1.0})),
    Case("unknown-train", ["train.save_every: " + known("checkpoint_every")], put("train.save_every", 5)),
    Case("unknown-export", ["export.dims: " + known("out_dir, default_dim")], put("export.dims", [16])),
    Case("unknown-wandb", ["logging.wandb.key: " + known("mode, project, entity")], put("logging.wandb.key", "k")),
    Case("unknown-evaluate", ["evaluate.stsb: " + known("sts, retrieval")], put("evaluate.stsb", ["x"])),
    # wrong types and values
    Case("steps-not-int", ["stages.0.steps: expected an integer; got 'ten'"], put("stages.0.steps", "ten")),
    Case("max-length-float", ["data.max_length: expected an integer; got 12.5"], put("data.max_length", 12.5)),
    Case("teachers-not-list", ["teachers: expected a list; got"], put("teachers", {"name": "t1", "model": "m"})),
    Case("normalize-not-bool", ["teachers.0.normalize: expected true or false; got 1"], put("teachers.0.normalize", 1)),
    Case("trust-remote-code-string", ["student.trust_remote_code: expected true or false; got 'yes please'"], put("student.trust_remote_code", "yes please")),
    Case("pooling-enum", ["teachers.0.pooling: expected one of cls, mean, last_token; got 'max'"], put("teachers.0.pooling", "max")),
    Case("lr-not-number", ["stages.1.lr: expected a number; got 'fast'"], put("stages.1.lr", "fast")),
    Case("missing-required", ["teachers.0.model: required field is missing"], drop("teachers.0.model")),
    Case("no-teachers", ["teachers: at least one teacher is required"], put("teachers", [])),
    Case("duplicate-teacher", ["teachers.1.name: duplicate teacher name 't1' (also teachers.0)"], lambda c: c["teachers"].append(dict(c["teachers"][0]))),
    # zero or negative
    Case("zero-steps", ["stages.0.steps: must be > 0; got 0"], put("stages.0.steps", 0)),
    Case("negative-lr", ["stages.1.lr: must be > 0; got -0.0001"], put("stages.1.lr", -1e-4)),
    Case("zero-batch", ["stages.2.batch_size: must be > 0; got 0"], put("stages.2.batch_size", 0)),
    Case("negative-accumulation", ["stages.0.grad_accumulation: must be > 0; got -1"], put("stages.0.grad_accumulation", -1)),
    Case("zero-max-length", ["data.max_length: must be > 0; got 0"], put("data.max_length", 0)),
    Case("negative-checkpoint-every", ["train.checkpoint_every: must be >= 0; got -5"], put("train.checkpoint_every", -5)),
    Case("eval-fraction-one", ["data.eval_fraction: must be in [0, 1); got 1.0"], put("data.eval_fraction", 1.0)),
    # Matryoshka dims and layers
    Case("mrl-dim-above-target", ["student.mrl.dims: dim 64 is larger than student.target_dim 32"], lambda c: c["student"].update(target_dim=32, mrl={"mode": "heads", "dims": [64, 16]})),
    Case("mrl-unsorted", ["student.mrl.dims: must be sorted (increasing or decreasing); got [8, 16, 12]"], put("student.mrl.dims", [8, 16, 12])),
    Case("mrl-duplicated", ["student.mrl.dims: duplicated dim in [16, 16]"], put("student.mrl.dims", [16, 16])),
    Case("mrl-zero", ["student.mrl.dims.1: must be > 0; got 0"], put("student.mrl.dims", [16, 0])),
    Case("keep-layers-unsorted", ["student.keep_layers: must be increasing; got [1, 0]"], put("student.keep_layers", [1, 0])),
    Case("keep-layers-negative", ["student.keep_layers: layer indices must be >= 0; got [-1]"], put("student.keep_layers", [-1])),
    Case("stage-mrl-without-dims", ["stages.2.mrl: stage trains reduced dims but student.mrl.dims is empty"], put("student.mrl", {"mode": "none", "dims": []})),
    # command-line overrides
    Case("override-no-such-element", ["stages.7: no such list element (list has 3 items)"], overrides=["stages.7.lr=1"]),
    Case("override-without-equals", ["stages.0.lr: an override must look like key.path=value"], overrides=["stages.0.lr"]),
    Case("override-unknown-key", ["stages.0.lrr: " + known("name, trainable")], overrides=["stages.0.lrr=1"]),
    Case("override-wrong-type", ["data.limit: expected an integer; got 'all'"], overrides=["data.limit=all"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def base_cfg(rel_models, rel_corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad-input")
    return experiment(root, rel_models, rel_corpus)


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c.id)
def test_config_case(case: Case, base_cfg, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    if case.raw is not None:
        cfg_path.write_bytes(case.raw)
    elif case.text is not None:
        cfg_path.write_text(case.text)
    else:
        cfg = copy.deepcopy(base_cfg)
        if case.edit:
            case.edit(cfg)
        write_config(cfg_path, cfg)
    target = cfg_path if case.id != "config-missing" else Path(f"{cfg_path}.missing")
    res = python_m("check", target, *case.overrides)
    assert_user_error(res, *(n.replace("{cfg}", str(cfg_path)) for n in case.needles))


def test_valid_base_config_passes_check(base_cfg, tmp_path):
    res = python_m("check", write_config(tmp_path / "cfg.yaml", base_cfg))
    assert res.rc == 0 and "trust_remote_code: false" in res.out, str(res)


# ---------------------------------------------------------------------------------------------
# Data and model cases: `precompute` / `train` in the fork server


def _corpus(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


DATA_CASES = {
    # id: (file name, bytes, needles with {corpus})
    "corpus-missing": (None, None, ["data.train.0.path: {corpus}: file not found"]),
    "corpus-empty": ("empty.txt", b"", ["data.train: the corpus is empty after reading 0 rows"]),
    "corpus-whitespace-only": ("blank.txt", b"\n  \n\t\n", ["data.train: the corpus is empty after reading 3 rows (3 empty or whitespace-only, 0 non-string)"]),
    "corpus-not-utf8": ("latin1.txt", b"the cat\nthe dog\ncaf\xe9 au lait\n", ["{corpus}:3: not UTF-8 text"]),
    "jsonl-not-object": ("rows.jsonl", b'{"text": "a dog"}\n["a", "list"]\n', ["{corpus}:2: expected a JSON object with field 'text'; got a list"]),
    "jsonl-invalid": ("rows.jsonl", b'{"text": "a dog"}\n{"text": "a cat"}\n{"text": "oops\n', ["{corpus}:3: invalid JSON (Invalid control character at column 15)"]),
    "jsonl-missing-field": ("rows.jsonl", b'{"text": "a dog"}\n{"body": "a cat"}\n', ["{corpus}:2: no field 'text' (data.train.0.text_field)"]),
    "csv-missing-column": ("rows.csv", b"id,body\n1,a dog\n", ["{corpus}:1: no column 'text' (data.train.0.text_field)"]),
    "corpus-unsupported-type": ("rows.xlsx", b"PK\x03\x04", ["data.train.0.path: {corpus}: unsupported file type '.xlsx'"]),
    "hub-dataset-offline": ("@hub", b"", ["data.train.0.path: 'no-such-org/no-such-dataset'"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_case(case, base_cfg, zygote, tmp_path):
    name, data, needles = DATA_CASES[case]
    if name is None:
        corpus = tmp_path / "missing.txt"
    elif name == "@hub":
        corpus = "no-such-org/no-such-dataset"
    else:
        corpus = _corpus(tmp_path, name, data)
    cfg = copy.deepcopy(base_cfg)
    cfg["data"]["train"] = [{"path": str(corpus)}]
    cfg["cache_dir"] = str(tmp_path / "cache")
    res = zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg))
    assert_user_error(res, *(n.replace("{corpus}", str(corpus)) for n in needles))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_corpus_errors_read_the_same_through_python_m(base_cfg, tmp_path):
    corpus = _corpus(tmp_path, "rows.jsonl", b'{"text": "a dog"}\n["a", "list"]\n')
    cfg = {
        **copy.deepcopy(base_cfg),
        "data": {"train": [{"path": str(corpus)}], "max_length": 32},
        "cache_dir": str(tmp_path / "c"),
    }
    res = python_m("precompute", write_config(tmp_path / "cfg.yaml", cfg))
    assert_user_error(res, f"{corpus}:2: expected a JSON object with field 'text'; got a list")


def test_teacher_that_does_not_exist_offline(base_cfg, zygote, tmp_path):
    offline = "(HF_HUB_OFFLINE is set: only local folders and the local Hub cache are used)"
    for model, needles in [
        ("no-such-org/no-such-model", ["teachers.0.model: cannot load 'no-such-org/no-such-model'", offline]),
        (
            str(tmp_path / "no-such-folder"),
            [f"teachers.0.model: {tmp_path / 'no-such-folder'}: no such model folder"],
        ),
    ]:
        cfg = copy.deepcopy(base_cfg)
        cfg["teachers"][0]["model"] = model
        cfg["cache_dir"] = str(tmp_path / "cache")
        res = zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg))
        line = assert_user_error(res, *needles)
        assert len(line) < 600, line


def test_long_and_duplicated_texts_are_counted(base_cfg, zygote, tmp_path):
    """Texts beyond max length are truncated and counted; duplicates are kept unless data.dedupe."""
    lines = corpus_lines(40, seed=3)
    long_text = " ".join(["the king and the queen of the sea"] * 40)  # ~280 tokens > 32
    lines = lines[:10] + [long_text, long_text + " again", long_text + " and again"] + lines[10:] + lines[:4]
    corpus = write_lines(tmp_path / "corpus.txt", lines)
    cfg = copy.deepcopy(base_cfg)
    cfg["data"]["train"] = [{"path": str(corpus)}]
    cfg["cache_dir"] = str(tmp_path / "cache")
    res = zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg))
    assert res.rc == 0, str(res)
    assert "corpus: 47 texts" in res.out and "dropped 0 duplicates" in res.out, res.out
    assert (
        "teachers.0.max_length: 3 of the 47 texts encoded now are longer than 32 tokens and were truncated"
        in res.out
    ), res.out
    assert "3 truncated at 32 tokens" in res.out
    cfg["data"]["dedupe"] = True
    cfg["cache_dir"] = str(tmp_path / "cache-dedupe")
    res = zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg))
    assert res.rc == 0 and "corpus: 43 texts" in res.out and "dropped 4 duplicates" in res.out, str(res)


# ---------------------------------------------------------------------------------------------
# Cases against a built cache and a trained run (copies of the session's reference run)


@pytest.fixture
def built(train_reference, tmp_path) -> tuple[dict, Path]:
    """A private copy of the reference experiment: its cache and its run folder (with checkpoints)."""
    cfg, ref = train_reference
    cfg = copy.deepcopy(cfg)
    shutil.copytree(cfg["cache_dir"], tmp_path / "cache")
    shutil.copytree(ref, tmp_path / "run", ignore=shutil.ignore_patterns("final"))
    cfg["cache_dir"], cfg["output_dir"] = str(tmp_path / "cache"), str(tmp_path / "run")
    return cfg, tmp_path


def _train(zygote, cfg: dict, tmp: Path, verb: str = "train"):
    return zygote.run(verb, write_config(tmp / "case.yaml", cfg))


def test_keep_layers_out_of_range(built, zygote):
    cfg, tmp = built
    cfg["student"]["keep_layers"] = [0, 5]
    cfg["train"]["resume"] = None
    assert_user_error(
        _train(zygote, cfg, tmp), "student.keep_layers: layer 5 out of range (the model has 2 layers)"
    )
    res = python_m("train", tmp / "case.yaml")  # the literal entry point answers the same
    assert_user_error(res, "student.keep_layers: layer 5 out of range (the model has 2 layers)")


def test_student_that_does_not_exist(built, zygote):
    cfg, tmp = built
    cfg["student"]["model"] = str(tmp / "no-such-student")
    cfg["train"]["resume"] = None
    assert_user_error(
        _train(zygote, cfg, tmp), f"student.model: {tmp / 'no-such-student'}: no such model folder"
    )


def test_mrl_dim_above_the_teachers_dim(built, zygote):
    cfg, tmp = built
    cfg["student"]["mrl"]["dims"] = [64]
    cfg["train"]["resume"] = None
    assert_user_error(_train(zygote, cfg, tmp), "student.mrl.dims: dim 64 is larger than the target dim 32")


def test_target_dim_that_is_not_the_teachers_dim(built, zygote):
    cfg, tmp = built
    cfg["student"]["target_dim"] = 48
    cfg["train"]["resume"] = None
    assert_user_error(
        _train(zygote, cfg, tmp),
        "student.target_dim: 48 differs from the teachers' concatenated dim 32 (t1) = 32",
    )


def test_global_batch_larger_than_the_corpus(built, zygote):
    cfg, tmp = built
    cfg["stages"][0]["batch_size"] = 512
    cfg["output_dir"] = str(tmp / "fresh")
    assert_user_error(
        _train(zygote, cfg, tmp), "a global batch of 512 rows is larger than the 88 training rows"
    )


def test_last_layers_beyond_the_student_fails_before_training(built, zygote):
    cfg, tmp = built
    cfg["stages"][1]["last_layers"] = 5
    cfg["output_dir"] = str(tmp / "fresh")
    res = _train(zygote, cfg, tmp)
    assert not (tmp / "fresh" / "checkpoints").exists(), "stage 0 trained before the bad stage 1 was refused"
    assert_user_error(res, "stages.1.last_layers: 5")


@pytest.mark.parametrize(
    "change, needle",
    [
        (
            put("teachers.0.pooling", "cls"),
            "cache/t1: built for pooling 'mean', config says 'cls' (teachers.0.pooling)",
        ),
        (
            put("teachers.0.prompt", "query: "),
            "cache/t1: built for prompt '', config says 'query: ' (teachers.0.prompt)",
        ),
        (
            put("data.max_length", 24),
            "cache/t1: built for max_length 32, config says 24 (teachers.0.max_length or data.max_length)",
        ),
        (put("data.limit", 50), "cache/t1: built for a corpus of 96 rows, the corpus now has 50"),
        ("other-corpus", "cache/t1: built for another corpus: row 0 differs"),
        ("other-teacher", "cache/t1: built for model"),
    ],
    ids=["pooling", "prompt", "max-length", "corpus-size", "corpus-text", "teacher-model"],
)
def test_cache_built_for_something_else(built, zygote, rel_models, change, needle):
    cfg, tmp = built
    if change == "other-corpus":
        cfg["data"]["train"] = [{"path": str(write_lines(tmp / "other.txt", corpus_lines(96, seed=99)))}]
    elif change == "other-teacher":
        shutil.copytree(rel_models["teacher"], tmp / "teacher-b")
        _retrain_weights(tmp / "teacher-b")
        cfg["teachers"][0]["model"] = str(tmp / "teacher-b")
    else:
        change(cfg)
    shutil.rmtree(tmp / "run" / "checkpoints")  # a fresh start: the caches are what is checked
    assert_user_error(_train(zygote, cfg, tmp), needle)
    line = assert_user_error(_train(zygote, cfg, tmp, "precompute"), needle)
    assert "precompute will not overwrite it: remove" in line, line


def _retrain_weights(folder: Path) -> None:
    """Another teacher: same architecture, different weights."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    weights = {k: v + 0.01 for k, v in weights.items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_truncated_shard(built, zygote):
    cfg, tmp = built
    vectors = tmp / "cache" / "t1" / "vectors.npy"
    with open(vectors, "r+b") as f:
        f.truncate(vectors.stat().st_size - 100)
    line = assert_user_error(
        _train(zygote, cfg, tmp), "cache/t1: vectors.npy is truncated", "shard 23 (rows 92-95) is damaged"
    )
    assert f"remove {tmp / 'cache' / 't1'} and rerun precompute" in line


def test_corrupted_shard(built, zygote):
    cfg, tmp = built
    vectors = np.load(tmp / "cache" / "t1" / "vectors.npy", mmap_mode="r+")
    vectors[21, 3] += 1
    vectors.flush()
    del vectors
    assert_user_error(
        _train(zygote, cfg, tmp),
        "cache/t1: shard 5 (rows 20-23) of vectors.npy does not match its checksum (corrupted)",
    )


def test_manifest_edited_by_hand(built, zygote):
    cfg, tmp = built
    manifest = tmp / "cache" / "t1" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["pooling"] = "cls"  # a user "fixing" a mismatch by hand
    manifest.write_text(json.dumps(m))
    cfg["teachers"][0]["pooling"] = "cls"
    assert_user_error(
        _train(zygote, cfg, tmp), "cache/t1: manifest.json does not match its own checksum (edited by hand?)"
    )


def test_row_hashes_missing(built, zygote):
    cfg, tmp = built
    (tmp / "cache" / "t1" / "row_hashes.npy").unlink()
    assert_user_error(_train(zygote, cfg, tmp), "cache/t1: row_hashes.npy is missing or corrupted")


def test_train_before_precompute(built, zygote):
    cfg, tmp = built
    cfg["cache_dir"] = str(tmp / "empty-cache")
    assert_user_error(
        _train(zygote, cfg, tmp),
        "cache/t1: no teacher cache at",
        "run `stella-distill precompute CONFIG` first",
    )


@pytest.mark.parametrize(
    "change, needle",
    [
        (put("seed", 6), "checkpoint was made with another student/teachers/seed config"),
        (put("student.pooling", "cls"), "checkpoint was made with another student/teachers/seed config"),
        (put("data.eval_limit", 4), "checkpoint was made with another data config (data.*)"),
        (put("stages.0.lr", 5e-4), "stages.0: differs from the checkpoint"),
        (
            lambda c: c["stages"].insert(0, dict(c["stages"][0], name="warmup", lr=1e-5)),
            "stages.0: differs from the checkpoint",
        ),
        (lambda c: c["stages"].pop(), "stages.2: differs from the checkpoint"),
    ],
    ids=["seed", "student", "data", "stage-lr", "stage-inserted", "stage-removed"],
)
def test_checkpoint_from_another_config(built, zygote, change, needle):
    cfg, tmp = built
    change(cfg)
    line = assert_user_error(_train(zygote, cfg, tmp), needle)
    assert str(tmp / "run" / "checkpoints" / "step-00000009-end") in line


def test_resume_path_that_is_not_a_checkpoint(built, zygote):
    cfg, tmp = built
    cfg["train"]["resume"] = str(tmp / "cache")
    assert_user_error(_train(zygote, cfg, tmp), f"train.resume: {tmp / 'cache'} is not a checkpoint folder")


def test_checkpoint_with_a_broken_state_file(built, zygote):
    cfg, tmp = built
    state = tmp / "run" / "checkpoints" / "step-00000008" / "trainer_state.json"
    state.write_text('{"global_step": ')
    assert_user_error(_train(zygote, cfg, tmp), str(state))


def test_checkpoint_missing_its_optimizer_state(built, zygote):
    cfg, tmp = built
    ckpt = tmp / "run" / "checkpoints" / "step-00000009-end"
    shutil.rmtree(ckpt)  # the newest is now step 8, mid-stage: resuming loads the optimizer state
    (tmp / "run" / "checkpoints" / "step-00000008" / "optimizer.bin").unlink()
    assert_user_error(_train(zygote, cfg, tmp), str(tmp / "run" / "checkpoints" / "step-00000008"))


def test_run_with_baseline_and_mrl_dims_and_no_target_dim(built, zygote):
    """A valid config (the default evaluate.baseline, MRL dims, target dim left to the teachers) must run."""
    cfg, tmp = built
    sts = tmp / "sts.tsv"
    sts.write_text(
        "".join(f"main\tx\t2012\t{i}\t{i % 5}.0\ta dog runs {i}\tthe cat sat {i}\n" for i in range(6))
    )
    cfg["evaluate"] = {"sts": [str(sts)], "baseline": True}
    res = _train(zygote, cfg, tmp, "run")
    assert res.rc == 0, str(res)
