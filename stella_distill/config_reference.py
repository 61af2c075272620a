"""``docs/config.md``: every field of an experiment config, written from the field docs in ``config.py``.

``python -m stella_distill.config_reference`` rewrites the file; ``--check`` exits 1 when the file is
not what the code says (the test suite runs the same comparison).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from stella_distill.config import ExperimentConfig

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "config.md"

HEADER = """# Config reference

Generated from the field docs in `stella_distill/config.py` by `python -m stella_distill.config_reference`;
a test fails when this file is not current. An experiment is one YAML file of these fields; unknown keys
and wrong types stop every verb before any work, naming the field. Any field can be overridden after the
config on the command line with its dotted path (`stages.0.lr=2e-4 teachers.1.pooling=cls`), and
`stella-distill check CONFIG` prints the config with every field resolved (teacher fields left `null`
filled in from the model's own files).
"""


def _type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return "list of section[]"
        return f"list of ({_type(item)})" if typing.get_origin(item) is Literal else f"list of {_type(item)}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"mapping of {_type(key)} to {_type(value)}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return {int: "integer", float: "number", str: "string", bool: "true \\| false"}.get(tp, str(tp))


def _value(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value!r}`" if not value or value != value.strip() else f"`{value}`"
    if isinstance(value, list):
        return "`[" + ", ".join(_value(v).strip("`") for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        made = f.default_factory()
        return "-" if dataclasses.is_dataclass(made) else _value(made)
    return "required"


def _sections(cls: type, path: str, out: list[tuple[str, type]]) -> None:
    """Every config class with the dotted path that reaches it, depth first in field order."""
    out.append((path, cls))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]  # `StudentConfig | None`
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            _sections(typing.get_args(tp)[0], f"{path}.{f.name}[]".lstrip("."), out)
        elif dataclasses.is_dataclass(tp) or inner:
            _sections(tp if dataclasses.is_dataclass(tp) else inner[0], f"{path}.{f.name}".lstrip("."), out)


def render() -> str:
    """The whole reference as Markdown: one table per section, in the order a YAML file lists them."""
    sections: list[tuple[str, type]] = []
    _sections(ExperimentConfig, "", sections)
    lines = [HEADER]
    for path, cls in sections:
        title = f"`{path}`" if path else "top level"
        doc = " ".join((cls.__doc__ or "").split())
        lines += [f"## {title}", "", doc, "", "| field | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meaning = f.metadata.get("doc", "").replace("|", "\\|")
            where = f"{path}.{f.name}".lstrip(".")
            kind = (
                _type(hints[f.name])
                .replace("section[]", f"`{where}[]`")
                .replace("section", f"section `{where}`")
            )
            lines.append(f"| `{f.name}` | {kind} | {_default(f)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/config.md``; with ``--check``, only tell whether it is current (exit 1 if not)."""
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        current = REFERENCE.is_file() and REFERENCE.read_text(encoding="utf-8") == text
        print(
            f"{REFERENCE}: {'current' if current else 'not current; run python -m stella_distill.config_reference'}"
        )
        return 0 if current else 1
    REFERENCE.write_text(text, encoding="utf-8")
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
