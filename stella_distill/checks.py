"""Cross-field checks of an experiment config, run when it loads, before any work.

Single fields are typed and converted by ``configfile``; the rules here relate fields to each other
(dims to dims, folders to folders, stages to the student) and to ranges no type expresses (finite,
positive, a seed numpy takes, a file name a file system takes). Every failure is a
:class:`ConfigError` naming the dotted field. ``check_teacher_dims`` runs again when the teachers'
dims become known (from their files at load time, from their caches when training starts).

This module must stay light: no torch.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING

from stella_distill.configfile import show
from stella_distill.errors import ConfigError

if TYPE_CHECKING:
    from stella_distill.config import ExperimentConfig

HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# cache_dir/<teacher.name> is a teacher's cache; this name is the corpus table's (data.py), not a teacher's
CORPUS_FOLDER = "corpus"


def _positive(value: float | int | None, path: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}; got {show(value)}")


MAX_SEED = 2**32 - 1  # numpy's and every framework's seed range
MAX_NAME_BYTES = 255  # the longest file name Linux and macOS file systems take
# Folders and files of a run folder; a teacher's cache folder must not be one of them.
RUN_FOLDER_NAMES = ("checkpoints", "final", "export", "config.yaml", "metrics.jsonl")


def _path(value: str | None, path: str) -> None:
    """A path the user gave: not blank, and no component longer than a file system takes."""
    if value is None:
        return
    if not value.strip():
        raise ConfigError(f"{path}: must not be empty")
    for part in Path(value).parts:
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise ConfigError(
                f"{path}: the name {show(part)} is {len(part.encode('utf-8'))} bytes; file systems take "
                f"at most {MAX_NAME_BYTES}"
            )


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_folders(cfg: ExperimentConfig) -> None:
    """The run folder and the teacher caches must not overlap: one would overwrite the other."""
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    cache_dir = Path(cfg.cache_dir).expanduser().resolve()
    if run_dir == cache_dir:
        raise ConfigError(
            f"cache_dir: is output_dir ({cfg.output_dir}); the run folder (checkpoints, final, export) and the "
            f"teacher caches need folders of their own"
        )
    if _inside(run_dir, cache_dir / CORPUS_FOLDER):
        raise ConfigError(
            f"output_dir: {cfg.output_dir} lies inside cache_dir/{CORPUS_FOLDER}, the corpus table's folder"
        )
    for i, t in enumerate(cfg.teachers):
        folder = cache_dir / t.name
        if _inside(run_dir, folder):
            raise ConfigError(
                f"output_dir: {cfg.output_dir} lies inside the cache of teachers.{i} ({folder})"
            )
        if any(_inside(folder, run_dir / name) for name in RUN_FOLDER_NAMES):
            raise ConfigError(
                f"teachers.{i}.name: its cache folder {folder} would be part of the run folder {cfg.output_dir}"
            )


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-field checks that single-field typing cannot express, section by section."""
    if not cfg.name.strip():
        raise ConfigError("name: must not be empty")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed: must be in [0, {MAX_SEED}]; got {cfg.seed}")
    for value, where in ((cfg.output_dir, "output_dir"), (cfg.cache_dir, "cache_dir"), (cfg.export.out_dir, "export.out_dir")):  # fmt: skip
        _path(value, where)
    _check_data(cfg)
    _check_teachers(cfg)
    _check_student(cfg)
    _check_stages(cfg)
    _check_train_and_logging(cfg)
    _check_export_and_evaluate(cfg)
    check_dims(cfg, cfg.student.target_dim if cfg.student is not None else None)
    _check_folders(cfg)
    return cfg


def _check_data(cfg: ExperimentConfig) -> None:
    _positive(cfg.data.limit, "data.limit")
    _positive(cfg.data.max_length, "data.max_length")
    _positive(cfg.data.eval_limit, "data.eval_limit")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1); got {cfg.data.eval_fraction!r}")
    for i, src in enumerate(cfg.data.train):
        _path(src.path, f"data.train.{i}.path")
        _positive(src.limit, f"data.train.{i}.limit")


def _check_teachers(cfg: ExperimentConfig) -> None:
    if not cfg.teachers:
        raise ConfigError("teachers: at least one teacher is required")
    seen: dict[str, int] = {}
    for i, t in enumerate(cfg.teachers):
        if (
            not t.name.strip()
            or "/" in t.name
            or "\\" in t.name
            or t.name.startswith(".")
            or any(ord(c) < 32 for c in t.name)
        ):
            raise ConfigError(
                f"teachers.{i}.name: must be a folder name without '/' or control characters that does not "
                f"start with '.'; got {show(t.name)}"
            )
        _path(t.name, f"teachers.{i}.name")
        if t.name in seen:
            raise ConfigError(
                f"teachers.{i}.name: duplicate teacher name {t.name!r} (also teachers.{seen[t.name]})"
            )
        if t.name == CORPUS_FOLDER:
            raise ConfigError(
                f"teachers.{i}.name: {t.name!r} is reserved: cache_dir/{CORPUS_FOLDER} holds the corpus table"
            )
        seen[t.name] = i
        _path(t.model, f"teachers.{i}.model")
        for j, dense in enumerate(t.dense if isinstance(t.dense, list) else [t.dense]):
            _path(dense, f"teachers.{i}.dense" + (f".{j}" if isinstance(t.dense, list) else ""))
        for key in ("max_length", "batch_tokens", "max_batch_size", "shard_size"):
            _positive(getattr(t, key), f"teachers.{i}.{key}")


def _check_student(cfg: ExperimentConfig) -> None:
    st = cfg.student
    if st is None:
        if cfg.stages:
            raise ConfigError("student: required when stages are given")
        return
    _path(st.model, "student.model")
    if st.keep_layers is not None:
        if not st.keep_layers:
            raise ConfigError("student.keep_layers: must list at least one layer (or be null)")
        if any(layer < 0 for layer in st.keep_layers):
            raise ConfigError(f"student.keep_layers: layer indices must be >= 0; got {st.keep_layers}")
        if len(set(st.keep_layers)) != len(st.keep_layers):
            raise ConfigError(f"student.keep_layers: duplicated layer index in {st.keep_layers}")
        if st.keep_layers != sorted(st.keep_layers):
            raise ConfigError(f"student.keep_layers: must be increasing; got {st.keep_layers}")
    _positive(st.target_dim, "student.target_dim")
    dims = st.mrl.dims
    for j, d in enumerate(dims):
        _positive(d, f"student.mrl.dims.{j}")
    if len(set(dims)) != len(dims):
        raise ConfigError(f"student.mrl.dims: duplicated dim in {dims}")
    if dims not in (sorted(dims), sorted(dims, reverse=True)):
        raise ConfigError(f"student.mrl.dims: must be sorted (increasing or decreasing); got {dims}")
    if st.target_dim is not None and dims and max(dims) > st.target_dim:
        raise ConfigError(
            f"student.mrl.dims: dim {max(dims)} is larger than student.target_dim {st.target_dim}"
        )
    if dims and st.mrl.mode == "none":
        raise ConfigError("student.mrl.mode: is 'none' but student.mrl.dims lists dims")


def _check_stages(cfg: ExperimentConfig) -> None:
    names: dict[str, int] = {}
    most = cfg.data.limit  # the most texts the corpus limits allow
    if most is None and cfg.data.train and all(src.limit is not None for src in cfg.data.train):
        most = sum(src.limit for src in cfg.data.train)
    for i, s in enumerate(cfg.stages):
        p = f"stages.{i}"
        if s.name in names:
            raise ConfigError(f"{p}.name: duplicate stage name {s.name!r} (also stages.{names[s.name]})")
        names[s.name] = i
        if s.steps is None and s.epochs is None:
            raise ConfigError(f"{p}.steps: set steps or epochs")
        for key in (
            "steps",
            "epochs",
            "batch_size",
            "grad_accumulation",
            "lr",
            "last_layers",
            "max_grad_norm",
        ):
            _positive(getattr(s, key), f"{p}.{key}")
        _positive(s.weight_decay, f"{p}.weight_decay", allow_zero=True)
        _positive(s.margin, f"{p}.margin", allow_zero=True)
        if not 0.0 <= s.warmup_ratio < 1.0:
            raise ConfigError(f"{p}.warmup_ratio: must be in [0, 1); got {s.warmup_ratio!r}")
        weights, mrl_weights = dataclasses.asdict(s.loss_weights), dataclasses.asdict(s.mrl_loss_weights)
        for k, v in weights.items():
            _positive(v, f"{p}.loss_weights.{k}", allow_zero=True)
        for k, v in mrl_weights.items():
            _positive(v, f"{p}.mrl_loss_weights.{k}", allow_zero=True)
        if not any(weights.values()) and not (s.mrl and any(mrl_weights.values())):
            raise ConfigError(f"{p}.loss_weights: every loss weight is 0; the stage would train nothing")
        if s.mrl and (cfg.student is None or not cfg.student.mrl.dims):
            raise ConfigError(f"{p}.mrl: stage trains reduced dims but student.mrl.dims is empty")
        if most is not None and s.batch_size > most:
            raise ConfigError(
                f"{p}.batch_size: {s.batch_size} is more than the at most {most} texts the corpus "
                f"limits allow (data.limit / data.train.*.limit); no batch could be formed"
            )


def _check_train_and_logging(cfg: ExperimentConfig) -> None:
    _positive(cfg.train.checkpoint_every, "train.checkpoint_every", allow_zero=True)
    _positive(cfg.train.keep_checkpoints, "train.keep_checkpoints")
    _positive(cfg.train.embedding_chunk_size, "train.embedding_chunk_size")
    _positive(cfg.train.eval_every, "train.eval_every", allow_zero=True)
    _positive(cfg.train.log_every, "train.log_every")
    if len(set(cfg.logging.report_to)) != len(cfg.logging.report_to):
        raise ConfigError(f"logging.report_to: a tracker is listed twice in {cfg.logging.report_to}")


def _check_export_and_evaluate(cfg: ExperimentConfig) -> None:
    ex, ev = cfg.export, cfg.evaluate
    for i, p in enumerate(ev.sts):
        _path(p, f"evaluate.sts.{i}")
    for i, p in enumerate(ev.retrieval):
        _path(p, f"evaluate.retrieval.{i}")
    _positive(ev.batch_size, "evaluate.batch_size")
    _positive(ex.default_dim, "export.default_dim")
    offered = f"({', '.join(ex.prompts) or 'none defined'})"
    for what in ("sts", "query", "doc"):
        name = getattr(ev, f"{what}_prompt_name")
        if name is not None and name not in ex.prompts:
            raise ConfigError(f"evaluate.{what}_prompt_name: {name!r} is not one of export.prompts {offered}")
    if ex.default_prompt_name is not None and ex.default_prompt_name not in ex.prompts:
        raise ConfigError(
            f"export.default_prompt_name: {ex.default_prompt_name!r} is not one of export.prompts {offered}"
        )
    for name, values, pattern, what in (  # the card's metadata: what the Hub accepts
        ("license", [ex.license] if ex.license else [], r"[a-z0-9][a-z0-9.+-]*", "a license id such as mit"),
        ("language", ex.language, r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", "a language code such as en or pt-BR"),
        ("datasets", ex.datasets or [], r"(?!\.)(?!.*\.\.)[\w.-]+(/[\w.-]+)?", "a Hub dataset id (org/name)"),
    ):
        for i, value in enumerate(values):
            if not re.fullmatch(pattern, value):
                where = "export.license" if name == "license" else f"export.{name}.{i}"
                raise ConfigError(f"{where}: expected {what}; got {value!r}")
    if ex.push_to_hub is not None and not HUB_REPO.fullmatch(ex.push_to_hub):
        raise ConfigError(f"export.push_to_hub: {ex.push_to_hub!r} is not a Hub repo id of the form org/name")


def check_teacher_dims(cfg: ExperimentConfig, dims: list[int]) -> None:
    """The teachers' output dims (from their files, or from their caches) against ``student.target_dim``,
    ``student.mrl.dims`` and ``export.default_dim``."""
    st, total = cfg.student, sum(dims)
    if st is not None and st.target_dim is not None and st.target_dim != total:
        parts = " + ".join(f"{d} ({t.name})" for d, t in zip(dims, cfg.teachers))
        raise ConfigError(
            f"student.target_dim: {st.target_dim} differs from the teachers' concatenated dim "
            f"{parts} = {total}; leave it unset or make it match"
        )
    check_dims(cfg, total)


def mrl_dims_problem(dims: list[int], target: int) -> str | None:
    """What is wrong with reduced dims ``dims`` for a ``target``-d projection (None: nothing)."""
    for d in dims:
        if d > target:
            return f"dim {d} is larger than the target dim {target}"
        if d == target:
            return f"dim {d} equals the target dim; the projection already outputs it, list only reduced dims"
    return None


def check_dims(cfg: ExperimentConfig, target: int | None) -> None:
    """``student.mrl.dims`` and ``export.default_dim`` against the student's target dim (None: not known
    yet; the teachers' dims decide it). Checked at load time, again when the models' files tell the
    teachers' dims, and at the start of training with the caches' dims."""
    st, default = cfg.student, cfg.export.default_dim
    if st is None:
        return
    problem = mrl_dims_problem(st.mrl.dims, target) if target is not None else None
    if problem:
        raise ConfigError(f"student.mrl.dims: {problem}")
    if default is None or default in st.mrl.dims:
        return
    if st.mrl.mode == "truncate":
        if target is not None and default > target:
            raise ConfigError(f"export.default_dim: {default} is larger than the target dim {target}")
    elif target is not None and default != target:
        raise ConfigError(
            f"export.default_dim: {default} is not an offered dim: one of student.mrl.dims "
            f"{st.mrl.dims or '[]'} or the target dim {target}"
        )
