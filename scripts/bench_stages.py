"""Training at the paper's scale: our stages against the plain loop a user writes, in the same run.

Student: a random-weight Qwen2-1.5B shape (``Qwen2Config(hidden_size=1536, num_hidden_layers=28,
num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960, vocab_size=151936)``), batch
32 x 512-token passages (every passage is cut at 512), a 2560-d target, MRL heads 1024/512/256.
Each method runs in its own process (its own peak memory):

- ``plain``: what a user writes. ``AutoModel`` + ``Linear(1536, 2560)``, fp32 weights under bf16
  autocast, gradient checkpointing, mean pooling, cosine + similarity loss, backward, fused AdamW;
  the loss read on the host every ``--log-every`` steps.
- ``ours``: the real ``stella_distill.train.train()`` on a two-stage config over a teacher cache of
  random unit vectors: stage 1 (projection and heads only: the backbone runs without autograd) and
  stage 3 (all parameters + MRL heads, the paper's three losses 10/200/20), bf16, gradient checkpointing,
  the same ``log_every``. samples/s from ``metrics.jsonl`` (the window after the warm-up steps).

MFU counts model FLOPs (no recompute): 6 x non-embedding parameters x tokens for a trained backbone,
2 x for stage 1's forward, plus attention (12 x layers x hidden x length per token trained, 4 x for a
forward), against ``--peak-tflops`` (default 989: H100/H200 dense bf16).

    python scripts/bench_stages.py --tokenizer TOKENIZER_DIR --json out.json    # on a GPU
    python scripts/bench_stages.py --tokenizer TOKENIZER_DIR --tiny             # CPU dry run, tiny shape
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
SHAPE = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
             intermediate_size=8960, vocab_size=151936)  # fmt: skip
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=32000)  # fmt: skip


def setup(work: Path, args) -> dict:
    """Student folder, passages, a teacher cache of random unit vectors, the experiment config."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    from stella_distill.cache import CacheBuild
    from stella_distill.config import from_dict
    from stella_distill.data import load_corpus

    shape = TINY if args.tiny else SHAPE
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2Model(Qwen2Config(**shape, max_position_embeddings=4096))
    model.save_pretrained(work / "student")
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(work / "student")
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    del model

    words = [
        w for f in sorted(CORPUS.glob("*.txt")) for line in f.open(encoding="utf-8") for w in line.split()
    ]
    rng = random.Random(0)
    n_texts = args.batch * (args.warmup + args.steps + 2) + 64
    length = args.max_length + 200  # words: every passage is cut at max_length tokens
    starts = [rng.randrange(len(words) - length) for _ in range(n_texts)]
    (work / "corpus.txt").write_text("\n".join(" ".join(words[s : s + length]) for s in starts) + "\n")

    stub = work / "teacher_stub"  # the cache's teacher identity only; nothing encodes with it
    stub.mkdir()
    (stub / "config.json").write_text("{}")
    stage = {"batch_size": args.batch, "steps": args.warmup + args.steps, "scheduler": "constant",
             "warmup_ratio": 0.0, "mixed_precision": "no" if args.tiny else "bf16"}  # fmt: skip
    cfg = {
        "name": "bench_stages",
        "output_dir": str(work / "run"),
        "cache_dir": str(work / "cache"),
        "data": {
            "train": [{"path": str(work / "corpus.txt")}],
            "max_length": args.max_length,
            "eval_limit": 32,
        },
        "teachers": [{"name": "t", "model": str(stub), "pooling": "mean", "shard_size": 100000}],
        "student": {
            "model": str(work / "student"),
            "pooling": "mean",
            "gradient_checkpointing": True,
            "mrl": {"mode": "heads", "dims": list(args.mrl_dims)},
        },  # fmt: skip
        "stages": [
            {"name": "stage1", "trainable": "head", "lr": 1e-4, **stage},
            {"name": "stage3", "trainable": "all", "mrl": True, "lr": 7e-5, **stage},
        ],
        "train": {"checkpoint_every": 0, "keep_checkpoints": 1, "log_every": args.log_every, "eval_every": 0},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    experiment = from_dict(cfg)
    corpus = load_corpus(experiment.data, log=lambda _: None)
    teacher = experiment.teachers[0]
    build = CacheBuild.plan(
        Path(cfg["cache_dir"]) / "t", teacher, index=0, max_length=args.max_length, corpus=corpus
    )
    build.start(args.target_dim, corpus.row_hashes)
    vectors = np.random.default_rng(0).standard_normal((len(corpus), args.target_dim)).astype(np.float32)
    build.write_shard(0, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    build.finish(None)
    (work / "config.json").write_text(json.dumps(cfg))
    return {"non_embedding_params": n_params, "shape": shape, "texts": len(corpus)}


def model_flops_per_sample(params: int, shape: dict, length: int, trained: bool) -> float:
    """Model FLOPs of one sample (no recompute): 6N (2N forward) per token plus attention."""
    layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]
    per_token = (6 if trained else 2) * params + (12 if trained else 4) * layers * hidden * length
    return per_token * length


def run_plain(work: Path, args) -> dict:
    """The plain loop: forward, cosine + similarity loss, backward, fused AdamW."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from stella_distill.cache import TeacherCache

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(work / "student", dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    head = torch.nn.Linear(model.config.hidden_size, args.target_dim, device=device)
    tokenizer = AutoTokenizer.from_pretrained(work / "student")
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=7e-5, fused=True)
    texts = (work / "corpus.txt").read_text(encoding="utf-8").splitlines()
    targets = np.asarray(TeacherCache(work / "cache" / "t").vectors, dtype=np.float32)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    times, losses = [], []
    start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        rows = slice(step * args.batch, (step + 1) * args.batch)
        batch = tokenizer(texts[rows], padding=True, truncation=True, max_length=args.max_length,
                          return_tensors="pt").to(device)  # fmt: skip
        target = torch.from_numpy(targets[rows]).to(device)
        with amp:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = head((hidden * mask).sum(1) / mask.sum(1))
        s, t = F.normalize(emb.float(), dim=-1), F.normalize(target, dim=-1)
        loss = 10 * (1 - (s * t).sum(-1)).mean() + 200 * (s @ s.T - t @ t.T).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0:
            losses.append(loss.item())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    times.append(seconds)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"samples_per_s": args.batch * args.steps / seconds, "peak_gb": peak, "last_loss": losses[-1]}


def run_ours(work: Path, args) -> dict:
    """The real trainer; per stage samples/s over the rows after the warm-up, peak memory so far."""
    from stella_distill.config import from_dict
    from stella_distill.train import train

    cfg = from_dict(json.loads((work / "config.json").read_text()))
    run_dir = train(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for stage in ("stage1", "stage3"):
        steps = [r for r in rows if r.get("stage") == stage and "samples_per_s" in r]
        measured = [r for r in steps if r["stage_step"] > args.warmup]
        seconds = sum(args.log_every * args.batch / r["samples_per_s"] for r in measured)
        out[stage] = {
            "samples_per_s": args.log_every * args.batch * len(measured) / seconds,
            "peak_gb": max((r.get("gpu_mem_gb") or 0) for r in steps) or None,
            "last_loss": steps[-1]["loss"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (any; ids must fit the vocabulary)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--target-dim", type=int, default=2560)
    p.add_argument("--mrl-dims", type=int, nargs="+", default=[1024, 512, 256])
    p.add_argument("--warmup", type=int, default=5, help="steps not measured (a multiple of --log-every)")
    p.add_argument("--steps", type=int, default=10, help="measured steps (a multiple of --log-every)")
    p.add_argument("--log-every", type=int, default=5, help="host reads of the loss, both sides")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--tiny", action="store_true", help="tiny shape, batch 4 x 64 tokens: a CPU dry run")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.max_length, args.target_dim, args.mrl_dims = 4, 64, 48, [32, 16]
        args.warmup, args.steps, args.log_every = 2, 2, 1
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.only:
        result = run_plain(args.workdir, args) if args.only == "plain" else run_ours(args.workdir, args)
        (args.workdir / f"result_{args.only}.json").write_text(json.dumps(result))
        return 0

    import torch

    tmp = tempfile.TemporaryDirectory(prefix="bench_stages_")
    work = Path(tmp.name)
    info = setup(work, args)
    passthrough = ["--tokenizer", args.tokenizer, "--batch", str(args.batch), "--max-length",
                   str(args.max_length), "--target-dim", str(args.target_dim), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--log-every", str(args.log_every),
                   "--mrl-dims", *map(str, args.mrl_dims)]  # fmt: skip
    results = {}
    for name in ("plain", "ours"):
        cmd = [sys.executable, __file__, "--only", name, "--workdir", str(work), *passthrough]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            sys.exit(f"{name}: exit {proc.returncode}")
        results[name] = json.loads((work / f"result_{name}.json").read_text())
        shutil.rmtree(work / "run", ignore_errors=True)
    table = {"plain": results["plain"], **results["ours"]}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}; student {info['shape']}, {info['non_embedding_params'] / 1e6:.0f} M non-embedding "
          f"params; batch {args.batch} x {args.max_length} tokens; {args.warmup} warm-up + {args.steps} "
          f"measured steps, loss read every {args.log_every}")  # fmt: skip
    for name, r in table.items():
        flops = model_flops_per_sample(
            info["non_embedding_params"], info["shape"], args.max_length, name != "stage1"
        )
        r["mfu"] = r["samples_per_s"] * flops / (args.peak_tflops * 1e12)
        peak = f"{r['peak_gb']:.1f} GB" if r["peak_gb"] else "n/a"
        print(f"{name:>7}: {r['samples_per_s']:8.1f} samples/s, peak {peak:>9}, MFU {100 * r['mfu']:5.1f} %")
    ratios = {
        "stage3_vs_plain": table["stage3"]["samples_per_s"] / table["plain"]["samples_per_s"],
        "stage1_vs_stage3": table["stage1"]["samples_per_s"] / table["stage3"]["samples_per_s"],
    }
    if table["plain"]["peak_gb"] and table["stage3"]["peak_gb"]:
        ratios["stage3_peak_vs_plain"] = table["stage3"]["peak_gb"] / table["plain"]["peak_gb"]
    print(" ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + "  (goals: stage3_vs_plain >= 1.3 at "
          "stage3_peak_vs_plain <= 1.0; stage1_vs_stage3 >= 4)")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"device": device, **info, "results": table, "ratios": ratios}, indent=2)
        )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
