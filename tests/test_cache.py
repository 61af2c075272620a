"""The teacher cache reader: what it holds, what it refuses, and the multi-teacher target."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import precompute_config

from stella_distill.cache import CacheError, TeacherCache, build_target, open_caches
from stella_distill.config import from_dict
from stella_distill.data import load_corpus
from stella_distill.precompute import TeacherEncoder, run_precompute


def _texts(texts: list[str]) -> list[str]:
    return [f"{t}{s}" for s in ("", " today", " by the sea at night") for t in texts][:50]


def _config(tmp_path: Path, teachers: list[dict], texts: list[str]) -> dict:
    return precompute_config(tmp_path, teachers, texts, name="c", max_length=32)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_bert, tiny_bert4):
    """Two teachers' caches (50 rows, 8-row shards) and the config that made them."""
    from tiny import TEXTS

    tmp = tmp_path_factory.mktemp("caches")
    teachers = [
        {"name": "small", "model": str(tiny_bert), "pooling": "cls", "shard_size": 8},
        {"name": "wide", "model": str(tiny_bert4), "pooling": "mean", "prompt": "doc: ", "shard_size": 8},
    ]
    cfg = from_dict(_config(tmp, teachers, _texts(list(TEXTS))))
    run_precompute(cfg)
    return cfg


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the 'small' cache to damage."""
    folder = tmp_path / "small"
    shutil.copytree(Path(built.cache_dir) / "small", folder)
    return folder


def test_cache_holds_the_teacher_vectors_in_corpus_order(built):
    corpus = load_corpus(built.data, log=lambda _: None)
    caches = open_caches(built, corpus)
    assert [len(c) for c in caches] == [50, 50] and [c.dim for c in caches] == [32, 48]
    for cache, teacher in zip(caches, built.teachers):
        assert cache.vectors.shape == (50, cache.dim) and cache.vectors.dtype == np.float16
        assert not cache.vectors.flags.writeable
        assert cache.valid_mask.all()
        assert np.array_equal(cache.row_hashes, corpus.row_hashes)
        m = cache.manifest
        assert (m["model"], m["pooling"], m["prompt"], m["rows"], m["dim"]) == (
            teacher.model,
            teacher.pooling,
            teacher.prompt,
            50,
            cache.dim,
        )
        assert m["corpus_fingerprint"] == corpus.fingerprint and len(m["shards"]) == 7
        live = TeacherEncoder(teacher, max_length=32).encode(corpus.texts)
        np.testing.assert_allclose(np.asarray(cache.vectors, dtype=np.float32), live, atol=2e-3)


def test_build_target_normalises_each_teacher_then_the_concatenation(built):
    caches = open_caches(built, load_corpus(built.data, log=lambda _: None), verify=False)
    rows = np.array([7, 0, 49, 7])
    target = build_target(caches, rows)
    parts = []
    for c in caches:
        v = np.asarray(c.vectors, dtype=np.float64)[rows]
        parts.append(v / np.sqrt((v**2).sum(1, keepdims=True)))
    naive = np.concatenate(parts, axis=1) / np.sqrt(2.0)
    assert target.dtype == np.float32 and target.shape == (4, 80)
    np.testing.assert_allclose(target, naive, atol=1e-6)


@pytest.mark.parametrize(
    "field, change, message",
    [
        (
            "pooling",
            {"pooling": "mean"},
            r"cache/small: built for pooling 'cls', config says 'mean' \(teachers\.0\.pooling\)",
        ),
        ("prompt", {"prompt": "q: "}, r"built for prompt '', config says 'q: ' \(teachers\.0\.prompt\)"),
        (
            "normalize",
            {"normalize": False},
            r"built for normalize True, config says False \(teachers\.0\.normalize\)",
        ),
        (
            "dtype",
            {"dtype": "bfloat16"},
            r"built for dtype 'float32', config says 'bfloat16' \(teachers\.0\.dtype\)",
        ),
        (
            "model",
            {"model": "tiny_bert4"},
            r"built for model '.*tiny-bert.*', config says '.*tiny-bert4.*' \(teachers\.0\.model\)",
        ),
    ],
)
def test_a_cache_for_another_teacher_is_refused(built, tiny_bert4, field, change, message):
    teacher = built.teachers[0]
    if field == "model":
        change = {"model": str(tiny_bert4)}
    cache = TeacherCache(Path(built.cache_dir) / "small", verify=False)
    other = type(teacher)(**{**teacher.__dict__, **change})
    with pytest.raises(CacheError, match=message):
        cache.check(teacher=other, max_length=32, index=0)


def test_max_length_and_revision_mismatches_are_named(built, tiny_bert, tmp_path):
    teacher = built.teachers[0]
    cache = TeacherCache(Path(built.cache_dir) / "small", verify=False)
    with pytest.raises(
        CacheError, match=r"built for max_length 32, config says 64 \(teachers\.1\.max_length or data"
    ):
        cache.check(teacher=teacher, max_length=64, index=1)
    # The same weights in another folder are the same teacher.
    moved = tmp_path / "moved"
    shutil.copytree(tiny_bert, moved)
    cache.check(teacher=type(teacher)(**{**teacher.__dict__, "model": str(moved)}), max_length=32)


def test_changed_weights_in_the_same_folder_are_refused(tiny_bert, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    cfg = from_dict(_config(tmp_path, [{"name": "m", "model": str(model)}], ["one text", "two texts"]))
    (folder,) = run_precompute(cfg)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(
        CacheError, match=r"built for revision 'sha256:\w+', config says 'sha256:\w+' \(teachers\.0\.revision"
    ):
        open_caches(cfg, load_corpus(cfg.data, log=lambda _: None))


def test_a_cache_for_another_corpus_is_refused_naming_the_row(built):
    corpus = load_corpus(built.data, log=lambda _: None)
    cache = TeacherCache(Path(built.cache_dir) / "wide", verify=False)
    teacher = built.teachers[1]
    cache.check(teacher=teacher, max_length=32, corpus=corpus, index=1)
    changed = corpus.row_hashes.copy()
    changed[[17, 30]] += np.uint64(1)
    with pytest.raises(
        CacheError, match=r"cache/wide: built for another corpus: row 17 differs.*2 of 50 rows"
    ):
        cache.check(teacher=teacher, max_length=32, row_hashes=changed)
    with pytest.raises(CacheError, match=r"built for a corpus of 50 rows, the corpus now has 49"):
        cache.check(teacher=teacher, max_length=32, row_hashes=corpus.row_hashes[:49])
    limited = from_dict(
        {**json.loads(json.dumps(built.to_dict())), "data": {**built.to_dict()["data"], "limit": 10}}
    )
    with pytest.raises(
        CacheError, match=r"cache/small: built for a corpus of 50 rows, the corpus now has 10"
    ):
        open_caches(limited, load_corpus(limited.data, log=lambda _: None))


def test_truncated_vectors_are_refused_naming_the_shard(copy):
    vectors = copy / "vectors.npy"
    size = vectors.stat().st_size
    with open(vectors, "r+b") as f:
        f.truncate(
            size - 20 * 32 * 2 - 5
        )  # 20 rows and a bit short: rows 29-49 are gone, shard 3 (24-31) first
    with pytest.raises(CacheError, match=r"cache/small: vectors\.npy is truncated .*shard 3 \(rows 24-31\)"):
        TeacherCache(copy, verify=False)


def test_a_flipped_byte_is_refused_naming_the_shard(copy):
    TeacherCache(copy)
    vectors = copy / "vectors.npy"
    data = bytearray(vectors.read_bytes())
    offset = len(data) - 50 * 32 * 2
    data[offset + 41 * 32 * 2 + 7] ^= 0x10  # row 41: shard 5 (rows 40-47)
    vectors.write_bytes(bytes(data))
    TeacherCache(copy, verify=False)  # sizes still fine; only the checksums can tell
    with pytest.raises(
        CacheError, match=r"shard 5 \(rows 40-47\) of vectors\.npy does not match its checksum"
    ):
        TeacherCache(copy)


def test_a_hand_edited_manifest_is_refused(copy):
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["pooling"] = "mean"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with pytest.raises(
        CacheError, match=r"manifest\.json does not match its own checksum \(edited by hand\?\)"
    ):
        TeacherCache(copy, verify=False)


def test_damaged_row_hashes_are_refused(copy):
    path = copy / "row_hashes.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"row_hashes\.npy is missing or corrupted"):
        TeacherCache(copy, verify=False)


def test_missing_and_unfinished_caches_say_to_run_precompute(copy, tmp_path):
    with pytest.raises(
        CacheError, match=r"no teacher cache at .*run `stella-distill precompute CONFIG` first"
    ):
        TeacherCache(tmp_path / "nothing")
    (copy / "manifest.json").unlink()
    for record in sorted((copy / "shards").iterdir())[3:]:
        record.unlink()
    with pytest.raises(
        CacheError, match=r"incomplete \(3 of 7 shards done\); run `stella-distill precompute"
    ):
        TeacherCache(copy)


def test_file_hashes_equal_hashlib_over_the_same_bytes(tmp_path):
    """One reader serves the whole-file, byte-range and row-range hashes (files, sources' blocks, shards)."""
    import hashlib
    import os

    from stella_distill.files import sha256_file, sha256_range, sha256_rows

    data = os.urandom(3_500_001)  # over three of the reader's 1 MiB buffers, not a multiple of one
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_range(path, 1000, 2_000_000) == hashlib.sha256(data[1000:2_001_000]).digest()
    assert sha256_range(path, 3_000_000, 2_000_000) == hashlib.sha256(data[3_000_000:]).digest()  # the end
    assert sha256_rows(path, 10, 2, 5, 1000) == hashlib.sha256(data[2010:5010]).hexdigest()
    assert sha256_rows(path, 10, 3, 3, 1000) == hashlib.sha256(b"").hexdigest()
    assert sha256_rows(path, 10, 0, 4000, 1000) is None  # the file is too short
