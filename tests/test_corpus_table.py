"""The corpus table: built once, reused while the sources are unchanged, rebuilt when they change, never
used torn (kill -9 anywhere), built by one process under torchrun, read in bounded memory, deduplicated
exactly."""

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stella_distill import data
from stella_distill.config import ConfigError, DataConfig, SourceConfig, from_dict
from stella_distill.data import load_corpus, table_folder
from stella_distill.dedupe import Deduper
from stella_distill.errors import UserError
from stella_distill.fingerprints import corpus_fingerprint, text_hashes

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*paths, **data_fields) -> DataConfig:
    return DataConfig(train=[SourceConfig(path=str(p)) for p in paths], **data_fields)


def _load(cfg: DataConfig, cache_dir, log: list | None = None):
    lines: list[str] = []
    corpus = load_corpus(cfg, log=lines.append, cache_dir=cache_dir)
    if log is not None:
        log.extend(lines)
    return corpus


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def _lines(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


def _random_texts(n: int, distinct: int, seed: int) -> list[str]:
    """``n`` short texts drawn from ``distinct`` ones (many repeats), some non-ASCII."""
    rng = np.random.default_rng(seed)
    pool = [f"text {i} " + "éa"[i % 2] * (i % 7) for i in range(distinct)]
    return [pool[k] for k in rng.integers(0, distinct, size=n)]


def test_the_table_is_built_once_and_reads_like_the_sources(tmp_path):
    texts = _random_texts(300, 120, seed=0)
    a = _lines(tmp_path / "a.txt", texts[:200])
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[200:]), encoding="utf-8")
    cfg, log = _cfg(a, b, dedupe=True), []
    corpus = _load(cfg, tmp_path / "cache", log)
    want = list(dict.fromkeys(texts))  # first occurrences, in order
    assert list(corpus.texts) == want and len(corpus) == len(want)
    assert np.array_equal(corpus.row_hashes, text_hashes(want))
    assert corpus.fingerprint == corpus_fingerprint(text_hashes(want))  # teacher caches stay valid
    assert corpus.lengths.tolist() == [len(t) for t in want]
    assert "built in" in log[-1] and f"dropped {300 - len(want)} duplicates" in log[-1]
    folder = table_folder(tmp_path / "cache", cfg)
    assert corpus.path.parent == folder and folder.parent.name == "corpus"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", corpus.path.name, "corpus.json"]

    again = _load(cfg, tmp_path / "cache", log)
    assert "(sources unchanged)" in log[-1] and again.fingerprint == corpus.fingerprint
    assert list(again.texts) == want and again.stats == corpus.stats

    import datasets  # the table is an ordinary Arrow stream file: datasets memory-maps it as it is

    ds = datasets.Dataset.from_file(str(corpus.path))
    assert ds["text"] == want and ds["row_hash"] == text_hashes(want).tolist()


def test_rows_by_index_slice_and_list_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_BATCH_ROWS", 7)  # many record batches: rows cross their bounds
    texts = [f"row {i} " + "ü" * (i % 3) for i in range(40)]
    corpus = _load(_cfg(_lines(tmp_path / "a.txt", texts)), tmp_path / "cache")
    assert corpus.texts._column.num_chunks == 6
    got = corpus.texts
    assert [got[i] for i in range(40)] == texts and got[-1] == texts[-1]
    assert got[5:23] == texts[5:23] and got[30:100] == texts[30:] and got[::9] == texts[::9]
    assert got[np.array([39, 0, 13, 13, 6])] == [texts[i] for i in (39, 0, 13, 13, 6)]
    assert got[[]] == [] and got[[-1]] == [texts[-1]]
    with pytest.raises(IndexError):
        got[40]
    with pytest.raises(IndexError):
        got[np.array([3, 40])]


def test_an_edited_source_is_detected_and_the_table_rebuilt(tmp_path):
    a = _lines(tmp_path / "a.txt", ["alpha", "beta", "gamma"])
    cfg, cache, log = _cfg(a), tmp_path / "cache", []
    first = _load(cfg, cache, log)
    folder = first.path.parent
    # the same size and the old modification time: only the content hash can tell
    stat = a.stat()
    a.write_text("alpha\nbeta\ngamme\n", encoding="utf-8")
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = _load(cfg, cache, log)
    assert list(edited.texts) == ["alpha", "beta", "gamme"]
    assert f"rebuilt: data.train.0: {a} changed (content differs, same size and time)" in log[-1]
    assert not first.path.exists() and sorted(p.name for p in folder.iterdir()) == [
        ".lock", edited.path.name, "corpus.json"
    ]  # fmt: skip
    assert list(first.texts) == ["alpha", "beta", "gamma"]  # a process that had it open still reads it
    os.utime(a)  # touched only: same bytes, same table
    assert _load(cfg, cache, log).path == edited.path and "(sources unchanged)" in log[-1]
    with a.open("a") as f:
        f.write("delta\n")
    assert list(_load(cfg, cache, log).texts)[-1] == "delta" and "changed (size 17 -> 23 bytes)" in log[-1]
    # another data config gets its own table; both stay
    limited = _load(_cfg(a, limit=2), cache, log)
    assert list(limited.texts) == ["alpha", "beta"] and limited.path.parent != folder
    _load(cfg, cache, log)
    assert "(sources unchanged)" in log[-1]


def test_a_folder_source_is_identified_by_its_files(tmp_path):
    (tmp_path / "docs").mkdir()
    _lines(tmp_path / "docs" / "a.txt", ["one"])
    cfg, cache, log = _cfg(tmp_path / "docs"), tmp_path / "cache", []
    _load(cfg, cache, log)
    (tmp_path / "docs" / "notes.md").write_text("not a data file")
    _load(cfg, cache, log)
    assert "(sources unchanged)" in log[-1]
    _lines(tmp_path / "docs" / "b.txt", ["two"])
    assert list(_load(cfg, cache, log).texts) == ["one", "two"] and "b.txt is new" in log[-1]


def test_source_files_are_identified_by_their_bytes_block_by_block(tmp_path, monkeypatch):
    """sha256 of the bytes; over one block, sha256 of the blocks' sha256 (threads share a big file)."""
    from stella_distill import sources

    monkeypatch.setattr(sources, "_BLOCK", 1000)
    rng = np.random.default_rng(6)
    files = {"big.txt": rng.bytes(3500), "one_block.txt": rng.bytes(1000), "empty.txt": b""}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    got = sources.identities([SourceConfig(path=str(tmp_path / n)) for n in files])
    big = files["big.txt"]
    blocks = b"".join(hashlib.sha256(big[k : k + 1000]).digest() for k in range(0, 3500, 1000))
    want = [hashlib.sha256(blocks).hexdigest(), hashlib.sha256(files["one_block.txt"]).hexdigest(),
            hashlib.sha256(b"").hexdigest()]  # fmt: skip
    assert [g["files"][0]["sha256"] for g in got] == want
    assert [g["files"][0]["size"] for g in got] == [3500, 1000, 0]


def test_dedupe_is_exact_when_hashes_collide(tmp_path, monkeypatch):
    """A weak hash (the length mod 5) makes most different texts collide: only equal texts may go,
    also when the earlier copy sits in a batch already written (read back from the table file)."""

    def weak_hashes(texts):
        return np.array([len(t) % 5 for t in texts], dtype=np.uint64)

    monkeypatch.setattr(data, "text_hashes", weak_hashes)
    monkeypatch.setattr(data, "_BATCH_ROWS", 16)
    texts = _random_texts(500, 90, seed=1)
    cfg = _cfg(_lines(tmp_path / "a.txt", texts), dedupe=True)
    corpus = _load(cfg, tmp_path / "cache")
    want = list(dict.fromkeys(texts))
    assert list(corpus.texts) == want and corpus.stats["duplicates_dropped"] == 500 - len(want)
    assert corpus.row_hashes.tolist() == weak_hashes(want).tolist()
    limited = _load(_cfg(tmp_path / "a.txt", dedupe=True, limit=50), tmp_path / "cache2")
    assert list(limited.texts) == want[:50]  # data.limit applies after dedupe


@pytest.mark.parametrize("cap", [1 << 20, 32])
def test_deduper_against_a_set(monkeypatch, cap):
    from stella_distill import dedupe as dedupe_module

    monkeypatch.setattr(dedupe_module, "_RUN_CAP", cap)  # 32: runs stop merging early
    rng = np.random.default_rng(3)
    stored: list[str] = []
    dedupe = Deduper(lambda rows: [stored[r] for r in rows])
    seen: set[str] = set()
    for _ in range(30):
        batch = [f"t{k}" for k in rng.integers(0, 200, size=rng.integers(1, 40))]
        hashes = np.array([int(t[1:]) % 17 for t in batch], dtype=np.uint64)  # collisions galore
        keep = dedupe.first_occurrences(batch, hashes)
        want = []
        for t in batch:
            want.append(t not in seen)
            seen.add(t)
        assert keep.tolist() == want
        kept = np.flatnonzero(keep)
        dedupe.add(hashes[kept], np.arange(len(stored), len(stored) + len(kept)))
        stored.extend(batch[k] for k in kept)
    assert len(stored) == len(seen)
    sizes = [len(h) for h, _ in dedupe._runs]
    assert len(sizes) <= (6 if cap > 1000 else 12) and (cap > 1000 or max(sizes) < 2 * cap + 40), sizes


def test_data_limit_stops_reading_at_the_row_that_fills_it(tmp_path):
    texts = _random_texts(5000, 400, seed=2)
    path = _lines(tmp_path / "a.txt", texts)
    other = _lines(tmp_path / "b.txt", ["never read"])
    log: list[str] = []
    corpus = _load(_cfg(path, other, dedupe=True, limit=100), tmp_path / "cache", log)
    want = list(dict.fromkeys(texts))[:100]
    assert list(corpus.texts) == want
    last = texts.index(want[-1])  # the row that made it 100
    assert corpus.stats["read"] == last + 1 and corpus.stats["stopped_at_limit"]
    assert [s["read"] for s in corpus.stats["sources"]] == [last + 1, 0]  # b.txt is never read
    assert "stopped reading at data.limit" in log[-1]


def test_failed_builds_leave_cache_dir_as_found_and_keep_a_good_table(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        _load(_cfg(bad), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    a = _lines(tmp_path / "a.txt", ["one", "two"])
    good = _load(_cfg(a), tmp_path / "cache")
    before = _folder_files(good.path.parent)
    a.write_bytes(b"one\n\xff\n")
    with pytest.raises(UserError, match=r"a\.txt:2: not UTF-8 text"):
        _load(_cfg(a), tmp_path / "cache")
    assert _folder_files(good.path.parent) == before  # the old table and manifest are untouched


def test_unwritable_cache_dir_builds_a_temporary_table(tmp_path):
    a = _lines(tmp_path / "a.txt", ["one", "two"])
    (tmp_path / "afile").write_text("not a folder")
    log: list[str] = []
    corpus = _load(_cfg(a), tmp_path / "afile" / "cache", log)
    assert list(corpus.texts) == ["one", "two"] and "building it in a temporary folder" in log[0]
    assert not corpus.path.exists()  # mapped, and gone from the disk already


def test_a_teacher_cannot_take_the_corpus_folder_name(tmp_path):
    cfg = {"name": "x", "output_dir": "run", "cache_dir": "cache", "data": {"train": [{"path": "a.txt"}]},
           "teachers": [{"name": "corpus", "model": "m"}]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"teachers\.0\.name: 'corpus' is reserved: cache_dir/corpus holds"):
        from_dict(cfg)
    cfg = {**cfg, "teachers": [{"name": "t", "model": "m"}], "output_dir": "cache/corpus/run"}
    with pytest.raises(ConfigError, match=r"output_dir: cache/corpus/run lies inside cache_dir/corpus"):
        from_dict(cfg)


# ---------------------------------------------------------------------------------------------
# kill -9 anywhere


def _killed_build(cfg: DataConfig, cache: Path, target: str, n: int) -> None:
    """In a forked child: run the build and SIGKILL the child at the n-th call of ``target``."""
    from stella_distill import arrow_table

    def run():
        obj, name = {
            "writer": (arrow_table.TableWriter, "write"),
            "values_at": (arrow_table.TableWriter, "values_at"),
            "fsync": (os, "fsync"),
            "replace": (os, "replace"),
        }[target]
        original, calls = getattr(obj, name), [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(obj, name, dying)
        load_corpus(cfg, log=lambda _: None, cache_dir=cache)
        os._exit(3)  # the kill point was never reached

    child = multiprocessing.get_context("fork").Process(target=run)
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, (target, n, child.exitcode)


@pytest.mark.parametrize(
    "target, n",
    [("writer", 1), ("writer", 4), ("values_at", 2), ("fsync", 1), ("fsync", 2), ("fsync", 3),
     ("fsync", 4), ("replace", 1), ("replace", 2)],
)  # fmt: skip
def test_a_build_killed_anywhere_is_never_used_and_a_rerun_gives_the_same_table(
    tmp_path, monkeypatch, target, n
):
    """Kill points: before the 1st / 4th record batch is written, while the dedupe reads an earlier
    row back, at each fsync (the table file, the folder after its rename, the manifest's temp file,
    the folder after that rename) and at each rename (the table, the manifest). The table being replaced is a stale one, so a kill that
    leaves it in place must not get it used."""
    monkeypatch.setattr(data, "_BATCH_ROWS", 8)
    texts = _random_texts(80, 60, seed=4)
    src = _lines(tmp_path / "a.txt", texts)
    cfg = _cfg(src, dedupe=True)
    reference = _load(cfg, tmp_path / "ref")
    want = _folder_files(reference.path.parent)
    cache = tmp_path / "cache"
    stat = src.stat()
    src.write_text("stale\n")
    _load(cfg, cache)  # a table for other content, to be replaced
    _lines(src, texts)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the reference's file exactly
    _killed_build(cfg, cache, target, n)
    folder = table_folder(cache, cfg)
    log: list[str] = []
    corpus = _load(cfg, cache, log)
    assert list(corpus.texts) == list(dict.fromkeys(texts))
    assert _folder_files(folder) == want, sorted(os.listdir(folder))  # byte for byte, no leftovers
    # a kill after the manifest's rename left a finished table: it is used as it is
    assert ("(sources unchanged)" in log[-1]) == (target == "fsync" and n == 4)


# ---------------------------------------------------------------------------------------------
# Several processes


_TWO_PROCESSES = """
import hashlib, json, sys
from accelerate import PartialState
state = PartialState(cpu=True)
from stella_distill.config import DataConfig, SourceConfig
from stella_distill.data import load_corpus
cfg = DataConfig(train=[SourceConfig(path=sys.argv[1])], dedupe=True)
corpus = load_corpus(cfg, cache_dir=sys.argv[2], log=print if state.is_main_process else (lambda _: None))
texts = hashlib.sha256("\\n".join(corpus.texts).encode()).hexdigest()
out = {"world": state.num_processes, "type": str(state.distributed_type), "texts": texts,
       "fingerprint": corpus.fingerprint, "rows": len(corpus), "path": str(corpus.path)}
open(f"{sys.argv[3]}/rank{state.process_index}.json", "w").write(json.dumps(out))
from stella_distill.distributed import leave_process_group
leave_process_group()  # as every verb ends: a gloo group left to interpreter shutdown can abort
"""


def test_two_processes_build_the_same_table_as_one(tmp_path):
    texts = _random_texts(3000, 2000, seed=5)
    src = _lines(tmp_path / "a.txt", texts)
    one = _load(_cfg(src, dedupe=True), tmp_path / "one")
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESSES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(src), str(tmp_path / "two"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and all("MULTI_CPU" in r["type"] for r in ranks)
    want_texts = hashlib.sha256("\n".join(one.texts).encode()).hexdigest()
    assert all(r["texts"] == want_texts and r["fingerprint"] == one.fingerprint for r in ranks)
    assert ranks[0]["path"] == ranks[1]["path"]  # one table, opened by both
    assert proc.stdout.count("built in") == 1  # rank 0 built it, rank 1 waited
    two = Path(ranks[0]["path"]).parent
    assert _folder_files(two) == _folder_files(one.path.parent)  # byte for byte


# ---------------------------------------------------------------------------------------------
# Memory


_MEMORY = """
import json, sys
def status():
    values = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        values[key] = int(value.split()[0]) * 1024 if key in ("VmHWM", "RssAnon", "RssFile") else None
    return values
from stella_distill.config import DataConfig, SourceConfig
from stella_distill.data import load_corpus
cfg = DataConfig(train=[SourceConfig(path=sys.argv[1])], dedupe=True)
imported = status()
corpus = load_corpus(cfg, cache_dir=sys.argv[2], log=lambda _: None)
built = status()
anon, chars = [], 0
for start in range(0, len(corpus), 1024):  # every text, through the memory map
    chars += sum(map(len, corpus.texts[start : start + 1024]))
    anon.append(status()["RssAnon"])
rng = __import__("numpy").random.default_rng(0)
for _ in range(20):  # and batches in random order, as training reads them
    corpus.texts[rng.integers(0, len(corpus), size=256)]
    anon.append(status()["RssAnon"])
print(json.dumps({"peak_build": built["VmHWM"], "base": imported["VmHWM"], "anon_read": max(anon),
                  "file_read": status()["RssFile"], "chars": chars, "rows": len(corpus)}))
"""


def test_a_corpus_several_times_larger_than_memory_builds_and_reads(tmp_path):
    """A child builds a 360 MB corpus (4 KB documents, some repeated) with dedupe and reads every text:
    the resident memory its build adds over its imported libraries, its whole peak, and its private
    memory while reading (the mapped table's pages are page cache, shared and reclaimable) stay a
    fraction of the text."""
    rng = np.random.default_rng(0)
    pool = rng.integers(97, 123, size=1 << 22, dtype=np.uint8)
    pool[rng.random(1 << 22) < 0.15] = 32
    pool = pool.tobytes()
    docs = 90_000
    offsets = rng.integers(0, len(pool) - 4096, size=docs)
    offsets[1::50] = offsets[::50][: len(offsets[1::50])]  # repeats for the dedupe
    src = tmp_path / "docs.txt"
    with src.open("wb") as f:
        for k in range(0, docs, 512):
            f.write(b"".join(pool[o : o + 4095] + b"\n" for o in offsets[k : k + 512]))
    size = src.stat().st_size
    script = tmp_path / "memory.py"
    script.write_text(_MEMORY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), str(src), str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rows"] == len(set(offsets.tolist())) and got["chars"] > 0.95 * size
    # what the build adds over the libraries it imported (those differ between machines: 65-100 MB)
    assert (got["peak_build"] - got["base"]) * 4 < size, (got, size)
    assert got["peak_build"] * 2 < size, (got, size)
    assert got["anon_read"] * 4 < size, (got, size)
    assert got["file_read"] > 0.9 * size  # the texts were really read, through the map
