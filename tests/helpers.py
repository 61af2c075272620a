"""Small helpers shared by the test suite and the reliability suite (no models, no fixtures)."""

from __future__ import annotations

import json
from pathlib import Path


def apply_overrides(cfg: dict, over: dict) -> dict:
    """Set dotted keys of a plain config dict in place (``"stages.0.steps": 4``); returns ``cfg``."""
    for key, value in over.items():
        node = cfg
        *parts, last = key.split(".")
        for part in parts:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return cfg


def cache_files(folder: Path) -> dict[str, bytes]:
    """Every file of a cache folder; the manifest without its timestamp and self-checksum."""
    files = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                m = json.loads(data)
                del m["created_at"], m["manifest_sha256"]
                data = json.dumps(m, sort_keys=True).encode()
            files[str(p.relative_to(folder))] = data
    return files


def precompute_config(
    tmp_path: Path, teachers: list[dict], texts: list[str], *, name: str = "t", max_length: int = 64
) -> dict:
    """A precompute-only experiment over ``texts`` (written to ``tmp_path/corpus.txt``) as plain data."""
    corpus = Path(tmp_path) / "corpus.txt"
    corpus.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return {
        "name": name,
        "output_dir": str(Path(tmp_path) / "run"),
        "cache_dir": str(Path(tmp_path) / "cache"),
        "data": {"train": [{"path": str(corpus)}], "max_length": max_length},
        "teachers": teachers,
        "logging": {"progress": False},
    }
