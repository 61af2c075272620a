"""Rules that used to fail late (at export, at train start after precompute, at stage 3) now stop
`stella-distill check` (and so every verb) before any work, in one line naming the field.

The models' own files tell what plain typing cannot: the teachers' dims (config.json hidden size, or a
Dense head's out_features), the student's layer count, and whether a model runs its own code.
Launcher-dependent stage rules are checked for every stage before the first one trains.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import apply_overrides

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def base(tiny_bert, tiny_bert4, tmp_path_factory) -> dict:
    """Teachers of 32 and 48 dims (target 80), a 4-layer student, dims 16 and 8."""
    root = tmp_path_factory.mktemp("checks")
    corpus = root / "corpus.txt"
    corpus.write_text("a text\n")
    return {
        "name": "checks",
        "output_dir": str(root / "run"),
        "cache_dir": str(root / "cache"),
        "data": {"train": [{"path": str(corpus)}], "max_length": 64},
        "teachers": [
            {"name": "t32", "model": str(tiny_bert), "pooling": "mean"},
            {"name": "t48", "model": str(tiny_bert4), "pooling": "cls"},
        ],
        "student": {"model": str(tiny_bert4), "mrl": {"dims": [16, 8]}},
        "stages": [
            {"name": "head", "steps": 1, "batch_size": 8},
            {"name": "last", "trainable": "last_layers", "last_layers": 2, "steps": 1, "batch_size": 8},
        ],
        "export": {"default_dim": 16},
        "logging": {"report_to": []},
    }


def check(tmp_path: Path, cfg: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "stella_distill", "check", str(path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_base_config_passes(tmp_path, base):
    done = check(tmp_path, base)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["export"]["default_dim"] == 16


def _remote_code(folder: Path) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_x.XModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


CASES = {
    # the example: passed `check` and failed at export, after training
    "default-dim-not-offered": (
        {"export.default_dim": 100},
        "export.default_dim: 100 is not an offered dim: one of student.mrl.dims [16, 8] or the target dim 80",
    ),
    "default-dim-beyond-truncate": (
        {"student.mrl": {"mode": "truncate", "dims": [16, 8]}, "export.default_dim": 81},
        "export.default_dim: 81 is larger than the target dim 80",
    ),
    "mrl-dim-above-the-teachers": (
        {"student.mrl.dims": [96, 16]},
        "student.mrl.dims: dim 96 is larger than the target dim 80",
    ),
    "mrl-dim-equal-to-the-teachers": (
        {"student.mrl.dims": [80, 16]},
        "student.mrl.dims: dim 80 equals the target dim; the projection already outputs it",
    ),
    "target-dim-not-the-teachers": (
        {"student.target_dim": 64, "student.mrl.dims": [16, 8]},
        "student.target_dim: 64 differs from the teachers' concatenated dim 32 (t32) + 48 (t48) = 80",
    ),
    "keep-layers-beyond-the-student": (
        {"student.keep_layers": [0, 4]},
        "student.keep_layers: layer 4 out of range (the model has 4 layers)",
    ),
    "last-layers-beyond-the-kept-layers": (
        {"student.keep_layers": [0, 3], "stages.1.last_layers": 3},
        "stages.1.last_layers: 3 must be between 1 and the student's 2 layers",
    ),
    "missing-student-folder": (
        {"student.model": "/no/such/student"},
        "student.model: /no/such/student: no such model folder",
    ),
    "missing-second-teacher": (
        {"teachers.1.model": "./no-such-teacher"},
        "teachers.1.model: ./no-such-teacher: no such model folder",
    ),
    "push-to-hub-not-a-repo-id": (
        {"export.push_to_hub": "my model"},
        "export.push_to_hub: 'my model' is not a Hub repo id of the form org/name",
    ),
    "batch-larger-than-the-corpus-can-be": (
        {"data.limit": 100, "stages.1.batch_size": 128},
        "stages.1.batch_size: 128 is more than the at most 100 texts the corpus limits allow",
    ),
    "tracker-listed-twice": (
        {"logging.report_to": ["tensorboard", "tensorboard"]},
        "logging.report_to: a tracker is listed twice",
    ),
    "unknown-tracker": (
        {"logging.report_to": ["tensorbord"]},
        "logging.report_to.0: expected one of wandb, tensorboard",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_late_failures_are_config_errors(tmp_path, base, case):
    over, expected = CASES[case]
    done = check(tmp_path, apply_overrides(copy.deepcopy(base), over))
    assert done.returncode == 2, (done.stdout, done.stderr)
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("stella-distill check: error: ") and expected in line, line


def test_teacher_dims_through_a_dense_head_and_remote_code(tmp_path, base, tiny_bert):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert, teacher)
    head = teacher / "2_Dense"
    head.mkdir()
    (head / "config.json").write_text(json.dumps({"in_features": 32, "out_features": 20, "bias": True}))
    cfg = apply_overrides(
        copy.deepcopy(base), {"teachers.0.model": str(teacher), "teachers.0.dense": "2_Dense"}
    )
    cfg["export"]["default_dim"] = 100
    done = check(tmp_path, cfg)  # 20 (through the head) + 48
    assert "or the target dim 68" in done.stderr, done.stderr
    _remote_code(teacher)
    done = check(tmp_path, cfg)
    assert done.returncode == 2
    assert (
        f"teachers.0.model: {teacher} asks to run its own Python code (auto_map in config.json)"
        in done.stderr
    )


def test_launcher_rules_of_every_stage_stop_train_before_the_first_stage(base):
    """fp16 without the launcher's loss scaling, or accumulation under DeepSpeed, in a later stage."""
    import torch

    from stella_distill.config import from_dict
    from stella_distill.distributed import check_stages
    from stella_distill.errors import UserError

    def acc(kind="NO", precision="no"):
        return SimpleNamespace(
            distributed_type=SimpleNamespace(value=kind),
            mixed_precision=precision,
            device=torch.device("cuda"),
            is_main_process=True,
        )

    cfg = from_dict(apply_overrides(copy.deepcopy(base), {"stages.1.mixed_precision": "fp16"}))
    with pytest.raises(UserError, match=r"^stages\.1\.mixed_precision: fp16 needs loss scaling"):
        check_stages(cfg, acc())
    check_stages(cfg, acc(precision="fp16"))  # the launcher scales the loss
    cfg = from_dict(apply_overrides(copy.deepcopy(base), {"stages.1.grad_accumulation": 2}))
    check_stages(cfg, acc())
    with pytest.raises(
        UserError, match=r"^stages\.1\.grad_accumulation / train\.embedding_chunk_size: not supported"
    ):
        check_stages(cfg, acc("DEEPSPEED"))


@pytest.mark.parametrize("case", ["broken-sts-file", "tracker-not-installed"])
def test_run_stops_before_precompute(tmp_path, base, case):
    """What `run` needs only after training (evaluation sets, trackers) is checked before precompute."""
    import importlib.util

    cfg = copy.deepcopy(base)
    if case == "broken-sts-file":
        sts = tmp_path / "sts.tsv"
        sts.write_text("sentence1\tsentence2\tscore\na cat\ta dog\tnot-a-number\n")
        cfg["evaluate"] = {"sts": [str(sts)]}
        expected = f"{sts}:"
    else:
        if importlib.util.find_spec("mlflow") is not None:
            pytest.skip("mlflow is installed")
        cfg["logging"] = {"report_to": ["mlflow"]}
        expected = "logging.report_to: mlflow is not installed (pip install mlflow)"
    cfg["cache_dir"] = str(tmp_path / "cache")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "stella_distill", "run", str(path)], env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr.strip().splitlines()[-1], done.stderr
    assert not (tmp_path / "cache").exists()  # nothing was encoded
