"""The precompute job: teacher vectors equal sentence-transformers', 2 processes equal 1, kill -9 resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cache_files, precompute_config

from stella_distill.cache import CacheError, TeacherCache
from stella_distill.config import TeacherConfig, from_dict
from stella_distill.errors import UserError
from stella_distill.precompute import TeacherEncoder, batch_limits, length_batches, run_precompute

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = ["", " today", " and the old king", " by the river at night", " in the small red house"]


def corpus_texts(texts: list[str], n: int) -> list[str]:
    """``n`` distinct texts of varied length built from the tiny vocabulary."""
    out = [f"{t}{s}" for s in SUFFIXES for t in texts]
    out += [f"{a} and {b}" for a in texts for b in texts if a != b]
    return out[:n]


def make_config(tmp_path: Path, model: Path, texts: list[str], **teacher) -> dict:
    teachers = [{"name": "bert", "model": str(model), "pooling": "mean", "shard_size": 8, **teacher}]
    return precompute_config(tmp_path, teachers, texts)


def write_yaml(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def one_thread_run(cfg: dict) -> list[Path]:
    """In-process precompute with one thread, like each torchrun worker (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_precompute(from_dict(cfg))
    finally:
        torch.set_num_threads(threads)


def cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# Equivalence with sentence-transformers


@pytest.mark.parametrize(
    "model, pooling, st_pooling, prompt",
    [
        ("tiny_bert", "cls", "cls", ""),
        ("tiny_bert", "mean", "mean", ""),
        ("tiny_bert", "mean", "mean", "query: "),
        ("tiny_qwen2", "last_token", "lasttoken", ""),
        ("tiny_qwen2", "last_token", "lasttoken", "Instruct: find the text\nQuery: "),
    ],
)
def test_vectors_equal_sentence_transformers(request, tmp_path, texts, model, pooling, st_pooling, prompt):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    path = request.getfixturevalue(model)
    transformer = Transformer(str(path), max_seq_length=48)
    st = SentenceTransformer(
        modules=[transformer, Pooling(32, pooling_mode=st_pooling), Normalize()], device="cpu"
    )
    corpus = corpus_texts(texts, 40)
    want = st.encode(corpus, prompt=prompt or None, batch_size=16)

    teacher = TeacherConfig(name="t", model=str(path), pooling=pooling, prompt=prompt, batch_tokens=200)
    encoder = TeacherEncoder(teacher, max_length=48)
    if model == "tiny_qwen2":
        assert encoder.left_padding
    got = encoder.encode(corpus)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert (got * want).sum(axis=1).min() >= 0.9999

    cfg = make_config(tmp_path, path, corpus, pooling=pooling, prompt=prompt)
    cfg["data"]["max_length"] = 48
    (folder,) = run_precompute(from_dict(cfg))
    cached = np.asarray(TeacherCache(folder).vectors, dtype=np.float32)
    cos = (cached * want).sum(axis=1) / np.linalg.norm(cached, axis=1)
    assert cos.min() >= 0.999


def test_length_batches_respect_the_token_budget():
    lengths = np.array([50, 40, 40, 30, 10, 10, 10, 10, 9, 3, 1])
    batches = length_batches(lengths, batch_tokens=80, max_batch_size=4)
    assert batches == [(0, 1), (1, 3), (3, 5), (5, 9), (9, 11)]
    assert length_batches(np.array([500, 2]), batch_tokens=100, max_batch_size=8) == [(0, 1), (1, 2)]
    for start, stop in batches:
        assert (stop - start) * lengths[start] <= 80 and stop - start <= 4


def test_batch_limits_use_cpu_sized_defaults_on_cpu():
    teacher = TeacherConfig(name="t", model="m")
    assert batch_limits(teacher, torch.device("cpu")) == (1024, 64)
    assert batch_limits(teacher, torch.device("cuda")) == (32768, 1024)
    custom = TeacherConfig(name="t", model="m", batch_tokens=300, max_batch_size=7)
    assert batch_limits(custom, torch.device("cpu")) == (300, 7)


def test_encode_keeps_input_order_whatever_the_batching(tiny_bert, texts):
    corpus = corpus_texts(texts, 30)
    small = TeacherEncoder(TeacherConfig(name="t", model=str(tiny_bert), batch_tokens=30), max_length=32)
    big = TeacherEncoder(TeacherConfig(name="t", model=str(tiny_bert), batch_tokens=4096), max_length=32)
    one_by_one = np.concatenate([big.encode([t]) for t in corpus])
    np.testing.assert_allclose(small.encode(corpus), one_by_one, atol=1e-5)
    np.testing.assert_allclose(big.encode(corpus), one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(one_by_one, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Padding-free (packed) forward: the same vectors as a padded forward, causal and bidirectional


def make_bidirectional(model) -> None:
    """Qwen2 attending both ways, as gte-Qwen2's remote code makes it: attention modules not causal,
    and (transformers 5) the config's ``is_causal`` off so the padding mask is built bidirectional."""
    model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


@pytest.mark.parametrize(
    "model, pooling, bidirectional",
    [
        ("tiny_bert", "cls", False),
        ("tiny_bert", "mean", False),
        ("tiny_qwen2", "last_token", False),
        ("tiny_qwen2", "mean", False),
        ("tiny_qwen2", "last_token", True),
        ("tiny_qwen2", "mean", True),
    ],
)
def test_packed_forward_gives_the_padded_vectors(request, texts, model, pooling, bidirectional):
    path = request.getfixturevalue(model)
    corpus = corpus_texts(texts, 40)
    teacher = TeacherConfig(name="t", model=str(path), pooling=pooling, batch_tokens=300)
    padded = TeacherEncoder(teacher, max_length=48, packed=False)
    packed = TeacherEncoder(teacher, max_length=48, packed=True)
    assert packed.packed and not padded.packed
    assert packed.model.config._attn_implementation == "stella_packed"
    if bidirectional:
        causal = packed.encode(corpus)
        for encoder in (padded, packed):
            make_bidirectional(encoder.model)
    want, got = padded.encode(corpus), packed.encode(corpus)
    assert (got * want).sum(axis=1).min() >= 0.9999
    if bidirectional:  # the switch really changed the attention, in both paths alike
        assert (got * causal).sum(axis=1).min() < 0.999


def test_packing_that_disagrees_with_padding_is_dropped_with_a_line(tiny_qwen2, monkeypatch):
    from stella_distill import packed as packed_module

    monkeypatch.setattr(packed_module, "_is_causal", lambda module, is_causal: False)  # a broken kernel
    lines = []
    encoder = TeacherEncoder(
        TeacherConfig(name="t", model=str(tiny_qwen2), pooling="mean"),
        max_length=48,
        packed=True,
        log=lines.append,
    )
    assert not encoder.packed and encoder.model.config._attn_implementation == "sdpa"
    assert (
        len(lines) == 1
        and "teachers.0: padding-free (packed) attention not used for Qwen2Model: it gives other vectors"
        in lines[0]
    )


def test_packing_that_fails_is_dropped_with_a_line(tiny_bert, monkeypatch):
    from transformers import AttentionInterface

    def no_kernel(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore detail")

    monkeypatch.setitem(AttentionInterface._global_mapping, "stella_packed", no_kernel)
    monkeypatch.setattr("stella_distill.packed.register", lambda: None)  # keep the failing kernel
    lines = []
    teacher = TeacherConfig(name="t", model=str(tiny_bert), pooling="cls")
    encoder = TeacherEncoder(teacher, max_length=32, packed=True, log=lines.append)
    assert not encoder.packed and encoder.model.config._attn_implementation == "sdpa"
    assert lines == [
        "teachers.0: padding-free (packed) attention not used for BertModel: it failed: "
        "FlashAttention only supports Ampere GPUs or newer."
    ]
    assert encoder.encode(["war and peace"]).shape == (1, 32)


def test_prefetched_tokens_are_used_for_the_same_texts_only(tiny_bert, texts):
    encoder = TeacherEncoder(TeacherConfig(name="t", model=str(tiny_bert)), max_length=32)
    corpus = corpus_texts(texts, 12)
    want = encoder.encode(corpus)
    encoder.device = torch.device("cuda")  # prefetch only runs on a GPU; the forward is not reached
    encoder.prefetch(corpus)
    assert encoder._ahead is not None and encoder._ahead[0] is corpus
    encoder.device = torch.device("cpu")
    np.testing.assert_array_equal(encoder.encode(corpus), want)
    assert encoder._ahead is None


# ---------------------------------------------------------------------------------------------
# The job: processes, resume, reruns, refusals


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert):
    """A 1-process cache of 120 texts in 15 shards, and the config that made it."""
    tmp = tmp_path_factory.mktemp("reference")
    from tiny import TEXTS

    cfg = make_config(tmp, tiny_bert, corpus_texts(list(TEXTS), 120))
    (folder,) = one_thread_run(cfg)
    return cfg, folder


def test_reference_cache_layout(reference):
    cfg, folder = reference
    assert sorted(p.name for p in folder.iterdir()) == [
        "build.json",
        "manifest.json",
        "row_hashes.npy",
        "shards",
        "vectors.npy",
    ]
    assert len(list((folder / "shards").glob("shard-*.json"))) == 15
    cache = TeacherCache(folder)
    assert len(cache) == 120 and cache.dim == 32 and cache.vectors.dtype == np.float16
    m = cache.manifest
    assert (m["teacher"], m["pooling"], m["max_length"], m["dtype"], m["storage_dtype"]) == (
        "bert",
        "mean",
        64,
        "float32",
        "float16",
    )
    assert m["revision"].startswith("sha256:") and m["complete"] is True and m["invalid_rows"] == []


def test_two_processes_write_the_same_cache_as_one(tmp_path, reference):
    cfg, ref_folder = reference
    cfg = {**cfg, "cache_dir": str(tmp_path / "cache")}
    config = write_yaml(tmp_path, cfg)
    proc = cli(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "stella_distill", "precompute", str(config)],
        cwd=tmp_path,
    )
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "world_size=2" in out and "MULTI_CPU" in out, out
    assert "120 encoded now in 15 shards on 2 process(es)" in out
    assert cache_files(tmp_path / "cache" / "bert") == cache_files(ref_folder)


def test_kill_9_then_resume_is_byte_identical(tmp_path, reference):
    cfg, _ = reference
    cfg = {**cfg, "cache_dir": str(tmp_path / "cache")}
    cfg["teachers"] = [{**cfg["teachers"][0], "shard_size": 1}]  # 120 shards: plenty to kill in the middle
    config = write_yaml(tmp_path, cfg)
    folder = tmp_path / "cache" / "bert"
    command = [sys.executable, "-m", "stella_distill", "precompute", str(config)]

    def records() -> int:
        return len(list((folder / "shards").glob("shard-*.json")))

    def run_and_kill(after: int) -> int:
        """Start the job, kill -9 it once `after` shard records exist; return how many there were."""
        proc = cli(command, cwd=tmp_path)
        deadline = time.monotonic() + 120
        while records() < after and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        done = records()
        assert not (folder / "manifest.json").exists() and after <= done < 120, done
        with pytest.raises(CacheError, match=rf"incomplete \({done} of 120 shards done\)"):
            TeacherCache(folder)
        return done

    first = run_and_kill(1)
    second = run_and_kill(first + 20)  # a resumed run, killed in its turn
    proc = cli(command, cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert f"{120 - second} encoded now in {120 - second} shards" in out
    # Byte-identical to an uninterrupted run of the same config.
    uninterrupted = tmp_path / "again"
    one_thread_run({**cfg, "cache_dir": str(uninterrupted)})
    assert cache_files(folder) == cache_files(uninterrupted / "bert")


def test_rerun_of_a_complete_cache_does_nothing(reference, monkeypatch, capsys):
    cfg, folder = reference
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    def no_model(*args, **kwargs):
        raise AssertionError("the teacher must not be loaded for a complete cache")

    monkeypatch.setattr("stella_distill.precompute.TeacherEncoder", no_model)
    assert run_precompute(from_dict(cfg)) == [folder]
    assert "complete and matches; nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def _save_dense(dense, folder: Path, *, safe: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dense.save(str(folder), safe_serialization=safe)


def _with_dense_head(model: Path, into: Path, *, safe: bool, out_features: int = 48):
    """A copy of ``model`` with a random sentence-transformers Dense head in ``2_Dense_<out>``
    (Linear + bias, Identity activation: the layout of stella_en_1.5B_v5's ``2_Dense_8192``)."""
    import shutil

    from sentence_transformers.sentence_transformer.modules import Dense

    shutil.copytree(model, into)
    torch.manual_seed(7)
    dense = Dense(32, out_features, bias=True, activation_function=torch.nn.Identity())
    _save_dense(dense, into / f"2_Dense_{out_features}", safe=safe)
    return into, dense


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_dense_head_is_applied_like_sentence_transformers(tmp_path, tiny_qwen2, texts, safe):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    model, dense = _with_dense_head(tiny_qwen2, tmp_path / "teacher", safe=safe)
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    assert (model / "2_Dense_48" / weights).is_file()
    st = SentenceTransformer(
        modules=[
            Transformer(str(model), max_seq_length=48),
            Pooling(32, pooling_mode="lasttoken"),
            dense,
            Normalize(),
        ],
        device="cpu",
    )
    corpus = corpus_texts(texts, 30)
    prompt = "Instruct: find the text\nQuery: "
    want = st.encode(corpus, prompt=prompt, batch_size=8)
    assert want.shape == (30, 48)

    cfg = make_config(tmp_path, model, corpus, pooling="last_token", prompt=prompt, dense="2_Dense_48")
    cfg["data"]["max_length"] = 48
    (folder,) = run_precompute(from_dict(cfg))
    cache = TeacherCache(folder)
    assert cache.dim == 48 and cache.manifest["dense"].startswith("2_Dense_48 (sha256:")
    cached = np.asarray(cache.vectors, dtype=np.float32)
    cos = (cached * want).sum(axis=1) / np.linalg.norm(cached, axis=1)
    assert cos.min() >= 0.999

    # the head is part of what the cache is for: dropping it, or new head weights, is refused
    without = {**cfg, "teachers": [{**cfg["teachers"][0], "dense": None}]}
    with pytest.raises(
        CacheError, match=r"built for dense '2_Dense_48 \(sha256:.*config says None \(teachers\.0\.dense\)"
    ):
        run_precompute(from_dict(without))
    torch.manual_seed(8)
    _save_dense(Dense(32, 48, activation_function=torch.nn.Identity()), model / "2_Dense_48", safe=safe)
    with pytest.raises(CacheError, match=r"teachers\.0\.dense"):
        run_precompute(from_dict(cfg))


def test_dense_head_errors_name_the_field(tmp_path, tiny_bert, texts):
    model, _ = _with_dense_head(tiny_bert, tmp_path / "teacher", safe=True)
    teacher = {"name": "t", "model": str(model), "pooling": "mean"}
    with pytest.raises(UserError, match=r"^teachers\.0\.dense: .*2_Dense_99: no Dense module here"):
        TeacherEncoder(TeacherConfig(**teacher, dense="2_Dense_99"), max_length=32)
    with pytest.raises(UserError, match=r"^teachers\.0\.dense: .*nowhere: no such folder"):
        TeacherEncoder(TeacherConfig(**teacher, dense=str(tmp_path / "nowhere")), max_length=32)
    # a head made for another model: 64-d input, the teacher pools to 32-d
    from sentence_transformers.sentence_transformer.modules import Dense

    _save_dense(Dense(64, 16), tmp_path / "wide")
    encoder = TeacherEncoder(TeacherConfig(**teacher, dense=str(tmp_path / "wide")), max_length=32)
    with pytest.raises(
        UserError, match=r"^teachers\.0\.dense: the Dense module takes 64-d input; .* pools to 32-d"
    ):
        encoder.encode(["the cat"])
    # a folder of its own (dense: /path) works the same as a subfolder
    own = TeacherEncoder(TeacherConfig(**teacher, dense=str(model / "2_Dense_48")), max_length=32)
    sub = TeacherEncoder(TeacherConfig(**teacher, dense="2_Dense_48"), max_length=32)
    np.testing.assert_array_equal(own.encode(texts), sub.encode(texts))
    assert own.dim == 48


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pooling": "cls"}, r"built for pooling 'mean', config says 'cls' \(teachers\.0\.pooling\)"),
        ({"prompt": "query: "}, r"built for prompt '', config says 'query: ' \(teachers\.0\.prompt\)"),
    ],
)
def test_refuses_to_overwrite_a_cache_built_for_something_else(reference, change, message):
    cfg, folder = reference
    cfg = {**cfg, "teachers": [{**cfg["teachers"][0], **change}]}
    with pytest.raises(CacheError, match=message + r".*will not overwrite it: remove"):
        run_precompute(from_dict(cfg))
    TeacherCache(folder)


def test_refuses_to_resume_an_unfinished_build_for_another_corpus(tmp_path, tiny_bert, texts, monkeypatch):
    cfg = make_config(tmp_path, tiny_bert, corpus_texts(texts, 24))
    calls = []
    original = TeacherEncoder.encode

    def encode_then_die(self, batch, progress=None):
        calls.append(len(batch))
        if len(calls) > 2:  # the dim probe, shard 0, then a crash in shard 1
            raise KeyboardInterrupt
        return original(self, batch, progress)

    monkeypatch.setattr(TeacherEncoder, "encode", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(from_dict(cfg))
    monkeypatch.setattr(TeacherEncoder, "encode", original)
    folder = tmp_path / "cache" / "bert"
    assert [p.name for p in (folder / "shards").iterdir()] == ["shard-00000.json"]

    other = {**cfg, "data": {**cfg["data"], "limit": 23}}
    with pytest.raises(
        CacheError, match=r"built for a corpus of 24 rows, the corpus now has 23.*unfinished build"
    ):
        run_precompute(from_dict(other))
    (resumed,) = run_precompute(from_dict(cfg))
    assert len(TeacherCache(resumed)) == 24


def test_nan_teacher_rows_are_reported_stored_as_zeros_and_masked(
    tmp_path, tiny_bert, texts, monkeypatch, capsys
):
    corpus = corpus_texts(texts, 30)
    poisoned = {3, 17, 18}
    original = TeacherEncoder.encode

    def encode_with_nans(self, batch, progress=None):
        out = original(self, batch, progress)
        for r, text in enumerate(batch):
            if text in {corpus[i] for i in poisoned}:
                out[r, r % out.shape[1]] = np.nan if r % 2 else np.inf
        return out

    monkeypatch.setattr(TeacherEncoder, "encode", encode_with_nans)
    (folder,) = run_precompute(from_dict(make_config(tmp_path, tiny_bert, corpus)))
    err = capsys.readouterr().err  # a warning: stderr, shown under -q too
    assert "3 rows gave NaN/inf vectors (rows 3, 17, 18)" in err
    cache = TeacherCache(folder)
    assert cache.manifest["invalid_rows"] == [3, 17, 18]
    assert np.flatnonzero(~cache.valid_mask).tolist() == [3, 17, 18]
    assert not np.asarray(cache.vectors[[3, 17, 18]]).any()
    assert np.isfinite(np.asarray(cache.vectors, dtype=np.float32)).all()
    assert (
        np.linalg.norm(np.asarray(cache.vectors, dtype=np.float32)[cache.valid_mask], axis=1) > 0.99
    ).all()
