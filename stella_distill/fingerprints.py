"""What identifies an input: the hashes that decide whether a file on disk was made from it.

"Already done" is decided here, by content, never by file times: a local model folder by the bytes of
every file that can change its vectors, a Hub model by its commit, a teacher by every field that
changes its vectors, a corpus by the hash of each of its texts in order.

numpy, the standard library and model_files (which reads JSON files only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stella_distill.files import sha256_file
from stella_distill.hub import dense_location, resolve_commit
from stella_distill.model_files import dense_list, resolve_teacher

if TYPE_CHECKING:
    from stella_distill.config import TeacherConfig

# The fields that decide what a teacher writes, in the order a mismatch is reported: what the config
# says first, what the model folder holds last (a changed config field is the likelier story).
TEACHER_FIELDS = ("model", "pooling", "dense", "prompt", "max_length", "normalize", "dtype", "revision")


def text_hashes(texts: list[str]) -> np.ndarray:
    """Per-text hash: the first 8 bytes of blake2b(text as UTF-8), as little-endian uint64."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8")).digest()[:8] for t in texts)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def corpus_fingerprint(row_hashes: np.ndarray) -> str:
    """sha256 hex over the row hashes (little-endian uint64 bytes, in order)."""
    return hashlib.sha256(np.ascontiguousarray(row_hashes, dtype="<u8").tobytes()).hexdigest()


# What never changes a model's vectors: documentation, VCS and download bookkeeping, and export formats
# that transformers does not load.
IGNORED_NAMES = (".git", ".cache", ".gitattributes", ".gitignore", "onnx", "openvino", "coreml")
IGNORED_SUFFIXES = (".md", ".txt.lock", ".png", ".jpg", ".jpeg", ".gif", ".lock")
UNRESOLVED = "unresolved"  # a Hub model whose commit cannot be known here (no local copy, no Hub)


def folder_sha256(folder: str | Path, skip: tuple[str, ...] = ()) -> str:
    """sha256 over every file of a local model folder that can change its vectors, recursively:
    config, weights, tokenizer files (vocabulary, merges, normaliser, special tokens), and the
    sentence-transformers module folders (Pooling, Dense, Normalize). Names and bytes, sorted;
    documentation, VCS files and unused export formats (ONNX, OpenVINO) are left out, and so are the
    subfolders named in ``skip`` (identified on their own, like a teacher's Dense head)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part in IGNORED_NAMES for part in rel.parts) or rel.parts[0] in skip:
            continue
        if (
            rel.name.startswith("README")
            or rel.name.startswith("LICENSE")
            or rel.suffix.lower() in IGNORED_SUFFIXES
        ):
            continue
        h.update(rel.as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def model_revision(model: str, revision: str | None, skip: tuple[str, ...] = ()) -> str:
    """What identifies the files of ``model``: ``sha256:<hex>`` of a local folder (``folder_sha256``),
    else the commit a Hub ``revision`` (branch, tag or commit; None: main) resolves to, from the local
    Hugging Face cache or the Hub; ``UNRESOLVED`` when neither can tell."""
    local = Path(model).expanduser()
    if local.is_dir():
        return f"sha256:{folder_sha256(local, skip)}"
    return resolve_commit(model, revision) or UNRESOLVED


def teacher_identity(teacher: TeacherConfig, max_length: int) -> dict:
    """What makes ``teacher``'s vectors at ``max_length``: the fields a cache built for it records.

    ``revision`` covers every file of the model (``model_revision``): a retrained, re-tokenised or
    swapped model is told apart from the old one, locally and on the Hub.
    """
    if teacher.pooling is None or teacher.prompt is None:  # not from a loaded config: as the folder says
        teacher = resolve_teacher(teacher, "teacher")
    heads, skip = [], []
    for head in dense_list(teacher.dense):
        where, subfolder = dense_location(teacher.model, head)
        folder = Path(where).expanduser() / subfolder
        if folder.is_dir():  # a local head is told apart by its files, like a local model
            heads.append(f"{head} (sha256:{folder_sha256(folder)})")
            skip += [Path(subfolder).parts[0]] if subfolder else []
        else:
            heads.append(head)
    dense = " + ".join(heads) or None  # absent from caches built without one: None == None
    skip = tuple(skip)
    return {
        "teacher": teacher.name,
        "model": teacher.model,
        "revision": model_revision(teacher.model, teacher.revision, skip),
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
        if key == "revision" and expected.get(key) == UNRESOLVED:
            continue  # nothing here can tell which commit the Hub name means now: trust the record
        if recorded.get(key) != expected.get(key):
            return key, recorded.get(key), expected.get(key)
    return None


def teacher_mismatch(recorded: dict, expected: dict, index: int | None) -> str | None:
    """How a cache built for ``recorded`` differs from the teacher ``expected`` (the first field that
    differs, and the config field to look at), or None when it is the same teacher."""
    diff = identity_difference(recorded, expected)
    if diff is None:
        return None
    key, was, now = diff
    return f"built for {key} {was!r}, config says {now!r} ({identity_field(key, index)})"


def corpus_mismatch(
    rows: int,
    fingerprint: str,
    stored_hashes: np.ndarray | None,
    corpus_hashes: np.ndarray,
    texts=None,
    *,
    corpus_fingerprint: str | None = None,
) -> str | None:
    """How the rows a cache was built for differ from the corpus now (the first row that differs), or None.

    Rows are compared hash by hash when the cache's own row hashes are at hand (``stored_hashes``),
    else by the corpus fingerprint (``fingerprint`` recorded, ``corpus_fingerprint`` now).
    """
    if rows != len(corpus_hashes):
        return (
            f"built for a corpus of {rows} rows, the corpus now has {len(corpus_hashes)} "
            f"(data.train / data.limit / data.dedupe changed)"
        )
    if stored_hashes is None or len(stored_hashes) != rows:
        if fingerprint == corpus_fingerprint:
            return None
        return f"built for another corpus (fingerprint {fingerprint[:12]}) (data.train)"
    differ = np.flatnonzero(
        np.asarray(stored_hashes, dtype=np.uint64) != np.asarray(corpus_hashes, dtype=np.uint64)
    )
    if not len(differ):
        return None
    first = int(differ[0])
    shown = f" {texts[first][:60]!r}" if texts is not None else ""
    return f"built for another corpus: row {first} differs (corpus text{shown}); {len(differ)} of {rows} rows differ (data.train)"
