"""The GPU device check: one script, run once on a lent GPU machine, results into one JSON file.

Sections, most important first (each in its own processes, each under its own time limit inside one
overall budget, so one failure leaves the rest), sized to fit one 9-minute call on one H200:

1. ``smoke``: ``stella-distill run`` end to end in bf16 on realistic shapes with random weights (no
   Hub on that machine): teachers shaped like gte-large-en-v1.5 (BERT-large, CLS) and
   stella_en_1.5B_v5 (Qwen2-1.5B, last-token, plus a 1536 -> 8192 ``2_Dense_8192`` head), so a
   9216-d target; student shaped like Qwen2-0.5B with gradient checkpointing and MRL heads 1024/512/256;
   three stages (head, last 3 layers, all + MRL); then export and STS evaluation of the export.
2. ``zero3``, ``zero2``, ``fsdp``: the same three stages (a few steps each) under
   ``accelerate launch --config_file configs/accelerate/{deepspeed_zero3,deepspeed_zero2,fsdp}.yaml
   --num_processes 1`` on the smoke run's teacher cache, then ``stella-distill export`` from that run.
3. ``bench_precompute``: ``scripts/bench_precompute.py --issue``: issue 13's two settings on a
   gte-Qwen2-1.5B-shaped teacher in bf16 (1,500 passages at max length 512; 8,000 short lines at 128).
4. ``bench_stages``: ``scripts/bench_stages.py``: a plain loop against our stage 1 and stage 3 on a
   Qwen2-1.5B-shaped student, batch 32 x 512 tokens.
5. ``bench_losses``: ``scripts/bench_losses.py --device cuda``.

    bash scripts/gpu_check.sh                                # on the GPU machine (see that file)
    python scripts/gpu_check.py --tokenizer TOKENIZER_DIR --out OUT_DIR
    python scripts/gpu_check.py --tokenizer TOKENIZER_DIR --out /tmp/x --tiny   # CPU dry run, tiny shapes

Random weights make the STS figures meaningless; what the check shows is that every path runs on a
GPU in bf16, how fast, in how much memory, and that the losses fall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED = {
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "fsdp": "fsdp.yaml",
}
SECTIONS = ["smoke", "zero3", "zero2", "bench_precompute", "bench_stages", "fsdp", "bench_losses"]


def build_models(root: Path, tokenizer: Path, tiny: bool) -> dict[str, Path]:
    """Random-weight teachers and student of realistic shapes (``tiny``: small ones for a CPU dry run)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, Qwen2Config, Qwen2Model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(tokenizer)
    vocab = len(tok)
    if tiny:
        large = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64)  # fmt: skip
        qwen = Qwen2Config(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=96)  # fmt: skip
        student = Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64)  # fmt: skip
        dense_out = 96
    else:  # gte-large-en-v1.5 / stella_en_1.5B_v5 / Qwen2-0.5B shapes
        large = BertConfig(vocab_size=vocab, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096)  # fmt: skip
        qwen = Qwen2Config(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                           num_key_value_heads=2, intermediate_size=8960)  # fmt: skip
        student = Qwen2Config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, intermediate_size=4864)  # fmt: skip
        dense_out = 8192
    out = {}
    for name, cls, config, dtype in (
        ("teacher_large", BertModel, large, torch.bfloat16),
        ("teacher_qwen", Qwen2Model, qwen, torch.bfloat16),
        ("student", Qwen2Model, student, torch.float32),
    ):
        torch.manual_seed(len(name))
        with torch.device(device):
            model = cls(config).to(dtype)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
        del model
    from stella_distill.pooling import dense_class

    Dense = dense_class()
    torch.manual_seed(1)
    dense = Dense(qwen.hidden_size, dense_out, activation_function=torch.nn.Identity())
    (root / "teacher_qwen" / f"2_Dense_{dense_out}").mkdir()
    dense.save(str(root / "teacher_qwen" / f"2_Dense_{dense_out}"))
    return out


def write_corpus(path: Path, n: int) -> Path:
    lines: list[str] = []
    for f in sorted((ROOT / "data" / "corpus").glob("*.txt")):
        lines += [x.strip() for x in f.read_text(encoding="utf-8").splitlines() if x.strip()]
    path.write_text("\n".join(lines[:: max(1, len(lines) // n)][:n]) + "\n", encoding="utf-8")
    return path


def experiment(root: Path, models: dict[str, Path], corpus: Path, tiny: bool) -> dict:
    dense = "2_Dense_96" if tiny else "2_Dense_8192"
    dims = [64, 32, 16] if tiny else [1024, 512, 256]
    steps = (2, 2, 2) if tiny else (10, 10, 20)
    batch = 8 if tiny else 64
    stage = {"batch_size": batch, "warmup_ratio": 0.1, "mixed_precision": "no" if tiny else "bf16"}
    return {
        "name": "gpu_check",
        "output_dir": str(root / "runs" / "smoke"),
        "cache_dir": str(root / "cache"),
        "seed": 42,
        "data": {"train": [{"path": str(corpus)}], "max_length": 128, "eval_limit": 64 if tiny else 256},
        "teachers": [
            {
                "name": "large",
                "model": str(models["teacher_large"]),
                "pooling": "cls",
                "dtype": "float32" if tiny else "bfloat16",
            },
            {
                "name": "qwen",
                "model": str(models["teacher_qwen"]),
                "pooling": "last_token",
                "dense": dense,
                "dtype": "float32" if tiny else "bfloat16",
            },
        ],  # fmt: skip
        "student": {
            "model": str(models["student"]),
            "pooling": "mean",
            "gradient_checkpointing": True,
            "mrl": {"mode": "heads", "dims": dims},
        },
        "stages": [
            {"name": "fc", "trainable": "head", "steps": steps[0], "lr": 1e-3, **stage},
            {
                "name": "last3",
                "trainable": "last_layers",
                "last_layers": 3,
                "steps": steps[1],
                "lr": 2e-4,
                **stage,
            },
            {"name": "all_mrl", "trainable": "all", "steps": steps[2], "lr": 1e-4, "mrl": True, **stage},
        ],  # fmt: skip
        # rows every 5 steps: a row is the trainer's one device read, and per-step reads would hide its absence
        "train": {
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "log_every": 1 if tiny else 5,
            "eval_every": 0,
        },
        "export": {"default_dim": dims[0]},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        "evaluate": {"sts": [str(ROOT / "data" / "stsbenchmark" / "sts-dev.csv")], "baseline": False},
    }


class Runner:
    """Runs commands under a shared deadline, appending their output to one log file."""

    def __init__(self, log: Path, deadline: float, scale: float = 1.0):
        self.log = log
        self.deadline = deadline
        self.scale = scale  # section limits are sized for the H200; a CPU dry run takes longer
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
                    "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), self.env.get("PYTHONPATH", "")])

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def __call__(self, title: str, argv: list[str], limit: float) -> dict:
        limit = min(limit * self.scale, self.left() - 5)
        if limit < 20:
            return {"rc": None, "skipped": "out of time"}
        with self.log.open("a") as f:
            f.write(f"\n===== {title}: {' '.join(argv)} (limit {limit:.0f} s)\n")
            f.flush()
            t0 = time.monotonic()
            try:
                proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=self.env, cwd=ROOT, timeout=limit)  # fmt: skip
                rc, out = proc.returncode, proc.stdout
            except subprocess.TimeoutExpired as exc:
                rc, out = (
                    "timeout",
                    exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""),
                )
            seconds = round(time.monotonic() - t0, 1)
            f.write(out)
            f.write(f"\n===== {title}: rc {rc} in {seconds} s\n")
        return {"rc": rc, "seconds": seconds, "tail": out[-1500:]}


def run_summary(run: Path) -> dict:
    """Per stage: steps, metrics rows, first/last loss, median samples/s and tokens/s, peak GPU memory."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out: dict = {"world_size": sorted({r["world_size"] for r in rows if "world_size" in r})}
    for stage in dict.fromkeys(r["stage"] for r in rows if "loss" in r):
        steps = [r for r in rows if r.get("stage") == stage and "loss" in r]
        timed = steps[1:] or steps  # the first row's window holds compilation and allocator warm-up
        out[stage] = {
            "steps": steps[-1].get("stage_step"),
            "rows": len(steps),
            "first_loss": round(steps[0]["loss"], 4),
            "last_loss": round(steps[-1]["loss"], 4),
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in timed), 1),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed)),
            "gpu_mem_gb": max((r.get("gpu_mem_gb") or 0) for r in steps),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tokenizer", type=Path, required=True, help="a tokenizer folder (e.g. all-MiniLM-L6-v2's)"
    )
    p.add_argument("--out", type=Path, required=True, help="gpu_check.json and gpu_check.log go here")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"), help="models, cache and runs")
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole check")
    p.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU dry run of the script itself")
    args = p.parse_args(argv)

    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    log = args.out / "gpu_check.log"
    log.write_text("")
    run = Runner(log, start + args.budget, scale=4.0 if args.tiny else 1.0)
    result: dict = {"sections": {}}
    save = lambda: (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))  # noqa: E731

    import torch

    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["versions"] = {"torch": torch.__version__}
    for name in ("transformers", "accelerate", "sentence_transformers", "deepspeed"):
        try:
            result["versions"][name] = __import__(name).__version__
        except Exception as exc:  # report, do not stop: that section will fail and say so
            result["versions"][name] = f"missing ({type(exc).__name__})"
    t0 = time.monotonic()
    models = build_models(args.work / "models", args.tokenizer, args.tiny)
    corpus = write_corpus(args.work / "corpus.txt", 256 if args.tiny else 4096)
    cfg = experiment(args.work, models, corpus, args.tiny)
    cfg_path = args.work / "smoke.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result["setup_seconds"] = round(time.monotonic() - t0, 1)
    save()
    cli = [sys.executable, "-m", "stella_distill"]

    for section in args.sections:
        if section == "smoke":
            res = run("smoke: stella-distill run", [*cli, "run", str(cfg_path)], 150)
            smoke = Path(cfg["output_dir"])
            res["metrics"] = run_summary(smoke)
            for name in ("eval.json", "timings.json"):
                found = sorted(smoke.rglob(name))
                if found:
                    res[name] = json.loads(found[0].read_text())
        elif section in DISTRIBUTED:
            out_dir = args.work / "runs" / section
            short = [f"output_dir={out_dir}", "stages.0.steps=3", "stages.1.steps=3", "stages.2.steps=4",
                     "stages.0.batch_size=32", "stages.1.batch_size=32", "stages.2.batch_size=32",
                     "data.eval_limit=64"]  # fmt: skip
            if args.tiny:
                short = [f"output_dir={out_dir}"]
            res = run(
                f"{section}: accelerate launch",
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(ROOT / "configs" / "accelerate" / DISTRIBUTED[section]), "--num_processes", "1",
                 "-m", "stella_distill", "train", str(cfg_path), *short],
                110,
            )  # fmt: skip
            res["metrics"] = run_summary(out_dir)
            if res["rc"] == 0:
                res["export"] = run(
                    f"{section}: export", [*cli, "export", str(out_dir), "--out", str(out_dir / "export")], 60
                )
        elif section == "bench_losses":
            js = args.work / "bench_losses.json"
            extra = ["--compare", "8,16", "--large", "32", "--repeats", "2"] if args.tiny else []
            res = run("bench_losses", [sys.executable, "scripts/bench_losses.py", "--json", str(js),
                                       "--device", "cuda" if not args.tiny else "cpu", *extra], 60)  # fmt: skip
            if js.is_file():
                res["json"] = json.loads(js.read_text())
        elif section == "bench_stages":
            js = args.work / "bench_stages.json"
            argv_ = [sys.executable, "scripts/bench_stages.py", "--tokenizer", str(args.tokenizer),
                     "--json", str(js), *(["--tiny"] if args.tiny else [])]  # fmt: skip
            res = run("bench_stages", argv_, 170)
            if js.is_file():
                res["json"] = json.loads(js.read_text())
        else:
            js = args.work / "bench_precompute.json"
            argv_ = [sys.executable, "scripts/bench_precompute.py", "--issue", "--tokenizer", str(args.tokenizer),
                     "--json", str(js)]  # fmt: skip
            argv_ += ["--tiny"] if args.tiny else ["--device", "cuda", "--repeats", "1"]
            res = run("bench_precompute", argv_, 130)
            if js.is_file():
                res["json"] = json.loads(js.read_text())
        result["sections"][section] = res
        result["elapsed_seconds"] = round(time.monotonic() - start, 1)
        save()
    failed = [s for s, r in result["sections"].items() if r.get("rc") != 0]
    print(json.dumps({s: r.get("rc") for s, r in result["sections"].items()}), "failed:", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
