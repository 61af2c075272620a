"""What identifies an input: the hashes that decide whether a file on disk was made from it.

"Already done" is decided here, by content, never by file times: a local model folder by the bytes of
its weights and config, a teacher by every field that changes its vectors, a corpus by the hash of
each of its texts in order.

numpy, the standard library and model_files (which reads JSON files only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stella_distill.files import sha256_file
from stella_distill.hub import dense_location
from stella_distill.model_files import dense_list, resolve_teacher

if TYPE_CHECKING:
    from stella_distill.config import TeacherConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# The fields that decide what a teacher writes, in the order a mismatch is reported.
TEACHER_FIELDS = ("model", "revision", "pooling", "dense", "prompt", "max_length", "normalize", "dtype")


def text_hashes(texts: list[str]) -> np.ndarray:
    """Per-text hash: the first 8 bytes of blake2b(text as UTF-8), as little-endian uint64."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8")).digest()[:8] for t in texts)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def corpus_fingerprint(row_hashes: np.ndarray) -> str:
    """sha256 hex over the row hashes (little-endian uint64 bytes, in order)."""
    return hashlib.sha256(np.ascontiguousarray(row_hashes, dtype="<u8").tobytes()).hexdigest()


def weights_sha256(folder: str | Path) -> str:
    """sha256 over a local model folder's config.json and weight files (names and bytes, sorted)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if (folder / "config.json").is_file():
        files.insert(0, folder / "config.json")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def teacher_identity(teacher: TeacherConfig, max_length: int) -> dict:
    """What makes ``teacher``'s vectors at ``max_length``: the fields a cache built for it records.

    ``revision`` is the configured revision for Hub ids and ``sha256:<hex>`` of the weight files
    for a local folder, so a retrained or swapped local model is told apart from the old one.
    """
    if teacher.pooling is None or teacher.prompt is None:  # not from a loaded config: as the folder says
        teacher = resolve_teacher(teacher, "teacher")
    local = Path(teacher.model).expanduser()
    revision = f"sha256:{weights_sha256(local)}" if local.is_dir() else teacher.revision
    heads = []
    for head in dense_list(teacher.dense):
        where, subfolder = dense_location(teacher.model, head)
        folder = Path(where).expanduser() / subfolder
        # a local head is told apart by its weights, like a local model
        heads.append(f"{head} (sha256:{weights_sha256(folder)})" if folder.is_dir() else head)
    dense = " + ".join(heads) or None  # absent from caches built without one: None == None
    return {
        "teacher": teacher.name,
        "model": teacher.model,
        "revision": revision,
        "pooling": teacher.pooling,
        "dense": dense,
        "prompt": teacher.prompt,
        "max_length": int(max_length),
        "dtype": teacher.dtype,
        "normalize": bool(teacher.normalize),
    }


def identity_field(key: str, index: int | None) -> str:
    """The config field behind identity field ``key`` of teacher ``index`` (for error messages)."""
    where = f"teachers.{index}" if index is not None else "teacher"
    if key == "max_length":
        return f"{where}.max_length or data.max_length"
    if key == "revision":
        return f"{where}.revision / the weights of {where}.model"
    return f"{where}.{key}"


def identity_difference(recorded: dict, expected: dict) -> tuple[str, Any, Any] | None:
    """``(field, recorded, expected)`` of the first identity field that differs, or None."""
    for key in TEACHER_FIELDS:
        if key == "model":
            both_local = str(recorded.get("revision", "")).startswith("sha256:") and str(
                expected.get("revision", "")
            ).startswith("sha256:")
            # A local folder that moved but holds the same weights is the same teacher.
            if both_local and recorded.get("revision") == expected.get("revision"):
                continue
        if recorded.get(key) != expected.get(key):
            return key, recorded.get(key), expected.get(key)
    return None
