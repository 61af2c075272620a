"""Kill anywhere: precompute and train killed with SIGKILL at 10 seeded points each, then resumed.

Each kill lands at a seeded point in progress (a number of shard records or optimizer steps, plus a
small random delay so that some land inside a write), in start-up, or right when a write is in
flight (a shard's rows are on disk without their record; a ``checkpoints/*.tmp`` folder exists).
The in-flight kinds run the child on a "slow disk" (the fork server sleeps after each cache pwrite
or checkpoint torch.save) so that they land inside the write whatever the machine's load; the other
kinds run at full speed. After every kill the state on disk must be
consistent (nothing half-written passes for complete); after the last, a plain rerun must end with
a cache byte-identical to, and final weights equal to, an uninterrupted run.

Two deterministic companions construct the states a kill inside a write leaves behind (a shard whose
bytes are half there, a record without bytes, temp files, a checkpoint folder that was never
renamed) and check that the rerun repairs or ignores them.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rel_harness import (
    cache_files,
    check_cache_consistent,
    check_checkpoints_consistent,
    experiment,
    student_weights,
    wait_for,
    write_config,
)

KILLS = 10


def _after(seconds: float):
    """A predicate that comes true ``seconds`` from now."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() >= deadline


def _precompute_plan(seed: int) -> list[tuple[str, float]]:
    """10 kill points: (kind, value). Kinds: build (build.json appeared), time (seconds after the
    fork: start-up, model loading, the dim probe; a forked run reaches build.json after ~0.2 s),
    records (that many more shard records, then up to 3 ms: a shard takes ~10 ms), in_shard (a
    shard's rows are in vectors.npy but its record is not written yet)."""
    rng = random.Random(seed)
    plan = [("build", rng.uniform(0, 0.002))]
    kinds = ["time"] * 2 + ["records"] * 5 + ["in_shard"] * 2
    rng.shuffle(kinds)
    for kind in kinds:
        plan.append((kind, rng.uniform(0.02, 0.2) if kind == "time" else rng.randint(1, 3)))
    return plan


def test_precompute_killed_10_times_resumes_byte_identical(pre_reference, rel_models, zygote, tmp_path):
    corpus, ref_folder = pre_reference
    cfg = experiment(tmp_path, rel_models, corpus)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    folder = Path(cfg["cache_dir"]) / "t1"
    shards = folder / "shards"
    rng = random.Random(1234)

    def records() -> int:
        return len(list(shards.glob("shard-*.json"))) if shards.is_dir() else 0

    landed = []
    for kind, value in _precompute_plan(99):
        stale = _rows_without_record(folder)  # what earlier kills left; the rerun redoes it
        # in_shard kills meet a slow disk (each shard's rows sit on disk 1 s before its record), so
        # they land between the bytes and the record on any machine, loaded or not
        fault = {"kind": "pwrite_pause", "after": 0, "seconds": 1.0} if kind == "in_shard" else None
        job = zygote.start(["precompute", path], fault=fault)
        if kind == "build":
            fired = wait_for(lambda: (folder / "build.json").is_file(), job)
            time.sleep(value)
        elif kind == "time":
            fired = wait_for(_after(value), job)
        elif kind == "in_shard":
            fired = wait_for(lambda s=stale: bool(_rows_without_record(folder) - s), job, poll=0.0002)
        else:
            target = records() + int(value)
            fired = wait_for(lambda t=target: records() >= t, job)
            time.sleep(rng.uniform(0, 0.003))
        job.kill()
        res = job.wait()
        assert res.rc in (-9, 0), str(res)  # never a crash of its own
        stats = check_cache_consistent(folder)
        landed.append((kind, fired and res.rc == -9, stats))
        if res.rc == 0:
            break
    killed = [x for x in landed if x[1]]
    assert len(killed) >= KILLS - 1, landed
    inside = [x for x in landed if x[2]["unrecorded_bytes"] or x[2]["temp_files"]]
    assert inside, f"no kill landed inside a write: {landed}"
    assert not landed[-1][2]["complete"], "the 10th kill came after the cache was complete"

    res = zygote.run("precompute", path)
    assert res.rc == 0, str(res)
    assert not list(folder.rglob(".*.tmp")), "a rerun removes the temp files of killed writers"
    assert cache_files(folder) == cache_files(ref_folder)
    done_before = landed[-1][2]["records"]
    assert f"{120 - 4 * done_before} encoded now in {30 - done_before} shards" in res.out, res.out


def _rows_without_record(folder: Path) -> set[int]:
    """The shards whose rows are in vectors.npy while their done-record is not written (yet)."""
    try:
        build = json.loads((folder / "build.json").read_text())
        data = (folder / "vectors.npy").read_bytes()
    except (OSError, ValueError):
        return set()
    row_bytes, size = build["dim"] * 2, build["shard_size"]
    body = data[len(data) - build["rows"] * row_bytes :]
    return {
        index
        for index, start in enumerate(range(0, build["rows"], size))
        if not (folder / "shards" / f"shard-{index:05d}.json").exists()
        and any(body[start * row_bytes : (start + size) * row_bytes])
    }


def test_precompute_repairs_what_a_kill_inside_a_write_leaves(pre_reference, rel_models, zygote, tmp_path):
    """Shard bytes half written with no record, a record whose bytes are damaged, temp files: redone."""
    corpus, ref_folder = pre_reference
    cfg = experiment(tmp_path, rel_models, corpus)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    folder = Path(cfg["cache_dir"]) / "t1"
    shutil.copytree(ref_folder, folder)
    (folder / "manifest.json").unlink()
    vectors = np.load(folder / "vectors.npy", mmap_mode="r+")
    vectors[9:11] = 0  # shard 2: its second half never reached the disk (its record went too)
    (folder / "shards" / "shard-00002.json").unlink()
    vectors[20:24] = 7.0  # shard 5: bytes differ from what its record says
    vectors.flush()
    del vectors
    (folder / "shards" / "shard-00011.json").unlink()  # shard 11: bytes there, record never written
    (folder / "shards" / ".shard-00011.json.4242.tmp").write_text('{"index": 11')
    (folder / ".vectors.npy.4242.tmp").write_bytes(b"\x93NUMPY partial")
    (folder / ".manifest.json.4242.tmp").write_text("{")
    # the record of shard 5 lies: the check notices, and so must precompute
    with pytest.raises(AssertionError, match="bytes are not on disk"):
        check_cache_consistent(folder)

    res = zygote.run("precompute", path)
    assert res.rc == 0, str(res)
    assert "12 encoded now in 3 shards" in res.out, res.out
    assert cache_files(folder) == cache_files(ref_folder)


# ---------------------------------------------------------------------------------------------
# train


def _steps(run: Path, after: int) -> list[int]:
    """Global steps of the training rows in metrics.jsonl after step ``after``: a resumed run drops the
    rows past its checkpoint before it logs those steps again, so these rows are all new."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row and row["step"] > after:
            out.append(row["step"])
    return out


def _resume_step(run: Path) -> int:
    """The global step the next train of ``run`` resumes from (0: from the start)."""
    from stella_distill.run import checkpoint_step, list_checkpoints

    found = list_checkpoints(run)
    return checkpoint_step(found[-1]) if found else 0


def _train_plan(seed: int) -> list[tuple[str, float]]:
    """10 kill points: time (start-up: a forked run logs its first step after ~0.5 s), step (a logged
    step, then up to 80 ms: a step and its checkpoint take ~30 ms, two thirds of it writing), ckpt_tmp
    (the checkpoint write of the n-th step this run logged is in flight)."""
    rng = random.Random(seed)
    kinds = ["time"] * 2 + ["step"] * 5 + ["ckpt_tmp"] * 3
    rng.shuffle(kinds)
    targets = iter(sorted(rng.randint(1, 7) for _ in range(5)))
    plan = []
    for kind in kinds:
        if kind == "time":
            plan.append((kind, rng.uniform(0.05, 0.45)))
        elif kind == "step":
            plan.append((kind, next(targets)))
        else:
            plan.append((kind, rng.choice([1, 2])))
    return plan


def test_train_killed_10_times_resumes_to_identical_weights(train_reference, zygote, tmp_path):
    cfg, ref = train_reference
    run = tmp_path / "run"
    path = write_config(tmp_path / "cfg.yaml", {**cfg, "output_dir": str(run)})
    ckdir = run / "checkpoints"
    rng = random.Random(4321)

    def tmp_snapshot() -> set[tuple[str, int]]:
        if not ckdir.is_dir():
            return set()
        return {(p.name, p.stat().st_ino) for p in ckdir.iterdir() if p.name.endswith(".tmp")}

    def fresh_tmp(before: set) -> set:
        """Checkpoint temp folders this run created (a rerun re-creates a stale one under its name)."""
        try:
            return tmp_snapshot() - before
        except FileNotFoundError:  # renamed while we looked
            return set()

    landed = []
    for kind, value in _train_plan(77):
        resumes_at = _resume_step(run)
        before = tmp_snapshot()
        # every run meets a slow disk (each torch.save of a checkpoint then waits 0.5 s): ckpt_tmp kills
        # land while the checkpoint's temp folder is in flight, and no run (a resumed one with a single
        # step left, on an idle machine) can finish before its kill, loaded or not
        fault = {"kind": "torch_save_pause", "after": 0, "seconds": 0.5}
        job = zygote.start(["train", path], fault=fault)
        if kind == "time":
            fired = wait_for(_after(value), job)
        elif kind == "step":
            fired = wait_for(lambda v=value, n=resumes_at: any(s >= v for s in _steps(run, n)), job)
            time.sleep(rng.uniform(0, 0.08))
        else:
            fired = wait_for(
                lambda k=int(value), b=before, n=resumes_at: bool(fresh_tmp(b)) and len(_steps(run, n)) >= k,
                job,
                poll=0.0005,
            )
        job.kill()
        res = job.wait()
        inside = bool(fresh_tmp(before))  # the writer is dead and its temp folder was never renamed
        assert res.rc in (-9, 0), str(res)
        stats = check_checkpoints_consistent(run)
        landed.append((kind, value, fired and res.rc == -9, inside, stats))
        if res.rc == 0:
            break
    assert sum(1 for x in landed if x[2]) >= KILLS - 1, landed
    assert sum(1 for x in landed if x[3]) >= 2, f"no kill landed inside a checkpoint write: {landed}"
    assert not landed[-1][4]["final"], "the 10th kill came after training had finished"

    res = zygote.run("train", path)
    assert res.rc == 0, str(res)
    want, got = student_weights(ref / "final" / "student"), student_weights(run / "final" / "student")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-00000008", "step-00000009-end"]


def test_train_ignores_a_checkpoint_that_was_never_renamed(train_reference, zygote, tmp_path):
    """A complete-looking ``step-*.tmp`` and a folder without trainer_state.json are never resumed from."""
    cfg, ref = train_reference
    run = tmp_path / "run"
    staged = {**cfg, "output_dir": str(run), "stages": cfg["stages"][:1]}
    path = write_config(tmp_path / "cfg.yaml", staged)
    assert (res := zygote.run("train", path)).rc == 0, str(res)
    ckdir = run / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-00000002", "step-00000003-end"]
    shutil.rmtree(run / "final")
    # What a kill between the writes and the rename leaves: a whole checkpoint, still named .tmp,
    # that claims to be further along; and a folder that lost its state file.
    shutil.copytree(ckdir / "step-00000003-end", ckdir / "step-00000007.tmp")
    state = json.loads((ckdir / "step-00000007.tmp" / "trainer_state.json").read_text())
    (ckdir / "step-00000007.tmp" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 7}))
    shutil.copytree(ckdir / "step-00000003-end", ckdir / "step-00000008")
    (ckdir / "step-00000008" / "trainer_state.json").unlink()
    (ckdir / "step-00000003-end" / "trainer_state.json").unlink()  # the newest complete one is step 2
    (run / "metrics.jsonl").unlink()

    res = zygote.run("train", path)
    assert res.rc == 0, str(res)
    assert "resuming from" in res.out and "step-00000002" in res.out, res.out
    steps = _steps(run, 0)
    assert steps == [3], steps  # exactly the one step after the checkpoint
