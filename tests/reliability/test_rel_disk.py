"""Disk full and unwritable output: one clear line naming the path, finished work kept and usable.

Two ways to fill a disk: a real tmpfs of a few dozen KiB (needs permission to mount, as root in CI;
skipped otherwise) and, everywhere, a fault injected into the forked run (the fork server makes
``os.pwrite`` or ``torch.save`` fail with ENOSPC half-way). Read-only folders come from ``chmod`` when
not root and from a read-only tmpfs as root (root ignores permission bits). A path under a file
(``NotADirectoryError``) needs neither.

The trainer turns a failed write into one line naming the path (`train.writing`), removes the
half-written checkpoint folder and keeps the finished ones.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from rel_harness import (
    assert_user_error,
    cache_files,
    can_mount_tmpfs,
    check_cache_consistent,
    check_checkpoints_consistent,
    experiment,
    mount_tmpfs,
    remount_tmpfs,
    student_weights,
    umount,
    write_config,
)


@pytest.fixture(scope="module")
def mountable(tmp_path_factory) -> bool:
    return can_mount_tmpfs(tmp_path_factory.mktemp("mount-probe") / "m")


@contextlib.contextmanager
def tmpfs(where: Path, size: str, mountable: bool, readonly: bool = False):
    if not mountable:
        pytest.skip("no permission to mount a tmpfs here (CI runs as root and may)")
    mount_tmpfs(where, size, readonly=readonly)
    try:
        yield where
    finally:
        umount(where)


@contextlib.contextmanager
def read_only_dir(base: Path, mountable: bool):
    """A folder nobody may write to: chmod 555 for a normal user, a read-only tmpfs for root."""
    target = base / "read-only"
    if os.geteuid() != 0:
        target.mkdir(parents=True)
        target.chmod(0o555)
        try:
            yield target
        finally:
            target.chmod(0o755)
        return
    with tmpfs(target, "64k", mountable, readonly=True):
        yield target


# ---------------------------------------------------------------------------------------------
# precompute


def test_precompute_disk_full_in_a_shard_keeps_the_finished_shards(
    pre_reference, rel_models, zygote, tmp_path
):
    corpus, ref = pre_reference
    path = write_config(tmp_path / "cfg.yaml", experiment(tmp_path, rel_models, corpus))
    folder = tmp_path / "cache" / "t1"
    res = zygote.run("precompute", path, fault={"kind": "pwrite", "after": 5})
    assert_user_error(
        res,
        f"cache/t1: cannot write {folder / 'vectors.npy'}: No space left on device",
        "the 5 finished shards are kept",
        "rerun precompute to continue",
    )
    stats = check_cache_consistent(folder)
    assert (stats["records"], stats["complete"], stats["unrecorded_bytes"]) == (5, False, 1)
    # the trainer will not use the unfinished cache
    assert_user_error(zygote.run("train", path), "cache/t1", "incomplete (5 of 30 shards done)")
    res = zygote.run("precompute", path)
    assert res.rc == 0, str(res)
    assert "100 encoded now in 25 shards" in res.out, res.out
    assert cache_files(folder) == cache_files(ref)


def test_precompute_on_a_full_tmpfs_then_resume(pre_reference, rel_models, zygote, tmp_path, mountable):
    corpus, ref = pre_reference
    fs = tmp_path / "fs"
    with tmpfs(fs, "48k", mountable):
        cfg = experiment(tmp_path, rel_models, corpus, cache_dir=str(fs / "cache"))
        path = write_config(tmp_path / "cfg.yaml", cfg)
        folder = fs / "cache" / "t1"
        res = zygote.run("precompute", path)
        line = assert_user_error(res, f"cannot write {folder}", "No space left on device")
        stats = check_cache_consistent(folder)
        assert 0 < stats["records"] < 30 and not stats["complete"], (stats, line)
        assert stats["temp_files"] == 0, "a failed write removes its temp file"
        remount_tmpfs(fs, "4m")
        res = zygote.run("precompute", path)
        assert res.rc == 0, str(res)
        assert f"{30 - stats['records']} shards" in res.out
        assert cache_files(folder) == cache_files(ref)


def test_precompute_cache_dir_under_a_file(pre_reference, rel_models, zygote, tmp_path):
    corpus, _ = pre_reference
    (tmp_path / "afile").write_text("not a folder")
    cfg = experiment(tmp_path, rel_models, corpus, cache_dir=str(tmp_path / "afile" / "cache"))
    res = zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg))
    assert_user_error(res, "cache/t1: ", f"cannot write {tmp_path / 'afile' / 'cache'}: Not a directory")


def test_precompute_read_only_cache_dir(pre_reference, rel_models, zygote, tmp_path, mountable):
    corpus, _ = pre_reference
    with read_only_dir(tmp_path, mountable) as ro:
        cfg = experiment(tmp_path, rel_models, corpus, cache_dir=str(ro / "cache"))
        res = zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg))
        line = assert_user_error(res, f"cannot write {ro / 'cache'}")
        assert "Read-only file system" in line or "Permission denied" in line
        assert "teacher t1:" not in res.out  # it failed before encoding anything


# ---------------------------------------------------------------------------------------------
# train


@pytest.fixture(scope="module")
def train_disk_full(train_reference, zygote, tmp_path_factory):
    """A training run whose disk fills up while it writes its 2nd checkpoint (torch.save fails)."""
    cfg, _ = train_reference
    root = tmp_path_factory.mktemp("train-disk-full")
    path = write_config(root / "cfg.yaml", {**cfg, "output_dir": str(root / "run")})
    res = zygote.run("train", path, fault={"kind": "torch_save", "after": 3})
    return path, root / "run", res


def test_train_disk_full_keeps_the_last_checkpoint_and_resumes(train_reference, train_disk_full, zygote):
    _, ref = train_reference
    path, run, res = train_disk_full
    assert res.rc not in (0, -9), str(res)
    stats = check_checkpoints_consistent(run)
    # the half-written checkpoint folder is removed; the finished one stays
    assert stats["checkpoints"] == 1 and stats["tmp"] == 0 and not stats["final"], stats
    res = zygote.run("train", path)
    assert res.rc == 0, str(res)
    assert "resuming from" in res.out and "step-00000001" in res.out
    want, got = student_weights(ref / "final" / "student"), student_weights(run / "final" / "student")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_train_disk_full_is_one_line_naming_the_path(train_reference, tmp_path, zygote):
    cfg, _ = train_reference
    path = write_config(tmp_path / "cfg.yaml", {**cfg, "output_dir": str(tmp_path / "run")})
    res = zygote.run("train", path, fault={"kind": "torch_save", "after": 3})
    assert_user_error(res, str(tmp_path / "run" / "checkpoints"), "No space left on device")


def test_train_on_a_full_tmpfs_then_resume(train_reference, zygote, tmp_path, mountable):
    cfg, ref = train_reference
    fs = tmp_path / "fs"
    with tmpfs(fs, "1m", mountable):
        run = fs / "run"
        path = write_config(tmp_path / "cfg.yaml", {**cfg, "output_dir": str(run)})
        res = zygote.run("train", path)
        assert res.rc not in (0, -9), str(res)
        assert "No space left on device" in res.err, str(res)
        stats = check_checkpoints_consistent(run)
        assert stats["checkpoints"] >= 1 and not stats["final"], stats
        remount_tmpfs(fs, "64m")
        res = zygote.run("train", path)
        assert res.rc == 0, str(res)
        want, got = student_weights(ref / "final" / "student"), student_weights(run / "final" / "student")
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_train_output_dir_under_a_file(train_reference, zygote, tmp_path):
    cfg, _ = train_reference
    (tmp_path / "afile").write_text("not a folder")
    run = tmp_path / "afile" / "run"
    res = zygote.run("train", write_config(tmp_path / "cfg.yaml", {**cfg, "output_dir": str(run)}))
    assert_user_error(res, str(run), "Not a directory")


def test_train_read_only_output_dir(train_reference, zygote, tmp_path, mountable):
    cfg, _ = train_reference
    with read_only_dir(tmp_path, mountable) as ro:
        run = ro / "run"
        res = zygote.run("train", write_config(tmp_path / "cfg.yaml", {**cfg, "output_dir": str(run)}))
        assert_user_error(res, str(run))


# ---------------------------------------------------------------------------------------------
# export and evaluate


def test_export_out_under_a_file(train_reference, zygote, tmp_path):
    _, ref = train_reference
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "export"
    res = zygote.run("export", ref, "--out", out)
    assert_user_error(res, f"{out}: cannot write the export", "Not a directory")


def test_export_onto_a_read_only_disk_keeps_the_earlier_export(train_reference, zygote, tmp_path, mountable):
    _, ref = train_reference
    fs = tmp_path / "fs"
    with tmpfs(fs, "8m", mountable):
        out = fs / "export"
        assert (res := zygote.run("export", ref, "--out", out)).rc == 0, str(res)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        res = zygote.run("export", ref, "--out", out)
        assert_user_error(res, f"{out}: cannot write the export", "Read-only file system")
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_evaluate_out_under_a_file(train_reference, zygote, tmp_path):
    _, ref = train_reference
    export = tmp_path / "export"
    assert (res := zygote.run("export", ref, "--out", export)).rc == 0, str(res)
    (tmp_path / "afile").write_text("not a folder")
    res = zygote.run("evaluate", export, "--out", tmp_path / "afile" / "eval")
    assert_user_error(res, "--out: cannot create", "Not a directory")
    shutil.rmtree(export)
