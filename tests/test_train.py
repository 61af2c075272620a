"""End-to-end trainer tests on CPU with tiny models, through the real CLI where it matters."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import apply_overrides
from safetensors.torch import load_file
from tiny import WORDS, make_tiny_bert

from stella_distill.cli import main
from stella_distill.config import from_dict

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Teachers and a prunable student without dropout, so runs can be compared exactly."""
    root = tmp_path_factory.mktemp("models")
    return {
        "t1": make_tiny_bert(root / "t1", layers=2, hidden=32, seed=11, dropout=0.0),
        "t2": make_tiny_bert(root / "t2", layers=2, hidden=24, seed=12, dropout=0.0),
        "student": make_tiny_bert(root / "student", layers=4, hidden=48, seed=13, dropout=0.0),
    }


def write_corpus(path: Path, n: int = 96, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def base_config(tmp: Path, models: dict, **over) -> dict:
    corpus = write_corpus(tmp / "corpus.txt")
    cfg = {
        "name": "tiny",
        "output_dir": str(tmp / "run"),
        "cache_dir": str(tmp / "cache"),
        "seed": 3,
        "data": {"train": [{"path": str(corpus)}], "max_length": 32, "eval_limit": 8},
        "teachers": [
            {"name": "t1", "model": str(models["t1"]), "pooling": "mean", "shard_size": 32},
            {"name": "t2", "model": str(models["t2"]), "pooling": "cls", "shard_size": 32},
        ],
        "student": {
            "model": str(models["student"]),
            "pooling": "mean",
            "keep_layers": [0, 3],
            "mrl": {"mode": "heads", "dims": [16, 8]},
        },
        "stages": [
            {"name": "head", "trainable": "head", "steps": 3, "batch_size": 8, "lr": 1e-3},
            {
                "name": "last",
                "trainable": "last_layers",
                "last_layers": 1,
                "steps": 3,
                "batch_size": 8,
                "lr": 1e-3,
            },
            {"name": "all", "trainable": "all", "steps": 3, "batch_size": 8, "lr": 1e-3, "mrl": True},
        ],
        "train": {"checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    return apply_overrides(cfg, over)


def write_config(tmp: Path, cfg: dict) -> Path:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "stella_distill", *args], env=ENV, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def student_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = load_file(folder / "backbone" / "model.safetensors")
    weights.update({f"heads.{k}": v for k, v in load_file(folder / "heads.safetensors").items()})
    return weights


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_three_stage_run_through_cli(tmp_path, models):
    cfg_path = write_config(tmp_path, base_config(tmp_path, models))
    cli("precompute", str(cfg_path))
    cli("train", str(cfg_path))
    run = tmp_path / "run"

    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [r["stage"] for r in rows] == ["head"] * 3 + ["last"] * 3 + ["all"] * 3
    assert all(r["world_size"] == 1 for r in rows)
    assert all("loss/mrl_16/similarity" in r for r in rows[6:]) and not any(
        "loss/mrl_16/similarity" in r for r in rows[:6]
    )
    assert any("eval/cosine" in r for r in metrics(run))

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000008", "step-00000009-end"]  # keep_checkpoints=2
    last = run / "checkpoints" / "step-00000009-end"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == 9 and state["stage_index"] == 2 and state["stage_complete"]
    for name in (
        "config.yaml",
        "student/heads.safetensors",
        "student/backbone/model.safetensors",
        "student/student.json",
    ):
        assert (last / name).is_file(), name
    assert any(p.name.startswith("optimizer") for p in last.iterdir())
    assert (run / "final" / "student" / "heads.safetensors").is_file()

    # Which parameters moved in which stage: compare the stage-end student weights.
    init = cfg_path.parent / "init"
    subprocess.run(
        [sys.executable, "-c", _SAVE_INIT, str(cfg_path), str(init)], env=ENV, check=True, capture_output=True
    )
    w0 = student_weights(init)
    w_final = student_weights(run / "final" / "student")
    moved = {k for k in w0 if not torch.equal(w0[k], w_final[k])}
    assert any(k.startswith("heads.projection") for k in moved)
    assert any(k.startswith("heads.mrl_heads.16") for k in moved)
    assert any("layer.1." in k for k in moved) and any("layer.0." in k for k in moved)


_SAVE_INIT = """
import sys, torch
from stella_distill.config import load_config
from stella_distill.student import StudentModel
cfg = load_config(sys.argv[1])
torch.manual_seed(cfg.seed)
StudentModel.from_config(cfg.student, target_dim=56, max_length=cfg.data.max_length).save_pretrained(sys.argv[2])
"""


def test_stage_freezing(tmp_path, models):
    """Stage 1 moves only the projection; stage 2 also the last layer; frozen tensors stay bit-identical."""
    cfg = base_config(tmp_path, models)
    cfg["stages"] = cfg["stages"][:2]
    cfg["train"]["checkpoint_every"] = 0
    cfg["train"]["keep_checkpoints"] = 5
    cfg_path = write_config(tmp_path, cfg)
    assert main(["precompute", str(cfg_path)]) == 0
    cli("train", str(cfg_path))
    run = tmp_path / "run"
    init = tmp_path / "init"
    subprocess.run([sys.executable, "-c", _SAVE_INIT, str(cfg_path), str(init)], env=ENV, check=True)
    w0 = student_weights(init)
    w1 = student_weights(run / "checkpoints" / "step-00000003-end" / "student")
    w2 = student_weights(run / "checkpoints" / "step-00000006-end" / "student")
    moved1 = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert moved1 == {"heads.projection.weight", "heads.projection.bias"}
    moved2 = {k for k in w0 if not torch.equal(w1[k], w2[k])}
    assert {"heads.projection.weight", "heads.projection.bias"} <= moved2
    assert all(k.startswith("heads.projection") or "encoder.layer.1." in k for k in moved2), moved2
    assert any("encoder.layer.1." in k for k in moved2)


def test_two_processes_match_one_with_double_batch(tmp_path, models):
    """torchrun x2 with batch 4 == one process with batch 8 (in-batch losses over the gathered batch)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    cfg1 = base_config(one, models, **{"train.checkpoint_every": 0})
    cfg1["stages"] = [cfg1["stages"][0], cfg1["stages"][2]]
    cfg2 = json.loads(json.dumps(cfg1))
    cfg2["output_dir"] = str(two / "run")
    for s in cfg2["stages"]:
        s["batch_size"] = 4
    p1, p2 = write_config(one, cfg1), write_config(two, cfg2)
    cli("precompute", str(p1))
    cfg2["cache_dir"] = cfg1["cache_dir"]
    cfg2["data"] = cfg1["data"]
    p2 = write_config(two, cfg2)
    cli("train", str(p1))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "stella_distill", "train", str(p2)],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1 = [r for r in metrics(one / "run") if "loss" in r]
    m2 = [r for r in metrics(two / "run") if "loss" in r]
    assert {r["world_size"] for r in m1} == {1}
    assert {r["world_size"] for r in m2} == {2}
    assert len(m1) == len(m2) == 6
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    w1 = student_weights(one / "run" / "final" / "student")
    w2 = student_weights(two / "run" / "final" / "student")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


def test_sharded_runs_restart_each_stage_from_a_rebuilt_student_with_the_same_weights(
    tmp_path, models, monkeypatch
):
    """Under ZeRO-3 / FSDP a prepared student cannot be wrapped again, so every stage after the first
    starts from a fresh student loaded with the gathered weights. Forced on here (CPU has neither),
    the run must end with exactly the weights of the plain path."""
    import stella_distill.train as train_mod

    runs = {}
    for name, sharded in (("plain", False), ("rebuilt", True)):
        (tmp_path / name).mkdir()
        cfg = base_config(tmp_path / name, models, **{"train.checkpoint_every": 0})
        if name == "rebuilt":
            cfg["cache_dir"] = runs["plain"]["cache_dir"]
        runs[name] = cfg
        calls = []
        real = train_mod._rebuilt_student

        def counting(cfg_, model, accelerator, real=real, calls=calls):
            calls.append(type(accelerator.unwrap_model(model)).__name__)
            return real(cfg_, model, accelerator)

        monkeypatch.setattr(train_mod, "shards_parameters", lambda accelerator, s=sharded: s)
        monkeypatch.setattr(train_mod, "_rebuilt_student", counting)
        assert main(["precompute", str(write_config(tmp_path / name, cfg))]) == 0
        train_mod.train(from_dict(cfg))
        assert calls == (["StudentModel", "StudentModel"] if sharded else []), calls
    want = student_weights(tmp_path / "plain" / "run" / "final" / "student")
    got = student_weights(tmp_path / "rebuilt" / "run" / "final" / "student")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    plain = [r["loss"] for r in metrics(tmp_path / "plain" / "run") if "loss" in r]
    rebuilt = [r["loss"] for r in metrics(tmp_path / "rebuilt" / "run") if "loss" in r]
    assert plain == rebuilt and len(plain) == 9


def test_a_failed_write_on_rank_0_stops_both_processes_with_one_line_each(tmp_path, models):
    """Rank 0 cannot write its checkpoint (``checkpoints`` is a file): it exits with the path; rank 1,
    blocked in the barrier, sees the connection drop and says so in one line instead of a traceback."""
    cfg = base_config(tmp_path, models)
    path = write_config(tmp_path, cfg)
    cli("precompute", str(path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file the user put here")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "stella_distill", "train", str(path)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr
    assert "world_size=2" in proc.stdout, proc.stdout
    assert (
        f"stella-distill train: error: {tmp_path / 'run' / 'checkpoints' / 'step-00000002'}: cannot write ("
        in err
    ), err
    assert "stella-distill train: rank 1: another process of this job stopped (" in err, err
    assert "[rank1]: Traceback" not in err and "[rank0]: Traceback" not in err, err
    assert (tmp_path / "run" / "checkpoints").read_text() == "a file the user put here"


def test_kill_and_resume_gives_identical_weights(tmp_path, models):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfg = base_config(a, models, **{"train.checkpoint_every": 1, "train.keep_checkpoints": 3})
    for s in cfg["stages"]:
        s["steps"] = 4
    pa = write_config(a, cfg)
    cli("precompute", str(pa))
    cli("train", str(pa))
    cfg["output_dir"] = str(b / "run")
    pb = write_config(b, cfg)
    # kill -9 in the middle of stage 2 (after the checkpoint of global step 6)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stella_distill", "train", str(pb)], env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    ckdir = b / "run" / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if ckdir.is_dir() and any(
            p.name.startswith("step-00000006") and not p.name.endswith(".tmp") for p in ckdir.iterdir()
        ):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (b / "run" / "final").exists()
    cli("train", str(pb))
    wa = student_weights(a / "run" / "final" / "student")
    wb = student_weights(b / "run" / "final" / "student")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    steps = [r["step"] for r in metrics(b / "run") if "loss" in r]
    assert steps[-1] == 12


def test_gradcache_matches_plain_step(tmp_path, models):
    """embedding_chunk_size gives the same gradient as the unchunked step."""
    from stella_distill.distributed import make_accelerator
    from stella_distill.student import StudentModel
    from stella_distill.train import _backward

    cfg = from_dict(base_config(tmp_path, models))
    stage = cfg.stages[2]
    acc = make_accelerator()
    torch.manual_seed(0)
    student = StudentModel.from_config(cfg.student, target_dim=56, max_length=32)
    student.set_trainable("all")
    student.double()
    texts = (tmp_path / "corpus.txt").read_text().splitlines()[:12]
    features = student.tokenize(texts)
    target = torch.randn(12, 56, dtype=torch.float64)
    grads = []
    for chunk in (None, 5):
        cfg.train.embedding_chunk_size = chunk
        student.zero_grad()
        terms = _backward(cfg, stage, student, student, features, target, acc, contextlib.nullcontext())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        grads[-1]["loss"] = terms["loss"].clone()
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-9, atol=1e-12)


def all_saved_tensors_finite(run: Path) -> int:
    """Assert every tensor of every safetensors / .bin file under ``run`` is finite; return the file count."""
    files = sorted(run.rglob("*.safetensors")) + sorted(run.rglob("*.bin"))
    for f in files:
        tensors = load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
        flat = tensors.values() if isinstance(tensors, dict) else []
        for v in flat:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.isfinite(v).all(), f
    return len(files)


def test_non_finite_loss_stops_with_stage_and_step(tmp_path, models):
    """An absurd lr: one line, exit 2, and nothing non-finite was ever written (checked every step)."""
    cfg = base_config(tmp_path, models, **{"train.checkpoint_every": 1, "train.log_every": 4})
    cfg["stages"][0]["lr"] = 1e30
    cfg["stages"][0]["max_grad_norm"] = None
    cfg["stages"][0]["steps"] = 6
    p = write_config(tmp_path, cfg)
    cli("precompute", str(p))
    proc = cli("train", str(p), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "non-finite loss or weights" in proc.stderr and "stages.0 ('head')" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "non-finite" in line]) == 1, proc.stderr
    ckpts = [c for c in (tmp_path / "run" / "checkpoints").iterdir()]
    assert ckpts, "the last good checkpoint is kept"
    assert not (tmp_path / "run" / "final").exists()
    assert all_saved_tensors_finite(tmp_path / "run") >= 2


def test_a_weight_turned_nan_by_an_update_stops_before_the_next_checkpoint(tmp_path, models, monkeypatch):
    """The loss is finite at every step; only the device-side weight check can see the NaN."""
    from stella_distill import train as train_module

    make = train_module._optimizer

    def poisoning_optimizer(model, stage, fused):
        optimizer = make(model, stage, fused)
        calls = []

        def after_step(*_):
            calls.append(1)
            if len(calls) == 2:  # the second update writes a NaN into the projection
                with torch.no_grad():
                    model.projection.weight[0, 0] = float("nan")

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(train_module, "_optimizer", poisoning_optimizer)
    cfg = base_config(tmp_path, models, **{"train.checkpoint_every": 1, "train.log_every": 10})
    p = write_config(tmp_path, cfg)
    cli("precompute", str(p))
    with pytest.raises(train_module.NonFiniteLossError, match=r"stages\.0 \('head'\), step 2: non-finite"):
        train_module.train(from_dict(yaml.safe_load(p.read_text())))
    run = tmp_path / "run"
    assert sorted(c.name for c in (run / "checkpoints").iterdir()) == ["step-00000001"]
    assert not (run / "final").exists()
    assert all_saved_tensors_finite(run) >= 2


def test_resume_refuses_changed_stage_list(tmp_path, models):
    cfg = base_config(tmp_path, models)
    cfg["stages"] = cfg["stages"][:1]
    p = write_config(tmp_path, cfg)
    cli("precompute", str(p))
    cli("train", str(p))
    cfg["stages"][0]["lr"] = 5e-4
    p = write_config(tmp_path, cfg)
    proc = cli("train", str(p), check=False)
    assert proc.returncode == 2 and "stages.0" in proc.stderr and "Traceback" not in proc.stderr


def test_batch_order_is_world_size_independent():
    from stella_distill.data import batch_order

    rows = np.arange(100)
    lengths = np.random.default_rng(0).integers(1, 50, 100)
    a = batch_order(rows, lengths, 8, seed=1, group_by_length=True)
    b = batch_order(rows, lengths, 8, seed=1, group_by_length=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(a) == 12 and len(np.unique(np.concatenate(a))) == 96


def _batch_order_reference(rows, lengths, global_batch, seed, group_by_length):
    """The plain form: index a permutation, sort each mega-batch by length, list the batches, shuffle them."""
    rng = np.random.default_rng(seed)
    order = rows[rng.permutation(len(rows))]
    if group_by_length:
        mega = global_batch * 50
        chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("n, batch", [(100, 8), (5000, 7), (20_000, 64), (5, 8)])
def test_batch_order_equals_the_plain_form(n, batch, group):
    """Same batches, same order, as the plain list-of-permutation form (so runs keep their data order
    and checkpoints resume onto the same rows), from int32 or int64 row ids."""
    from stella_distill.data import batch_order

    rng = np.random.default_rng(n)
    rows = np.sort(rng.choice(3 * n, size=n, replace=False))
    lengths = rng.integers(1, 40, 3 * n)  # many ties: the stable sort's order counts
    want = _batch_order_reference(rows, lengths, batch, 11, group)
    for ids in (rows, rows.astype(np.int32)):
        got = batch_order(ids, lengths, batch, seed=11, group_by_length=group)
        assert got.shape == (len(want), batch) and got.dtype == ids.dtype
        assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_each_stage_writes_its_batch_and_clipping_into_the_deepspeed_config():
    """accelerate leaves DeepSpeed's batch fields "auto" without a DataLoader and keeps the first
    prepare's values: the trainer sets them per stage, and the engine's clipping from max_grad_norm."""
    from types import SimpleNamespace

    from stella_distill.config import StageConfig
    from stella_distill.distributed import deepspeed_stage_config

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}  # fmt: skip
    acc = SimpleNamespace(
        num_processes=8, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config))
    )
    deepspeed_stage_config(acc, StageConfig(name="a", batch_size=16, max_grad_norm=0.5))
    assert config == {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "train_batch_size": 128,
                      "gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}  # fmt: skip
    deepspeed_stage_config(acc, StageConfig(name="b", batch_size=4, max_grad_norm=None))
    assert (
        config["train_micro_batch_size_per_gpu"],
        config["train_batch_size"],
        config["gradient_clipping"],
    ) == (4, 32, 0.0)


def test_stage_precision_against_the_launchers(capsys):
    from types import SimpleNamespace

    from stella_distill.config import StageConfig
    from stella_distill.distributed import check_precision
    from stella_distill.errors import UserError

    def acc(launcher: str, device: str = "cuda"):
        return SimpleNamespace(mixed_precision=launcher, device=torch.device(device), is_main_process=True)

    check_precision(StageConfig(name="s", mixed_precision="bf16"), 0, acc("no"))  # the stage decides
    check_precision(StageConfig(name="s", mixed_precision="fp16"), 0, acc("no", "cpu"))  # ignored on CPU
    check_precision(StageConfig(name="s", mixed_precision="fp16"), 0, acc("fp16"))  # accelerate scales
    with pytest.raises(UserError, match=r"^stages\.2\.mixed_precision: fp16 needs loss scaling"):
        check_precision(StageConfig(name="s", mixed_precision="fp16"), 2, acc("no"))
    check_precision(StageConfig(name="s", mixed_precision="no"), 1, acc("bf16"))
    assert "stages.1.mixed_precision: 'no' is overridden by the launcher's 'bf16'" in capsys.readouterr().err


def test_sharding_setups_that_would_lose_rank_0s_weights_are_refused(tmp_path, models):
    from types import SimpleNamespace

    from stella_distill.distributed import check_sharding_setup
    from stella_distill.errors import UserError

    cfg = from_dict(base_config(tmp_path, models))  # three stages

    def acc(kind: str, world: int = 2, **plugin):
        state = SimpleNamespace(
            deepspeed_plugin=SimpleNamespace(**plugin), fsdp_plugin=SimpleNamespace(**plugin)
        )
        return SimpleNamespace(distributed_type=SimpleNamespace(value=kind), num_processes=world, state=state)

    check_sharding_setup(cfg, acc("MULTI_GPU"))
    check_sharding_setup(cfg, acc("DEEPSPEED", zero3_init_flag=False))
    with pytest.raises(UserError, match=r"^accelerate config zero3_init_flag: must be false"):
        check_sharding_setup(cfg, acc("DEEPSPEED", zero3_init_flag=True))
    check_sharding_setup(cfg, acc("FSDP", fsdp_version=1, sync_module_states=True))
    check_sharding_setup(cfg, acc("FSDP", world=1, fsdp_version=1, sync_module_states=False))
    with pytest.raises(UserError, match=r"^accelerate config fsdp_sync_module_states: must be true"):
        check_sharding_setup(cfg, acc("FSDP", fsdp_version=1, sync_module_states=False))
    check_sharding_setup(
        cfg, acc("FSDP", fsdp_version=2, sync_module_states=None, cpu_ram_efficient_loading=True)
    )
    with pytest.raises(
        UserError, match=r"^accelerate config fsdp_cpu_ram_efficient_loading: must be true with FSDP2"
    ):
        check_sharding_setup(
            cfg, acc("FSDP", fsdp_version=2, sync_module_states=None, cpu_ram_efficient_loading=False)
        )
