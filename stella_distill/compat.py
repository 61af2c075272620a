"""Whether a checkpoint (or ``final/``) was trained by the config at hand.

A checkpoint records short digests of what shapes training (``compat``): the student, the teachers
and the seed; the data fields that change the targets and rows; each stage's training fields. Equal
digests settle it. When they differ, the config the checkpoint holds (its ``config.yaml``) is compared
with the config field by field, so the error names what changed. A field the checkpoint lacks is a
change only when the config sets it away from its default, and a field this version no longer has is
none: a newer stella-distill that adds or drops a field keeps the runs of the older one resumable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stella_distill.config import ExperimentConfig
from stella_distill.configfile import read_yaml
from stella_distill.errors import ConfigError
from stella_distill.files import json_digest, sha256_file

# Teacher and source fields that change how the job runs, not the vectors or rows it makes.
RUN_ONLY_FIELDS = ("batch_tokens", "max_batch_size", "shard_size", "streaming")

PARTS = ("model", "data", "stages")  # of ``compat``, in the order a mismatch is reported
_MISSING = object()


def _view(d: dict) -> dict[str, Any]:
    """The fields of a config dict (``to_dict()`` or a checkpoint's ``config.yaml``) that shape training."""
    teachers = [_without(t, RUN_ONLY_FIELDS) for t in d.get("teachers") or []]
    data = dict(d.get("data") or {})
    data["train"] = [_without(s, RUN_ONLY_FIELDS) for s in data.get("train") or []]
    return {
        "model": {"student": d.get("student"), "teachers": teachers, "seed": d.get("seed")},
        "data": data,
        "stages": [_without(s, ("name",)) for s in d.get("stages") or []],
    }


def _without(d: Any, keys: tuple[str, ...]) -> Any:
    return {k: v for k, v in d.items() if k not in keys} if isinstance(d, dict) else d


def compat(cfg: ExperimentConfig) -> dict:
    """The digests a checkpoint records: ``{"model": ..., "data": ..., "stages": [one per stage]}``."""
    view = _view(cfg.to_dict())
    model = view["model"]
    return {
        "model": json_digest(model["student"], model["teachers"], model["seed"])[:16],
        "data": json_digest(view["data"])[:16],
        "stages": [cfg.fingerprint_stage(i) for i in range(len(cfg.stages))],
    }


def differences(recorded: dict, cfg: ExperimentConfig) -> dict[str, list[str]]:
    """Per part of ``compat``, the fields in which the config dict ``recorded`` and ``cfg`` differ, as
    ``"stages.0.lr: 0.001 in the checkpoint, 0.0005 now"``. A field ``recorded`` lacks counts only away
    from its default; a field ``cfg`` lacks (dropped by this version) never counts."""
    return {part: [text for _, text in found] for part, found in _differences(recorded, cfg, None).items()}


def _differences(
    recorded: dict, cfg: ExperimentConfig, stages: int | None
) -> dict[str, list[tuple[tuple, str]]]:
    """``differences`` as (field path, text) pairs, over the first ``stages`` stages (None: all)."""
    got, want = _view(recorded), _view(cfg.to_dict())
    out: dict[str, list[tuple[tuple, str]]] = {}
    for part in PARTS:
        found: list[tuple[tuple, str]] = []
        old, new = got[part], want[part]
        if part == "stages":
            old, new = old[:stages], new[:stages]
        _compare(old, new, () if part == "model" else (part,), cfg, found)
        if found:
            out[part] = found
    return out


def _compare(old: Any, new: Any, path: tuple, cfg: ExperimentConfig, found: list[tuple[tuple, str]]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            a, b = old.get(key, _MISSING), new.get(key, _MISSING)
            if b is _MISSING:  # a field this version no longer has: no config can set it now
                continue
            if a is _MISSING:  # a field added since: a change only away from its default
                if b != _default(cfg, (*path, key)):
                    found.append(_describe((*path, key), a, b))
            else:
                _compare(a, b, (*path, key), cfg, found)
    elif isinstance(old, list) and isinstance(new, list) and _entries(old) and _entries(new):
        for i in range(max(len(old), len(new))):  # lists of sections: entry by entry
            a = old[i] if i < len(old) else _MISSING
            b = new[i] if i < len(new) else _MISSING
            if a is _MISSING or b is _MISSING:
                found.append(_describe((*path, i), a, b))
            else:
                _compare(a, b, (*path, i), cfg, found)
    elif old != new:
        found.append(_describe(path, old, new))


def _entries(values: list) -> bool:
    """Whether a list holds config sections (teachers, sources, stages), compared entry by entry."""
    return bool(values) and all(isinstance(v, dict) for v in values)


def _describe(path: tuple, old: Any, new: Any) -> tuple[tuple, str]:
    def show(v: Any) -> str:
        if v is _MISSING:
            return "absent"
        if isinstance(v, dict):
            return "present"
        text = repr(v) if isinstance(v, str) else str(v)
        return text if len(text) <= 60 else text[:57] + "..."

    name = ".".join(str(p) for p in path) or "config"
    return path, f"{name}: {show(old)} in the checkpoint, {show(new)} now"


def _default(cfg: ExperimentConfig, path: tuple) -> Any:
    """The default of the dataclass field at ``path`` (``_MISSING`` where there is none)."""
    obj: Any = cfg
    for step in path[:-1]:
        try:
            obj = obj[step] if isinstance(step, int) else getattr(obj, step)
        except (AttributeError, IndexError, KeyError, TypeError):
            return _MISSING
    if not dataclasses.is_dataclass(obj):
        return _MISSING
    for field in dataclasses.fields(obj):
        if field.name == path[-1]:
            if field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                return _MISSING
            return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return _MISSING


def read_recorded_config(config_file: Path, sha256: str | None = None) -> dict | None:
    """The config a checkpoint (or ``final/``) holds, as a plain dict; None where it has none that reads
    (read as every config is: ``configfile.read_yaml``), or none whose bytes match ``sha256``, the
    checksum its state records (checkpoints of earlier versions record none)."""
    try:
        if sha256 is not None and sha256_file(config_file) != sha256:
            return None
        return read_yaml(config_file) or None
    except (ConfigError, OSError):
        return None


@dataclass
class Mismatch:
    """How a checkpoint differs from the config: the part of ``compat`` (``model``, ``data`` or
    ``stages``), the fields that differ in it (none where the checkpoint holds no config to compare),
    and for ``stages`` the first stage that differs."""

    part: str
    fields: list[str]
    stage: int | None = None


def mismatch(state: dict, started: int, config_file: Path, cfg: ExperimentConfig) -> Mismatch | None:
    """None when the checkpoint whose state is ``state`` (its ``compat`` digests and config checksum),
    which started ``started`` stages and holds its config in ``config_file``, was trained by ``cfg``'s
    fields; else the first way it differs."""
    recorded = state.get("compat") or {}
    want = compat(cfg)
    have_stages, want_stages = list(recorded.get("stages") or [])[:started], want["stages"][:started]
    same = {
        "model": recorded.get("model") == want["model"],
        "data": recorded.get("data") == want["data"],
        "stages": have_stages == want_stages,
    }
    if all(same.values()):
        return None
    config = read_recorded_config(config_file, state.get("config_sha256"))
    if config is None:  # the digests decide
        part = next(p for p in PARTS if not same[p])
        stage = None
        if part == "stages":
            stage = next(
                (i for i, (a, b) in enumerate(zip(have_stages, want_stages)) if a != b),
                min(len(have_stages), len(want_stages)),
            )
        return Mismatch(part, [], stage)
    found = _differences(config, cfg, started)
    for part in PARTS:
        if not same[part] and found.get(part):
            first_path = found[part][0][0]  # ("stages", i, ...); ("stages",): the list itself
            stage = (first_path[1] if len(first_path) > 1 else 0) if part == "stages" else None
            return Mismatch(part, [text for _, text in found[part]], stage)
    return None
