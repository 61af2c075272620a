"""From a YAML file and dotted overrides to typed config sections, with field-named errors.

``read_yaml`` reads a config file defensively: a duplicate key is refused (YAML would silently keep
the last one), aliases and nesting are bounded (an alias "bomb" or 20,000 nested brackets is one
error, not minutes of work or a RecursionError). ``apply_override`` sets ``a.b.0.c=value`` in the raw
data. ``build`` converts plain data into a dataclass, checking every field's type, refusing unknown
keys, NaN/inf and integers beyond 64 bits, and naming the dotted field in every error.

Every value shown in an error is cut to a short repr, so no message can grow with the input.
This module must stay light: no torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from stella_distill.errors import ConfigError

MAX_VALUES = 100_000  # values of a config after aliases are expanded: real configs have a few hundred
MAX_DEPTH = 64  # nesting of mappings and lists: real configs nest 4-5 deep
SHOWN_CHARS = 80


def show(value: Any) -> str:
    """A short repr of ``value`` for an error message (at most ``SHOWN_CHARS`` characters)."""
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 5] + "...'" + f" ({len(text)} chars)"


# ---------------------------------------------------------------------------------------------
# Reading YAML


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; construct_mapping below reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {show(key)} (first at line {first.line + 1}); YAML would keep only the last one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; syntax errors and duplicate keys name the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields; got {type(data).__name__}")
    return data


def parse_yaml(text: str, where: str) -> Any:
    """Parse one YAML document (``where`` names it in errors), bounded in size and depth."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{at}: YAML syntax error: {problem[:200]}") from None
    except RecursionError:
        raise ConfigError(
            f"{where}: nested too deeply to be a config (more than {MAX_DEPTH} levels)"
        ) from None
    _check_size(data, where)
    return data


def _check_size(data: Any, where: str) -> None:
    """Refuse data with more than MAX_VALUES values (aliases counted at every use) or deeper than MAX_DEPTH.

    PyYAML shares the object an alias points to, so a nine-level alias "bomb" loads in a blink, but
    every walk of the data (conversion, dumping the resolved config) would visit 9^9 values.
    """
    budget = MAX_VALUES
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(
                f"{where}: more than {MAX_VALUES} values once YAML aliases are expanded; "
                f"a config needs a few hundred (an alias bomb?)"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: nested too deeply to be a config (more than {MAX_DEPTH} levels)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


# ---------------------------------------------------------------------------------------------
# Overrides


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b.0.c=value`` override to the raw YAML data in place (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"{override[:SHOWN_CHARS]}: an override must look like key.path=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{override[:SHOWN_CHARS]}: an override must look like key.path=value")
    try:
        value = parse_yaml(raw, f"override {key}") if raw.strip() else ""
    except ConfigError as exc:
        if "YAML syntax error" not in str(exc):
            raise
        value = raw  # not YAML: the text as it is
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: no such list element (list has {len(node)} items)")
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"{where}: cannot set a field inside {show(node)}")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{key}: no such list element (list has {len(node)} items)")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{key}: cannot set a field inside {show(node)}")


# ---------------------------------------------------------------------------------------------
# Conversion from plain data to the typed classes


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: expected {_type_name(tp)}; got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}; got {show(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: expected one of {', '.join(map(str, choices))}; got {show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list; got {show(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping; got {show(value)}")
        key_tp, val_tp = typing.get_args(tp)
        return {_convert(k, key_tp, f"{path}"): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if value is None:
        raise ConfigError(f"{path}: expected {_type_name(tp)}; got null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false; got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer; got {show(value)}")
        if not -(2**63) < value < 2**63:
            raise ConfigError(f"{path}: {show(value)} is out of range (at most 19 digits)")
        return value
    if tp is float:
        number = _number(value, path)
        if not math.isfinite(number):
            raise ConfigError(f"{path}: must be a finite number; got {show(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string; got {show(value)}")
        if "\x00" in value:
            raise ConfigError(f"{path}: contains a NUL character; got {show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def _number(value: Any, path: str) -> float:
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: expected a number; got {show(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float's range
        raise ConfigError(f"{path}: must be a finite number; got {show(value)}") from None


def build(cls: type, data: Any, path: str) -> Any:
    """An instance of the dataclass ``cls`` from plain ``data``; every error names the dotted field."""
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping; got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{prefix}{str(key)[:SHOWN_CHARS]}: unknown key (known keys: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required field is missing")
    return cls(**kwargs)
