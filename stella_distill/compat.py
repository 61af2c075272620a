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
from pathlib import Path
from typing import Any

import yaml

from stella_distill.config import ExperimentConfig
from stella_distill.files import json_digest

# Teacher and source fields that change how the job runs, not the vectors or rows it makes.
RUN_ONLY_FIELDS = ("batch_tokens", "max_batch_size", "shard_size", "streaming")

# The three parts of ``compat``, and the words the errors use for them.
PARTS = {"model": "student/teachers/seed", "data": "data (data.*)", "stages": "stages"}
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
    got, want = _view(recorded), _view(cfg.to_dict())
    out: dict[str, list[str]] = {}
    for part in PARTS:
        found: list[str] = []
        _compare(got[part], want[part], _prefix(part), cfg, found)
        if found:
            out[part] = found
    return out


def _prefix(part: str) -> tuple:
    return () if part == "model" else (part,)


def _compare(old: Any, new: Any, path: tuple, cfg: ExperimentConfig, found: list[str]) -> None:
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


def _describe(path: tuple, old: Any, new: Any) -> str:
    def show(v: Any) -> str:
        if v is _MISSING:
            return "absent"
        if isinstance(v, dict):
            return "present"
        text = repr(v) if isinstance(v, str) else str(v)
        return text if len(text) <= 60 else text[:57] + "..."

    return f"{_name(path)}: {show(old)} in the checkpoint, {show(new)} now"


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "config"


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


def read_recorded_config(folder: Path) -> dict | None:
    """The config a checkpoint (or ``final/``) holds, as a plain dict; None where it has none."""
    try:
        data = yaml.safe_load((Path(folder) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def mismatch(state: dict, folder: Path, cfg: ExperimentConfig) -> tuple[str, list[str]] | None:
    """None when the checkpoint in ``folder`` (state ``state``) was trained by ``cfg``'s fields, for the
    stages it started; else the first differing part of ``compat`` and the fields that differ in it (empty
    where the checkpoint holds no config to compare)."""
    want, have = compat(cfg), state.get("compat") or {}
    started = state.get("stage_index", len(want["stages"]) - 1) + 1
    same = {
        "model": have.get("model") == want["model"],
        "data": have.get("data") == want["data"],
        "stages": list(have.get("stages") or [])[:started] == want["stages"][:started],
    }
    if all(same.values()):
        return None
    recorded = read_recorded_config(folder)
    found = differences(recorded, cfg) if recorded is not None else {}
    if "stages" in found:  # only the stages the checkpoint started count
        found["stages"] = [f for f in found["stages"] if stage_of(f) < started]
    for part, ok in same.items():
        if ok:
            continue
        if recorded is None:
            return part, []
        if found.get(part):
            return part, found[part]
    return None


def stage_of(description: str) -> int:
    """The stage index a ``stages...`` difference is about (``stages: ...`` = the list itself: 0)."""
    head = description.split(":", 1)[0].split(".")
    return int(head[1]) if len(head) > 1 and head[1].isdigit() else 0
