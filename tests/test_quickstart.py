"""The quickstart, shortened: real teachers and student by Hub id (seeded cache), real CLI, whole pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "stella_distill", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def seeded_env(tmp_path_factory):
    """An environment whose Hugging Face cache holds the two real models, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"}
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "setup_offline_models.py")],
        env=env,
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        pytest.fail(f"scripts/setup_offline_models.py failed:\n{check.stdout}\n{check.stderr}")
    return env


def test_short_quickstart_end_to_end(tmp_path, seeded_env):
    # 100 STS-B dev pairs are enough to see the pipeline score every dim; the full file is the README's.
    sts = tmp_path / "sts-small.csv"
    lines = (ROOT / "data" / "stsbenchmark" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()
    sts.write_text("\n".join(lines[:100]) + "\n", encoding="utf-8")
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"cache_dir={tmp_path / 'cache'}",
        "data.train.0.limit=200",
        "data.train.1.limit=60",
        "data.train.2.limit=40",
        "data.eval_limit=20",
        "stages.0.steps=3",
        "stages.1.steps=2",
        "stages.2.steps=2",
        "stages.0.batch_size=16",
        "stages.1.batch_size=16",
        "stages.2.batch_size=16",
        "train.checkpoint_every=0",
        "train.log_every=1",
        f"evaluate.sts=[{sts}]",
        "logging.progress=false",
    ]
    proc = _run(["run", "configs/quickstart.yaml", *overrides], seeded_env, ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"

    # caches of both real teachers, with the dims of the real models
    for name, dim in (("mpnet", 768), ("minilm", 384)):
        manifest = json.loads((tmp_path / "cache" / name / "manifest.json").read_text())
        assert manifest["dim"] == dim and manifest["rows"] == 300
        assert manifest["model"].startswith("sentence-transformers/")

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 8))

    export = run / "export"
    modules = json.loads((export / "modules.json").read_text())
    assert [m["type"] for m in modules] == [
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Pooling",
        "sentence_transformers.models.Dense",
        "sentence_transformers.models.Normalize",
    ]
    assert modules[2]["path"] == "2_Dense_384"
    for dim in (1152, 384, 256, 128, 64):
        assert (export / f"2_Dense_{dim}" / "config.json").is_file()

    results = json.loads((run / "eval.json").read_text())
    assert {int(d) for d in results["dims"]} == {1152, 384, 256, 128, 64}
    baseline = json.loads((run / "baseline.json").read_text())["sts/sts-small"]  # eval.json's metric name
    assert set(baseline) == {"student_start", "teacher:mpnet", "teacher:minilm", "target"}
    assert baseline["teacher:mpnet"] > 70  # the real model, really loaded
    card = (export / "README.md").read_text()
    assert "## " in card and "model-index:" in card  # evaluate put its results into the card
    assert sorted(p.name for p in (export / "dims").iterdir()) == ["1152", "128", "256", "384", "64"]

    # a second run finds everything done and only reports
    again = _run(["run", "configs/quickstart.yaml", *overrides], seeded_env, ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training already complete" in again.stdout
    assert "export and evaluation already complete" in again.stdout
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(rows)
