"""The run folder: what lives where, checkpoints and resume positions, fingerprints, the metrics log.

Layout of ``output_dir``::

    config.yaml                        the resolved config of the last `train`
    metrics.jsonl                      one JSON row per logged step and per evaluation (main process)
    wandb/, logs/<project>/            the trackers of logging.report_to (metrics.py)
    checkpoints/step-00000500/         accelerate state, student/, config.yaml, trainer_state.json
    checkpoints/step-00000700-end/     the end of a stage (same content)
    final/student/, final/config.yaml, final/trainer_state.json    the trained student
    baseline.json, eval.json, timings.json      written by `stella-distill run`
    export/                            the default export folder

A folder is complete once its ``trainer_state.json`` exists: it is written last, in a temp folder that
is then renamed, so a killed job never leaves a folder that looks complete and is not.

Knows the folder, not the loop: the trainer, export, evaluation and the pipeline come here for names,
checkpoints and freshness. Uses config only (torch, and deepspeed for ZeRO checkpoints, are imported
where a checkpoint's weights are read, because they are heavy and the rest of the folder needs neither).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stella_distill.compat import compat, mismatch
from stella_distill.config import ExperimentConfig, dump_config, load_config
from stella_distill.errors import UserError, write_failure
from stella_distill.files import atomic_write, give_lock, json_digest, sha256_file, take_lock
from stella_distill.fingerprints import folder_sha256
from stella_distill.tables import read_json
from stella_distill.version import __version__

CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
BASELINE_FILE = "baseline.json"
TIMINGS_FILE = "timings.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
STUDENT = "student"
EXPORT = "export"
LOCK_FILE = ".stella-distill.lock"


# ---------------------------------------------------------------------------------------------
# Positions and fingerprints


@dataclass
class Position:
    """Where the run stands: stage, optimizer steps done in it, run-wide step."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    stage_complete: bool = False


def training_complete(cfg: ExperimentConfig, run_dir: Path) -> bool:
    """Whether ``run_dir/final`` holds the student this config trains (same fields, same stage count)."""
    state_file = Path(run_dir) / FINAL / STATE_FILE
    if not state_file.is_file():
        return False
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("stages") != len(cfg.stages):
        return False
    return mismatch(state, len(cfg.stages), state_file.parent / CONFIG_FILE, cfg) is None


# ---------------------------------------------------------------------------------------------
# Freshness of what `run` makes after training: fingerprints of what produced each output


def _inputs(paths: list[str]) -> list[tuple[str, str | None]]:
    """(path, content hash) of evaluation inputs: files by bytes, folders by every file (None: missing)."""
    out = []
    for p in paths:
        path = Path(str(p).partition("::")[0]).expanduser()
        digest = sha256_file(path) if path.is_file() else folder_sha256(path) if path.is_dir() else None
        out.append((str(p), digest))
    return out


def export_fingerprint(cfg: ExperimentConfig, run_dir: Path) -> str:
    """What the run's export is made from: the final student's files and the export settings."""
    final = Path(run_dir) / FINAL
    return json_digest("export", folder_sha256(final / STUDENT), cfg.to_dict()["export"], __version__)


def eval_fingerprint(cfg: ExperimentConfig, export_fp: str) -> str:
    """What the run's evaluation is made from: the export, the evaluation settings and input files."""
    ev = cfg.to_dict()["evaluate"]
    return json_digest("evaluate", export_fp, ev, _inputs(ev["sts"] + ev["retrieval"]), __version__)


def baseline_fingerprint(cfg: ExperimentConfig) -> str:
    """What the scores before training are made from: student, teachers, length, seed, STS files."""
    d = cfg.to_dict()
    return json_digest(
        "baseline",
        d["student"],
        d["teachers"],
        d["data"]["max_length"],
        d["seed"],
        _inputs(d["evaluate"]["sts"]),
    )


def made_from(path: Path) -> str | None:
    """The fingerprint a JSON output of ours records under ``made_from`` (None: none, or no file)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("made_from") if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def writing(path: Path, tmp: Path | None = None):
    """Turn a failed write (disk full, read-only, not a folder) into a one-line UserError naming
    ``path``; a half-written ``tmp`` folder is removed so it can never be taken as complete."""
    try:
        yield
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = shutil.disk_usage(path.parent if not path.exists() else path).free / 2**20
            space = f"; {free:.0f} MiB free there"
        except OSError:
            space = ""
        raise UserError(f"{path}: cannot write ({reason}){space}; finished checkpoints are kept") from None


def _publish(tmp: Path, final: Path, cfg: ExperimentConfig, state: dict) -> None:
    """Write the config and the state file into ``tmp`` (the state last: it marks the folder complete,
    and holds the config's compat digests and checksum) and rename it to ``final``."""
    dump_config(cfg, tmp / CONFIG_FILE)
    state = {**state, "compat": compat(cfg), "config_sha256": sha256_file(tmp / CONFIG_FILE)}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ---------------------------------------------------------------------------------------------
# One process at a time


def hold_lock(run_dir: Path, what: str) -> bool:
    """Take the run folder's lock for this process, or refuse with one line; False if this process
    already held it (the caller that took it gives it back). See ``files.take_lock``."""
    run_dir = Path(run_dir).resolve()
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        taken, holder = take_lock(run_dir / LOCK_FILE, f"stella-distill {what}")
    if holder is not None:
        raise UserError(
            f"{run_dir}: in use by {holder}; wait for it to finish, or give this run another output_dir"
        )
    return taken


def release_lock(run_dir: Path) -> None:
    """Give the run folder's lock back (a no-op if this process does not hold it)."""
    give_lock(Path(run_dir).resolve() / LOCK_FILE)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dir(run_dir: Path, pos: Position) -> Path:
    """The folder of the checkpoint at ``pos``: ``checkpoints/step-NNNNNNNN`` (``-end`` at a stage's end)."""
    return (
        Path(run_dir) / CHECKPOINTS / (f"step-{pos.global_step:08d}" + ("-end" if pos.stage_complete else ""))
    )


def temp_dir(final: Path) -> Path:
    """Where a folder is written before it is renamed to ``final``."""
    return final.with_name(final.name + ".tmp")


def finish_checkpoint(tmp: Path, final: Path, cfg: ExperimentConfig, pos: Position, world_size: int) -> None:
    """Add the config and the trainer state to a checkpoint written into ``tmp``; publish it as ``final``."""
    state = {**pos.__dict__, "stage_name": cfg.stages[pos.stage_index].name, "world_size": world_size}
    _publish(tmp, final, cfg, state)


def save_final(
    run_dir: Path, cfg: ExperimentConfig, global_step: int, save_student: Callable[[Path], Any]
) -> Path:
    """Write ``final/``: ``save_student(folder)`` fills ``final.tmp/student``, then the state; renamed last."""
    final = Path(run_dir) / FINAL
    tmp = temp_dir(final)
    with writing(final, tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        save_student(tmp / STUDENT)
        _publish(tmp, final, cfg, {"global_step": global_step, "stages": len(cfg.stages)})
    return final


def checkpoint_step(ckpt: Path) -> int:
    """The global step a checkpoint (or ``final/``) was saved at."""
    try:
        return int(json.loads((ckpt / STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{ckpt / STATE_FILE}: unreadable checkpoint state ({type(exc).__name__}: {exc}); "
            f"delete that checkpoint folder to resume from an earlier one"
        ) from None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a folder without its state file is ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(run_dir: Path, keep: int, current: Path) -> None:
    """Keep the ``keep`` newest complete checkpoints; remove temp and half-deleted folders of killed runs."""
    for old in list_checkpoints(run_dir)[:-keep]:
        if old == current:  # never the checkpoint just written, whatever else the folder holds
            continue
        (old / STATE_FILE).unlink()  # first, so a half-deleted folder is never listed as complete
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / CHECKPOINTS).iterdir():
        if stale.is_dir() and stale != current and not (stale / STATE_FILE).is_file():
            shutil.rmtree(stale, ignore_errors=True)


def check_resumable(ckpt: Path, cfg: ExperimentConfig) -> dict:
    """Read a checkpoint's state and refuse it if it was made by an incompatible config."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{ckpt / STATE_FILE}: unreadable checkpoint state ({exc})") from None
    fields = {
        "stage_index": int,
        "stage_step": int,
        "global_step": int,
        "stage_complete": bool,
        "compat": dict,
    }
    wrong = (
        [k for k, tp in fields.items() if not isinstance(state.get(k), tp)]
        if isinstance(state, dict)
        else ["all"]
    )
    if wrong:
        raise UserError(
            f"{ckpt / STATE_FILE}: not the state of a stella-distill checkpoint (missing or wrong: "
            f"{', '.join(wrong)}); delete that folder to resume from an earlier one"
        )
    if min(state["stage_index"], state["stage_step"], state["global_step"]) < 0:
        raise UserError(
            f"{ckpt / STATE_FILE}: negative positions; delete that folder to resume from an earlier one"
        )
    found = mismatch(state, state["stage_index"] + 1, ckpt / CONFIG_FILE, cfg)
    if found is not None:
        named = "; ".join(found.fields[:3]) + ("; ..." if len(found.fields) > 3 else "")
        if found.part == "stages":
            raise UserError(
                f"stages.{found.stage}: differs from the checkpoint {ckpt} (the stage list changed after it "
                f"was started{': ' + named if named else ''}); restore the stage or use a new output_dir"
            )
        what = "student/teachers/seed config" if found.part == "model" else "data config (data.*)"
        fresh = f", or move {ckpt.parent} away to start afresh" if found.part == "model" else ""
        raise UserError(
            f"{ckpt}: checkpoint was made with another {what}{f' ({named})' if named else ''}; "
            f"use a new output_dir{fresh}"
        )
    return state


def resume_point(cfg: ExperimentConfig, run_dir: Path, world_size: int = 1) -> tuple[Path | None, Position]:
    """The checkpoint ``train.resume`` asks for (``auto``: the newest complete one) and its position.

    A stage resumed mid-way must run on as many processes as it started with: its global batches are
    ``batch_size x world_size`` rows of a seeded order, so another count would feed it other rows."""
    if cfg.train.resume is None:
        return None, Position()
    if cfg.train.resume == "auto":
        found = list_checkpoints(run_dir)
        if not found:
            return None, Position()
        ckpt = found[-1]
    else:
        ckpt = Path(cfg.train.resume)
        if not (ckpt / STATE_FILE).is_file():
            raise UserError(f"train.resume: {ckpt} is not a checkpoint folder (no {STATE_FILE})")
    if (ckpt / STUDENT).is_dir() and ckpt.name == FINAL:
        raise UserError(
            f"train.resume: {ckpt} is the finished student of a run, not a checkpoint; resume from one of "
            f"{ckpt.parent / CHECKPOINTS}/step-*, or export {ckpt.parent}"
        )
    state = check_resumable(ckpt, cfg)
    if state["stage_index"] >= len(cfg.stages):
        raise UserError(
            f"train.resume: {ckpt} is at stage {state['stage_index']} but the config has fewer stages"
        )
    pos = Position(state["stage_index"], state["stage_step"], state["global_step"], state["stage_complete"])
    saved_by = state.get("world_size")
    if not pos.stage_complete and isinstance(saved_by, int) and saved_by != world_size:
        raise UserError(
            f"{ckpt}: saved in the middle of stage {pos.stage_index} by {saved_by} process(es); this job has "
            f"{world_size}. Relaunch with {saved_by} to resume exactly, or resume from a stage's end "
            f"(checkpoints/step-*-end)"
        )
    return ckpt, pos


# ---------------------------------------------------------------------------------------------
# The metrics log and the evaluation record


def truncate_metrics(run_dir: Path, global_step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` logged after ``global_step`` (a resumed run logs them again,
    so no step is ever recorded twice); returns how many were dropped. Rewritten atomically."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed run
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or step <= global_step:
            kept.append(line)
    if len(kept) != len(lines):
        with writing(path):
            atomic_write(path, "".join(line + "\n" for line in kept).encode("utf-8"))
    return len(lines) - len(kept)


def read_metrics(run_dir: str | Path | None) -> list[dict]:
    """Rows of ``run_dir/metrics.jsonl`` (a torn last line of a killed run is skipped)."""
    if run_dir is None or not (Path(run_dir) / METRICS_FILE).is_file():
        return []
    rows = []
    for line in (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def last_eval_row(rows: list[dict]) -> dict:
    """The ``eval/...`` values of the last row that has any (the end of the last evaluated stage)."""
    for row in reversed(rows):
        values = {k: v for k, v in row.items() if k.startswith("eval/")}
        if values:
            return {"step": row.get("step"), "stage": row.get("stage"), **values}
    return {}


def summarize_training(rows: list[dict]) -> dict:
    """What the card shows of ``metrics.jsonl``: world size, last step and loss per stage, final eval."""
    world = next((r["world_size"] for r in reversed(rows) if isinstance(r.get("world_size"), int)), None)
    stages: dict[str, dict] = {}
    for r in rows:
        i = r.get("stage_index")
        if isinstance(i, int) and isinstance(r.get("step"), int):
            stage = stages.setdefault(str(i), {"last_step": 0, "last_loss": None})
            stage["last_step"] = max(stage["last_step"], r["step"])
            if isinstance(r.get("loss"), (int, float)):
                stage["last_loss"] = r["loss"]
    return {"world_size": world, "stages": stages, "final_eval": last_eval_row(rows)}


def find_eval(*folders: Path | None) -> dict | None:
    """The first ``eval.json`` found in ``folders``."""
    for folder in folders:
        if folder is not None and (Path(folder) / EVAL_FILE).is_file():
            return read_json(Path(folder) / EVAL_FILE)
    return None


# ---------------------------------------------------------------------------------------------
# Finding the weights to export


@dataclass
class Source:
    """Where the weights to export come from."""

    run_dir: Path | None  # run folder (config.yaml, metrics.jsonl, eval.json), if known
    checkpoint: Path  # the folder that holds the weights (final/, checkpoints/<name>/ or a student folder)
    student_dir: Path | None  # a StudentModel.save_pretrained folder, or None for a sharded/plain state
    config: Any  # ExperimentConfig or None
    step: int | None  # global optimizer step of the weights
    label: str  # human-readable origin, for logs, the card and the commit message


def _is_student(path: Path) -> bool:
    return (path / "student.json").is_file()


def _config_near(*folders: Path | None) -> ExperimentConfig | None:
    for folder in folders:
        if folder is not None and (folder / CONFIG_FILE).is_file():
            return load_config(folder / CONFIG_FILE, resolve_models=False)  # written resolved
    return None


def find_source(path: str | Path) -> Source:
    """Resolve what ``export`` reads from ``path``.

    ``path`` may be a run folder (its ``final/student``, else the newest checkpoint by
    ``trainer_state.json`` global step: that checkpoint's ``student/``, else its accelerate state,
    sharded or not, which is consolidated), one checkpoint folder, ``final/``, or a student folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: run folder not found")
    if _is_student(path) and path.name == STUDENT and (path.parent / STATE_FILE).is_file():
        return find_source(path.parent)  # final/student or checkpoints/<name>/student: keep the run context
    if _is_student(path):
        return Source(
            None, path, path, _config_near(path.parent, path.parent.parent), None, f"student {path}"
        )
    if (path / FINAL / STUDENT).is_dir():
        ckpt, run_dir = path / FINAL, path
    elif (path / CHECKPOINTS).is_dir():
        found = list_checkpoints(path)
        if not found:
            raise UserError(
                f"{path}: the run has no final/student and no complete checkpoint under checkpoints/"
            )
        run_dir, ckpt = path, found[-1]
    else:
        ckpt = path
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
        if not (run_dir / METRICS_FILE).is_file() and not (run_dir / CONFIG_FILE).is_file():
            run_dir = None
    step = checkpoint_step(ckpt) if (ckpt / STATE_FILE).is_file() else None
    config = _config_near(ckpt, run_dir)
    label = "final" if ckpt.name == FINAL else f"checkpoint {ckpt.name}"
    if step is not None:
        label += f" (step {step})"
    if _is_student(ckpt / STUDENT):
        return Source(run_dir, ckpt, ckpt / STUDENT, config, step, label)
    if find_state_files(ckpt) is None:
        raise UserError(
            f"{ckpt}: no student/ folder and no model state (model.safetensors, pytorch_model_fsdp_0/, "
            f"a DeepSpeed folder with *model_states.pt) to export"
        )
    return Source(run_dir, ckpt, None, config, step, label)


def find_state_files(ckpt: Path) -> tuple[str, Path] | None:
    """``(kind, path)`` of the model state an accelerate checkpoint holds, or None.

    kinds: ``safetensors`` / ``torch`` (a full state dict file: plain, DDP or FSDP FULL_STATE_DICT),
    ``dcp`` (FSDP SHARDED_STATE_DICT, torch.distributed.checkpoint folder), ``deepspeed`` (ZeRO).
    """
    if (ckpt / "model.safetensors").is_file():
        return "safetensors", ckpt / "model.safetensors"
    for name in ("pytorch_model.bin", "pytorch_model_fsdp.bin", "pytorch_model_fsdp_0.bin"):
        if (ckpt / name).is_file():
            return "torch", ckpt / name
    if (ckpt / ".metadata").is_file():
        return "dcp", ckpt
    for sub in sorted(ckpt.glob("pytorch_model_fsdp_*")):
        if (sub / ".metadata").is_file():
            return "dcp", sub
    for sub in sorted(p for p in ckpt.iterdir() if p.is_dir()):
        if any(sub.glob("*model_states.pt")):
            return "deepspeed", sub
    return None


def _clean_keys(state: dict) -> dict:
    # accelerate nests a DCP model state as {"model": {...}}; wrappers add prefixes to every name.
    if len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    out = {}
    for key, value in state.items():
        for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
            key = key.replace(wrapper, "")
        if key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def consolidate_state_dict(ckpt: str | Path) -> dict:
    """The full (gathered) model state dict stored in an accelerate checkpoint folder.

    FSDP ``SHARDED_STATE_DICT`` checkpoints are read with ``torch.distributed.checkpoint`` in this
    one process (no process group needed); DeepSpeed ZeRO checkpoints with deepspeed's
    ``zero_to_fp32`` (fp32 master weights), which needs ``deepspeed`` importable.
    """
    import torch

    ckpt = Path(ckpt)
    found = find_state_files(ckpt)
    if found is None:
        raise UserError(f"{ckpt}: no model state found to consolidate")
    kind, where = found
    if kind == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(where))
    elif kind == "torch":
        state = torch.load(where, map_location="cpu", weights_only=True)
    elif kind == "dcp":
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory(prefix="stella-distill-dcp-") as tmp:
            merged = Path(tmp) / "merged.pt"
            try:
                dcp_to_torch_save(str(where), str(merged))
            except Exception as exc:  # torch raises CheckpointException and friends for broken folders
                raise UserError(f"{where}: cannot read the sharded (DCP) checkpoint: {exc}") from None
            state = torch.load(merged, map_location="cpu", weights_only=True)
    else:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise UserError(
                f"{where}: a DeepSpeed ZeRO checkpoint; consolidating it needs deepspeed "
                f"(pip install deepspeed), or export a checkpoint that has a student/ folder"
            ) from None
        state = get_fp32_state_dict_from_zero_checkpoint(str(where.parent), tag=where.name)
    return _clean_keys(dict(state))
