"""Shared helpers of the reliability suite: the fork-server client, tiny runs, cache and checkpoint checks."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from helpers import apply_overrides
from helpers import cache_files as cache_files  # the suite imports it from here

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ZYGOTE = HERE / "rel_zygote.py"
# A Hub token in the environment of every run the suite makes; the security tests look for it in
# every file those runs write.
TOKEN = "hf_sentinelRELIABILITYxq7Zk2Wm9TbV4nLp"


def base_env(**extra: str) -> dict[str, str]:
    """Environment of every child run: offline, one thread, the sentinel Hub token."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANDB_", "PYTEST_")) and k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    }
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_TOKEN": TOKEN,
            "HUGGING_FACE_HUB_TOKEN": TOKEN,
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        }
    )
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# The fork server


@dataclass
class Result:
    """How one CLI run ended: exit code (negative: killed by that signal), stdout, stderr."""

    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.rc}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


class Job:
    """One forked CLI run in flight."""

    def __init__(self, zygote: Zygote, pid: int, out: Path, err: Path):
        self.zygote, self.pid, self.out, self.err = zygote, pid, out, err
        self.result: Result | None = None

    def running(self) -> bool:
        if self.result is not None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # a finished child stays a zombie until the zygote reaps it
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().split(") ")[-1][:1] != "Z"
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the run (no-op if it already ended)."""
        if self.result is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float = 300) -> Result:
        if self.result is None:
            msg = self.zygote._next(timeout)
            self.zygote.current = None
            self.result = Result(msg["rc"], _read(self.out), _read(self.err))
        return self.result


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:  # killed before it opened its output files
        return ""


class Zygote:
    """Client of rel_zygote.py: ``run(argv)`` forks a pre-imported process running the CLI."""

    def __init__(self, env: dict[str, str], workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.workdir / "zygote.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ZYGOTE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=str(REPO),
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()
        self.count = 0
        self.current: Job | None = None
        self._next(240)  # {"ready": pid}

    def _reader(self) -> None:
        try:
            for line in self.proc.stdout:
                if line.startswith("{"):
                    self.lines.put(json.loads(line))
        except ValueError:  # a torn line: the server is broken, say so instead of hanging
            pass
        self.lines.put(None)

    def _next(self, timeout: float) -> dict:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            if self.current is not None:
                self.current.kill()
            raise TimeoutError(f"the fork server gave no answer in {timeout} s") from None
        if msg is None:
            raise RuntimeError(f"the fork server died; see {self.workdir / 'zygote.log'}")
        return msg

    def start(
        self, argv: list[str], *, cwd: Path | None = None, env: dict | None = None, fault: dict | None = None
    ) -> Job:
        """Fork a child running ``stella-distill ARGV``; returns at once."""
        if self.current is not None:  # a test that failed half-way left its run behind
            self.current.kill()
            self.current.wait()
        self.count += 1
        out = self.workdir / f"job-{self.count:04d}.out"
        err = self.workdir / f"job-{self.count:04d}.err"
        job = {"argv": [str(a) for a in argv], "cwd": str(cwd or REPO), "out": str(out), "err": str(err)}
        if env:
            job["env"] = env
        if fault:
            job["fault"] = fault
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.current = Job(self, self._next(60)["pid"], out, err)
        return self.current

    def run(self, *argv: str | Path, timeout: float = 300, **kwargs) -> Result:
        """Run ``stella-distill ARGV`` to the end and return how it ended."""
        return self.start([str(a) for a in argv], **kwargs).wait(timeout)

    def close(self) -> None:
        if self.current is not None:
            self.current.kill()
            self.current.wait(60)
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def python_m(*args: str | Path, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """``python -m stella_distill ARGS`` in a fresh interpreter (the literal entry point)."""
    proc = subprocess.run(
        [sys.executable, "-m", "stella_distill", *map(str, args)],
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(cwd or REPO),
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_user_error(res: Result, *needles: str) -> str:
    """Exit 2, no traceback, one error line on stderr that contains every needle; returns that line."""
    assert res.rc == 2, str(res)
    assert "Traceback" not in res.err, str(res)
    lines = [line for line in res.err.splitlines() if ": error: " in line]
    assert len(lines) == 1, str(res)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Tiny experiments


def corpus_lines(n: int, seed: int = 0, exclude: tuple[str, ...] = ()) -> list[str]:
    """``n`` distinct random texts of 3-14 words over the tiny vocabulary."""
    from tiny import WORDS

    words = [w for w in WORDS if w not in exclude]
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        if line not in seen:
            seen.add(line)
            out.append(line)
    return out


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def experiment(root: Path, models: dict, corpus: Path, **over) -> dict:
    """A tiny 3-stage experiment (3 steps each, checkpoint every step) as plain YAML data."""
    cfg = {
        "name": "rel",
        "output_dir": str(root / "run"),
        "cache_dir": str(root / "cache"),
        "seed": 5,
        "data": {"train": [{"path": str(corpus)}], "max_length": 32, "eval_limit": 8},
        "teachers": [{"name": "t1", "model": str(models["teacher"]), "pooling": "mean", "shard_size": 4}],
        "student": {"model": str(models["student"]), "pooling": "mean", "mrl": {"mode": "heads", "dims": [16]}},
        "stages": [
            {"name": "head", "trainable": "head", "steps": 3, "batch_size": 8, "lr": 1e-3},
            {"name": "last", "trainable": "last_layers", "last_layers": 1, "steps": 3, "batch_size": 8, "lr": 1e-3},
            {"name": "all", "trainable": "all", "steps": 3, "batch_size": 8, "lr": 1e-3, "mrl": True},
        ],
        "train": {"checkpoint_every": 1, "keep_checkpoints": 2, "log_every": 1},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }  # fmt: skip
    return apply_overrides(cfg, over)


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# What a run leaves on disk


def check_cache_consistent(folder: Path) -> dict:
    """What a killed or failed precompute left must never pass for more than it is.

    - with manifest.json: the cache opens, every shard checksum verified;
    - without: opening it is refused as incomplete (or absent);
    - every shard record present describes bytes that are really on disk (a shard written half is
      never recorded as done);
    - stray files are only the writers' temp files (``.*.tmp``), which are never read.

    Returns counts for the caller's report: records, temp files, shards with bytes but no record.
    """
    import numpy as np

    from stella_distill import cache as cache_lib
    from stella_distill.cache import CacheError, TeacherCache

    folder = Path(folder)
    stats = {"records": 0, "temp_files": 0, "unrecorded_bytes": 0, "complete": False}
    if not folder.exists():
        return stats
    if (folder / "manifest.json").is_file():
        TeacherCache(folder, verify=True)
        stats["complete"] = True
    else:
        try:
            TeacherCache(folder, verify=True)
        except CacheError as exc:
            assert "incomplete" in str(exc) or "no teacher cache" in str(exc), str(exc)
        else:
            raise AssertionError(f"{folder}: opened without a manifest")
    known = {"build.json", "row_hashes.npy", "vectors.npy", "manifest.json", "shards"}
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            stats["temp_files"] += 1
        else:
            assert p.name in known, f"unexpected file {p}"
    build = cache_lib._read_build(folder)
    shards = folder / "shards"
    records = sorted(shards.glob("shard-*.json")) if shards.is_dir() else []
    stats["temp_files"] += len(list(shards.glob(".*.tmp"))) if shards.is_dir() else 0
    if build is None:
        assert not records, "shard records without build.json"
        return stats
    bounds = cache_lib.shard_bounds(int(build["rows"]), int(build["shard_size"]))
    recorded = set()
    for p in records:
        index = int(p.stem.split("-")[1])
        start, stop = bounds[index]
        record = cache_lib._read_shard_record(folder, index, start, stop, check_bytes=True)
        assert record is not None, f"{p}: a shard record whose bytes are not on disk"
        recorded.add(index)
    stats["records"] = len(recorded)
    vectors = folder / "vectors.npy"
    if vectors.is_file():
        try:
            arr = np.load(vectors, mmap_mode="r")
        except ValueError:
            arr = None
        if arr is not None and arr.shape[0] == int(build["rows"]):
            stats["unrecorded_bytes"] = sum(
                1 for i, (a, b) in enumerate(bounds) if i not in recorded and np.asarray(arr[a:b]).any()
            )
    return stats


CHECKPOINT_FILES = (
    "trainer_state.json",
    "config.yaml",
    "model.safetensors",
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
    "student/student.json",
    "student/heads.safetensors",
    "student/backbone/model.safetensors",
    "student/backbone/config.json",
)


def check_checkpoints_consistent(run: Path) -> dict:
    """What a killed trainer left: the checkpoint resume would pick is whole; ``.tmp`` is never picked.

    Returns counts for the caller's report: listed checkpoints and ``.tmp`` folders present.
    """
    from safetensors import safe_open

    from stella_distill.run import list_checkpoints

    run = Path(run)
    listed = list_checkpoints(run)
    stats = {"checkpoints": len(listed), "tmp": 0, "final": (run / "final").is_dir()}
    root = run / "checkpoints"
    if root.is_dir():
        stats["tmp"] = sum(1 for p in root.iterdir() if p.name.endswith(".tmp"))
    assert not any(p.name.endswith(".tmp") for p in listed)
    if listed:
        newest = listed[-1]
        for name in CHECKPOINT_FILES:
            assert (newest / name).is_file(), f"{newest} is listed as complete but lacks {name}"
        for name in ("model.safetensors", "student/heads.safetensors", "student/backbone/model.safetensors"):
            with safe_open(str(newest / name), "pt") as f:
                assert list(f.keys())
        state = json.loads((newest / "trainer_state.json").read_text())
        assert {"stage_index", "stage_step", "global_step", "compat"} <= state.keys()
    if stats["final"]:
        assert (run / "final" / "trainer_state.json").is_file()
        assert (run / "final" / "student" / "heads.safetensors").is_file()
    return stats


def student_weights(folder: Path) -> dict:
    """Every tensor of a saved student (backbone and heads)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(folder / "backbone" / "model.safetensors"))
    weights.update({f"heads.{k}": v for k, v in load_file(str(folder / "heads.safetensors")).items()})
    return weights


def wait_for(predicate, job: Job, timeout: float = 120, poll: float = 0.001) -> bool:
    """Poll ``predicate()`` until it holds (True) or the job ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if not job.running():
            return predicate()
        time.sleep(poll)
    raise TimeoutError("the condition did not come true in time")


def can_mount_tmpfs(where: Path) -> bool:
    """True if this process may mount a tmpfs (root with CAP_SYS_ADMIN, as in CI)."""
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if ok.returncode != 0:
        return False
    subprocess.run(["umount", str(where)], capture_output=True)
    return True


def mount_tmpfs(where: Path, size: str, readonly: bool = False) -> None:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True, capture_output=True)


def remount_tmpfs(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)
