"""The corpus at scale: the memory-mapped corpus table against the list-of-strings loader it replaced.

One run, one synthetic corpus (a .txt file of ``--texts`` texts of ``--phrases`` random phrases, some
exact repeats, ``data.dedupe`` on as in the recipes), both loaders measured side by side:

- build and reopen: ``data.load_corpus`` into an empty ``cache_dir`` (reads, dedupes, hashes and
  writes the table), again (sources re-hashed, table memory-mapped), the table's open alone; against
  the list loader, which does its whole load on every verb;
- memory per process, with 1 and 2 processes (``torchrun``; the world size each process got is
  asserted), during the real ``precompute`` and a few steps of the real ``train`` (tiny random BERT
  teacher and student). The precompute resumes a cache whose shards are written but the last
  ``--encode-shards`` (random vectors, through the cache's own build protocol): the corpus is loaded
  (the table built, for the table loader), checked against the cache and read shard by shard as in
  any precompute, while the tiny teacher's tokenizer (~5k texts/s here) does not take an hour.
  Figures: peak private memory (RssAnon, sampled
  every 10 ms), peak resident memory (VmHWM: counts the mapped table's pages, which are page cache
  shared by every process and reclaimable) and the mapped file pages at the end (RssFile). "Above the
  model's own" subtracts the same run over a 8,192-text corpus (two cache shards: the encoder's
  working set per shard is the same in both runs); ratios are to the corpus file's size.

The list loader is ``data.load_corpus`` as it was before the table (re-stated below, reading the
sources through the same readers): every text in one Python list, a set of the strings for the
dedupe, a hash of every row, in every process, on every verb.

    python scripts/bench_corpus.py                              # 2,000,000 texts of ~140 B: ~15 min on 2 cores
    python scripts/bench_corpus.py --phrases 16                 # 2,000,000 texts of ~1.1 KB (2.2 GB)
    python scripts/bench_corpus.py --texts 200000 --json bench_corpus.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARD = 4096  # rows per teacher-cache shard (the default); the "model's own" corpus is 2 shards
sys.path[:0] = [str(REPO), str(REPO / "tests")]


# ---------------------------------------------------------------------------------------------
# The loader before the table


class _ListTexts(list):
    """A list that also takes an array of row ids, as the trainer indexes ``corpus.texts``."""

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer, slice)):
            return list.__getitem__(self, key)
        return [list.__getitem__(self, int(i)) for i in key]


class ListCorpus:
    def __init__(self, texts, row_hashes, fingerprint, stats):
        self.texts, self.row_hashes, self.fingerprint, self.stats = texts, row_hashes, fingerprint, stats
        self.path = None

    def __len__(self):
        return len(self.texts)

    @property
    def lengths(self):
        return np.fromiter((len(t) for t in self.texts), dtype=np.int64, count=len(self.texts))


def list_corpus(data_cfg, log=print, cache_dir=None) -> ListCorpus:
    """``load_corpus`` before the table: the same rows, fingerprint and summary counts."""
    from stella_distill import data, sources
    from stella_distill.fingerprints import corpus_fingerprint, text_hashes

    texts = _ListTexts()
    per_source = []
    for i, src in enumerate(data_cfg.train):
        counts = {"path": src.path, "read": 0, "skipped_empty": 0, "skipped_non_string": 0, "kept": 0}
        streaming = sources.streams(src, data_cfg.limit)
        for value in sources.iter_source(src, f"data.train.{i}", streaming=streaming, revision=None):
            counts["read"] += 1
            if not isinstance(value, str):
                counts["skipped_non_string"] += 1
                continue
            if value.endswith("\n"):
                value = value[:-1]
                if value.endswith("\r"):
                    value = value[:-1]
            if not value.strip():
                counts["skipped_empty"] += 1
                continue
            texts.append(value)
            counts["kept"] += 1
            if src.limit is not None and counts["kept"] >= src.limit:
                break
        per_source.append(counts)
    duplicates = 0
    if data_cfg.dedupe:
        seen: set[str] = set()
        unique = _ListTexts()
        for t in texts:
            if t in seen:
                duplicates += 1
                continue
            seen.add(t)
            unique.append(t)
        texts = unique
        del seen
    if data_cfg.limit is not None:
        texts = _ListTexts(texts[: data_cfg.limit])
    totals = {k: sum(s[k] for s in per_source) for k in ("read", "skipped_empty", "skipped_non_string")}
    stats = {**totals, "duplicates_dropped": duplicates, "rows": len(texts), "sources": per_source}
    log(data._summary_line(stats))
    hashes = text_hashes(texts)
    return ListCorpus(texts, hashes, corpus_fingerprint(hashes), stats)


# ---------------------------------------------------------------------------------------------
# One verb in one process (run under torchrun by the main script)


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                values[key] = int(value.split()[0]) * 1024
    return values


def worker(args) -> None:
    """Run ``args.verb`` with ``args.loader``; write this process's memory figures to ``args.out``."""
    peak = {"RssAnon": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["RssAnon"] = max(peak["RssAnon"], _status()["RssAnon"])
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from accelerate import PartialState

    from stella_distill import data, precompute
    from stella_distill import train as train_module
    from stella_distill.config import load_config
    from stella_distill.distributed import leave_process_group

    loader = list_corpus if args.loader == "list" else data.load_corpus
    load_seconds = []

    def timed_loader(*a, **k):
        t = time.perf_counter()
        corpus = loader(*a, **k)
        load_seconds.append(time.perf_counter() - t)
        return corpus

    precompute.load_corpus = train_module.load_corpus = timed_loader
    cfg = load_config(args.config)
    started = time.perf_counter()
    if args.verb == "precompute":
        precompute.run_precompute(cfg)
    else:
        train_module.train(cfg)
    seconds = time.perf_counter() - started
    state = PartialState()
    world, rank, kind = state.num_processes, state.process_index, str(state.distributed_type)
    leave_process_group()
    stop.set()
    sampler.join()
    peak["RssAnon"] = max(peak["RssAnon"], _status()["RssAnon"])
    end = _status()
    out = {"rank": rank, "world": world, "type": kind, "anon_peak": peak["RssAnon"], "hwm": end["VmHWM"],
           "file_end": end["RssFile"], "seconds": seconds, "load_seconds": load_seconds}  # fmt: skip
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# The run


def write_corpus(path: Path, n: int, seed: int, phrases: int) -> int:
    """``n`` texts of ``phrases`` random phrases each (3-24 words; with 2, a few % of the texts repeat by
    chance, ~140 bytes a text, like a 1 M-line file of short sentences; with 16, ~1.1 KB); returns the file's bytes."""
    from tiny import WORDS

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    pool = [" ".join(words[rng.integers(0, len(words), size=rng.integers(3, 25))]) for _ in range(4096)]
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, n, 50_000):
            picks = rng.integers(0, len(pool), size=(min(50_000, n - start), phrases))
            f.write("".join(" ".join(pool[k] for k in row) + "\n" for row in picks.tolist()))
    return path.stat().st_size


def experiment(root: Path, corpus: Path, teacher: Path, student: Path) -> dict:
    return {
        "name": "bench-corpus",
        "output_dir": str(root / "run"),
        "cache_dir": str(root / "cache"),
        "data": {"train": [{"path": str(corpus)}], "dedupe": True, "max_length": 16},
        # big batches of a tiny model: the encoder's time per text is small next to what is measured;
        # the same shard size for both corpora: a shard's working set is the same in both runs
        "teachers": [
            {
                "name": "t",
                "model": str(teacher),
                "pooling": "mean",
                "shard_size": SHARD,
                "batch_tokens": 16384,
                "max_batch_size": 1024,
            }
        ],  # fmt: skip
        "student": {"model": str(student), "pooling": "mean"},
        "stages": [{"name": "s", "trainable": "all", "steps": 3, "batch_size": 32, "lr": 1e-4}],
        "train": {"checkpoint_every": 0},
        "logging": {"progress": False, "wandb": {"mode": "disabled"}},
    }


def prefill(config: Path, corpus, left: int) -> None:
    """Write every shard of the config's teacher cache but the last ``left`` with random vectors,
    through the cache's build protocol, so that precompute resumes (nothing with ``left`` 0)."""
    if corpus is None or not left:
        return
    from transformers import AutoConfig

    from stella_distill.cache import CacheBuild, cache_folder
    from stella_distill.config import load_config

    cfg = load_config(config)
    teacher = cfg.teachers[0]
    build = CacheBuild.plan(
        cache_folder(cfg, teacher),
        teacher,
        index=0,
        max_length=cfg.teacher_max_length(teacher),
        corpus=corpus,
    )
    dim = AutoConfig.from_pretrained(teacher.model).hidden_size
    todo = build.start(dim, corpus.row_hashes)
    rng = np.random.default_rng(0)
    for k in todo[: max(len(todo) - left, 0)]:
        start, stop = build.bounds()[k]
        vectors = rng.standard_normal((stop - start, dim)).astype(np.float32)
        build.write_shard(k, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


def run_verb(verb: str, loader: str, procs: int, config: Path, out: Path) -> dict:
    """``verb`` under torchrun with ``procs`` processes; the per-process figures, world size checked."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           __file__, "worker", "--verb", verb, "--loader", loader, "--config", str(config), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{verb} {loader} x{procs} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
    assert all(r["world"] == procs for r in ranks), (
        ranks
    )  # a CPU launch can give N processes that each think they are alone
    return {
        "anon_peak": max(r["anon_peak"] for r in ranks),
        "hwm": max(r["hwm"] for r in ranks),
        "file_end": max(r["file_end"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
        "load_seconds": max(sum(r["load_seconds"]) for r in ranks),
        "type": ranks[0]["type"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=2_000_000)
    parser.add_argument("--phrases", type=int, default=2, help="phrases per text: 2 ~140 B, 16 ~1.1 KB")
    parser.add_argument("--procs", type=int, nargs="*", default=[1, 2], help="none: build and reopen only")
    parser.add_argument("--verbs", nargs="+", default=["precompute", "train"])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument(
        "--encode-shards", type=int, default=8, help="shards the precompute encodes (0: the whole corpus)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if "train" in args.verbs and "precompute" not in args.verbs:
        parser.error("--verbs: train runs on the caches its precompute writes; give --verbs precompute train")
    import yaml
    from tiny import make_tiny_bert

    from stella_distill import data
    from stella_distill.arrow_table import open_table
    from stella_distill.config import DataConfig, SourceConfig

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    root.mkdir(parents=True, exist_ok=True)
    teacher = make_tiny_bert(root / "teacher", seed=1, dropout=0.0)
    student = make_tiny_bert(root / "student", seed=2)
    big, small = root / "corpus.txt", root / "small.txt"
    size = write_corpus(big, args.texts, seed=0, phrases=args.phrases)
    small_size = write_corpus(small, 2 * SHARD, seed=1, phrases=args.phrases)
    print(f"corpus: {args.texts:,} texts, {size / 1e6:.1f} MB ({root})", flush=True)
    results: dict = {"texts": args.texts, "phrases": args.phrases, "bytes": size, "small_bytes": small_size}
    results["runs"] = {}

    cfg = DataConfig(train=[SourceConfig(path=str(big))], dedupe=True)
    quiet = lambda _: None  # noqa: E731
    t = time.perf_counter()
    corpus = data.load_corpus(cfg, log=quiet, cache_dir=root / "timing")
    results["build_s"] = time.perf_counter() - t
    rows, table_bytes = len(corpus), corpus.path.stat().st_size
    t = time.perf_counter()
    data.load_corpus(cfg, log=quiet, cache_dir=root / "timing")
    results["reopen_s"] = time.perf_counter() - t
    t = time.perf_counter()
    open_table(corpus.path)
    results["open_table_s"] = time.perf_counter() - t
    timing_corpus = corpus
    t = time.perf_counter()
    listed = list_corpus(cfg, log=quiet)
    results["list_load_s"] = time.perf_counter() - t
    assert len(listed) == rows
    del listed
    results.update(rows=rows, table_bytes=table_bytes)
    print(f"rows {rows:,} after dedupe; table {table_bytes / 1e6:.1f} MB; build {results['build_s']:.1f} s, "
          f"reopen {results['reopen_s']:.2f} s (table open alone {results['open_table_s'] * 1000:.1f} ms), "
          f"list loader {results['list_load_s']:.1f} s", flush=True)  # fmt: skip

    for procs in args.procs:
        for verb in args.verbs:
            for loader in ("list", "table"):
                figures = {}
                for name, corpus_path in (("small", small), ("big", big)):
                    run_root = root / "runs" / f"{verb}-{loader}-{procs}-{name}"
                    spec = experiment(run_root, corpus_path, teacher, student)
                    if verb == "train":  # the caches of this process count's table precompute (same rows)
                        spec["cache_dir"] = str(root / "runs" / f"precompute-table-{procs}-{name}" / "cache")
                    config = run_root / "config.yaml"
                    run_root.mkdir(parents=True, exist_ok=True)
                    config.write_text(yaml.safe_dump(spec))
                    if verb == "precompute":
                        prefill(config, timing_corpus if name == "big" else None, args.encode_shards)
                    figures[name] = run_verb(verb, loader, procs, config, run_root / "out")
                key = f"{verb} {loader} x{procs}"
                results["runs"][key] = figures
                b, s = figures["big"], figures["small"]
                anon, hwm = b["anon_peak"] - s["anon_peak"], b["hwm"] - s["hwm"]
                print(f"{key:24s} ({b['type']}): above the model's own: private {anon / 1e6:7.1f} MB "
                      f"({anon / size:.2f}x the text), resident {hwm / 1e6:7.1f} MB ({hwm / size:.2f}x); "
                      f"mapped at the end {b['file_end'] / 1e6:.0f} MB; corpus load {b['load_seconds']:.1f} s, "
                      f"verb {b['seconds']:.0f} s", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        parser = argparse.ArgumentParser()
        parser.add_argument("worker")
        for flag in ("--verb", "--loader", "--config", "--out"):
            parser.add_argument(flag, required=True)
        worker(parser.parse_args())
    else:
        main()
