"""What a run says and where its numbers go: -q / -v on the verbs, accelerate's trackers.

- `-q` prints nothing but warnings; the default prints our lines and no transformers progress bar;
  `-v` lets transformers' "Loading weights" bar through (real CLI, tiny teacher).
- `train` sends every metrics row's numbers to the trackers of `logging.report_to` and to trackers
  passed in (accelerate's `GeneralTracker` API): one `log` call per row at its step, equal to
  `metrics.jsonl`, the flat resolved config stored once, the tracker finished at the end.
- A tracker whose package is missing stops `train` before any work, naming `logging.report_to`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import precompute_config
from tiny import make_tiny_bert

from stella_distill.config import from_dict
from stella_distill.errors import UserError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
    ENV.pop(key, None)  # the CLI's own choice is under test


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "t1": make_tiny_bert(root / "t1", layers=2, hidden=32, seed=21, dropout=0.0),
        "student": make_tiny_bert(root / "student", layers=2, hidden=24, seed=22, dropout=0.0),
    }


def _precompute(tmp_path: Path, models: dict, *flags: str) -> subprocess.CompletedProcess:
    cfg = precompute_config(
        tmp_path, [{"name": "t1", "model": str(models["t1"]), "pooling": "mean"}], ["one text", "two texts"]
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "stella_distill", "precompute", *flags, str(path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("flag", ["-q", "", "-v"])
def test_verbosity_flags(tmp_path, models, flag):
    done = _precompute(tmp_path, models, *([flag] if flag else []))
    assert done.returncode == 0, done.stderr
    cache = tmp_path / "cache" / "t1" / "manifest.json"
    assert cache.is_file()  # the work happened whatever was printed
    if flag == "-q":
        assert done.stdout == "" and "Loading weights" not in done.stderr, (done.stdout, done.stderr)
    elif flag == "":
        assert "teacher t1: 2 rows" in done.stdout and "corpus:" in done.stdout, done.stdout
        assert "Loading weights" not in done.stderr, done.stderr
    else:
        assert "teacher t1: 2 rows" in done.stdout
        assert "Loading weights" in done.stderr, done.stderr


class Recorder:
    """A tracker through accelerate's ``GeneralTracker`` API that keeps what it is given."""

    def __new__(cls):
        from accelerate.tracking import GeneralTracker

        class _Recorder(GeneralTracker):
            name = "recorder"
            requires_logging_directory = False

            def __init__(self):
                super().__init__()
                self.config, self.rows, self.finished = None, [], 0

            @property
            def tracker(self):
                return self

            def store_init_configuration(self, values):
                self.config = dict(values)

            def log(self, values, step=None, **kwargs):
                self.rows.append((step, dict(values)))

            def finish(self):
                self.finished += 1

        return _Recorder()


def _train_config(tmp_path: Path, models: dict, **logging) -> dict:
    cfg = precompute_config(
        tmp_path,
        [{"name": "t1", "model": str(models["t1"]), "pooling": "mean", "shard_size": 16}],
        [f"text number {i} about the cat and the dog" for i in range(40)],
        max_length=16,
    )
    cfg.update(
        student={"model": str(models["student"]), "mrl": {"dims": [8]}},
        stages=[
            {"name": "head", "trainable": "head", "steps": 3, "batch_size": 8},
            {"name": "all", "trainable": "all", "steps": 2, "batch_size": 8, "mrl": True},
        ],
        train={"log_every": 1, "checkpoint_every": 0},
        logging={"progress": False, **logging},
    )
    cfg["data"]["eval_limit"] = 8
    return cfg


def test_train_sends_every_metrics_row_to_the_trackers(tmp_path, models):
    from stella_distill.precompute import run_precompute
    from stella_distill.train import train

    cfg = from_dict(_train_config(tmp_path, models, report_to=[]))
    run_precompute(cfg)
    recorder = Recorder()
    run_dir = train(cfg, trackers=(recorder,))

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert len(recorder.rows) == len(rows)  # one call per row: the 5 steps and 2 stage-end evaluations
    for (step, values), row in zip(recorder.rows, rows):
        assert step == row["step"]
        expected = {
            k.replace("@", "_dim"): v
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        assert values == expected
    stage_two = [values for step, values in recorder.rows if step == 4 and "loss" in values][0]
    assert "loss/mrl_8/similarity" in stage_two and "eval/similarity_mse_dim8" in recorder.rows[3][1]
    assert recorder.config["stages.0.steps"] == 3 and recorder.config["student.mrl.dims"] == "[8]"
    assert recorder.config["teachers.0.pooling"] == "mean" and recorder.config["name"] == "t"
    assert recorder.finished == 1


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed")
def test_a_tracker_that_is_not_installed_stops_train_before_any_work(tmp_path, models):
    from stella_distill.train import train

    cfg = from_dict(_train_config(tmp_path, models, report_to=["mlflow"]))
    with pytest.raises(
        UserError, match=r"logging\.report_to: mlflow is not installed \(pip install mlflow\)"
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()
