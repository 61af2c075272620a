"""The staged distillation trainer. Reads top to bottom: `train()` loops over `cfg.stages`.

    corpus + teacher caches --> batches (texts, target vectors) --> student --> losses --> AdamW

Runs the same under `stella-distill train CONFIG` and `accelerate launch -m stella_distill train CONFIG`
(DDP, DeepSpeed ZeRO, FSDP). Batches are *global*: every optimizer micro-step takes the next
`batch_size * world_size` rows of a seeded order and each process keeps its slice, so N processes x
batch b see exactly what one process with batch N*b sees; with `train.gather_across_devices` the
in-batch losses are computed on the gathered global batch, which makes the two runs equivalent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stella_distill import losses
from stella_distill.cache import TeacherCache, build_target, open_caches
from stella_distill.config import ExperimentConfig, StageConfig, dump_config
from stella_distill.data import Corpus, load_corpus
from stella_distill.errors import UserError, write_failure
from stella_distill.student import StudentModel, find_layer_list

STATE_FILE = "trainer_state.json"


class NonFiniteLossError(UserError):
    """A loss became NaN or inf; the run stops and the last good checkpoint stays."""


# ---------------------------------------------------------------------------------------------
# Rows, batches and targets


def split_rows(valid: np.ndarray, eval_fraction: float, eval_limit: int | None, seed: int):
    """Split the valid row ids into (train_rows, eval_rows), seeded and independent of world size."""
    rows = np.flatnonzero(valid)
    n_eval = int(round(len(rows) * eval_fraction))
    if eval_limit is not None:
        n_eval = min(n_eval, eval_limit) if eval_fraction > 0 else eval_limit
    n_eval = min(n_eval, max(len(rows) - 1, 0))
    perm = np.random.default_rng(seed + 7919).permutation(len(rows))
    eval_rows = np.sort(rows[perm[:n_eval]])
    train_rows = np.sort(rows[perm[n_eval:]])
    return train_rows, eval_rows


def batch_order(
    rows: np.ndarray, lengths: np.ndarray, global_batch: int, seed: int, group_by_length: bool
) -> list[np.ndarray]:
    """One epoch of global batches: a seeded shuffle, optionally grouped by length (mega-batches of
    50 batches sorted by length, then the batches shuffled) so little compute goes to padding."""
    rng = np.random.default_rng(seed)
    order = rows[rng.permutation(len(rows))]
    if group_by_length:
        mega = global_batch * 50
        chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i : i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def stage_batches(train_rows, lengths, global_batch, seed, group_by_length):
    """Endless stream of global batches for one stage: epoch after epoch, each seeded by its index."""
    epoch = 0
    while True:
        batches = batch_order(train_rows, lengths, global_batch, seed * 100003 + epoch, group_by_length)
        if not batches:
            raise UserError(
                f"stages: a global batch of {global_batch} rows is larger than the {len(train_rows)} training rows"
            )
        yield from batches
        epoch += 1


def stage_steps(stage: StageConfig, n_train: int, global_batch: int) -> int:
    """Optimizer steps of a stage (explicit, or epochs over the training rows)."""
    if stage.steps is not None:
        return stage.steps
    per_epoch = max(n_train // (global_batch * stage.grad_accumulation), 1)
    return max(int(math.ceil(stage.epochs * per_epoch)), 1)


# ---------------------------------------------------------------------------------------------
# Losses over one (global) batch


def distill_loss(
    outputs: dict[int, torch.Tensor],
    target: torch.Tensor,
    stage: StageConfig,
    full_dim: int,
    mrl_dims: list[int],
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the paper's losses on the full-dim output (+ reduced dims when the stage trains them)."""
    w = stage.loss_weights
    full = outputs[full_dim]
    terms: dict[str, torch.Tensor] = {}
    if w.cosine:
        terms["cosine"] = w.cosine * losses.cosine_loss(full, target)
    if w.similarity:
        terms["similarity"] = w.similarity * losses.similarity_loss(full, target)
    if w.relative_similarity:
        terms["relative_similarity"] = w.relative_similarity * losses.relative_similarity_loss(
            full, target, margin=stage.margin
        )
    if stage.mrl:
        mw = stage.mrl_loss_weights
        for d in mrl_dims:
            if mw.similarity:
                terms[f"mrl_{d}/similarity"] = mw.similarity * losses.similarity_loss(outputs[d], target)
            if mw.relative_similarity:
                terms[f"mrl_{d}/relative_similarity"] = (
                    mw.relative_similarity
                    * losses.relative_similarity_loss(outputs[d], target, margin=stage.margin)
                )
    total = sum(terms.values()) if terms else full.sum() * 0.0
    return total, {f"loss/{k}": float(v.detach()) for k, v in terms.items()}


def gather_outputs(outputs: dict[int, torch.Tensor], accelerator, enabled: bool) -> dict[int, torch.Tensor]:
    """All-gather student vectors across processes *with* gradient (each process keeps its own grads)."""
    if not enabled or accelerator.num_processes == 1:
        return outputs
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # torch 2.1x marks it deprecated in favour of a private module; it is still the public,
        # autograd-aware all_gather (sentence-transformers' gather_across_devices uses it too)
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return {d: torch.cat(all_gather(v.contiguous()), dim=0) for d, v in outputs.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class Position:
    """Where the run stands: stage, optimizer steps done in it, run-wide step."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    stage_complete: bool = False


def _compat(cfg: ExperimentConfig) -> dict:
    """What a checkpoint must share with the config to be resumed."""
    return {
        "model": cfg.fingerprint("student", "teachers", "seed"),
        "data": cfg.fingerprint("data"),
        "stages": [cfg.fingerprint_stage(i) for i in range(len(cfg.stages))],
    }


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a folder without its state file is ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=_checkpoint_step)


def _checkpoint_step(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{ckpt / STATE_FILE}: unreadable checkpoint state ({type(exc).__name__}: {exc}); "
            f"delete that checkpoint folder to resume from an earlier one"
        ) from None


@contextlib.contextmanager
def writing(path: Path, tmp: Path | None = None):
    """Turn a failed write (disk full, read-only, not a folder) into a one-line UserError naming
    ``path``; a half-written ``tmp`` folder is removed so it can never be taken as complete."""
    try:
        yield
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = shutil.disk_usage(path.parent if not path.exists() else path).free / 2**20
            space = f"; {free:.0f} MiB free there"
        except OSError:
            space = ""
        raise UserError(f"{path}: cannot write ({reason}){space}; finished checkpoints are kept") from None


def check_resumable(ckpt: Path, cfg: ExperimentConfig) -> dict:
    """Read a checkpoint's state and refuse it if it was made by an incompatible config."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{ckpt / STATE_FILE}: unreadable checkpoint state ({exc})") from None
    want, have = _compat(cfg), state.get("compat", {})
    if have.get("model") != want["model"]:
        raise UserError(
            f"{ckpt}: checkpoint was made with another student/teachers/seed config; "
            f"use a new output_dir or set train.resume=null"
        )
    if have.get("data") != want["data"]:
        raise UserError(
            f"{ckpt}: checkpoint was made with another data config (data.*); use a new output_dir"
        )
    for i in range(state["stage_index"] + 1):  # every stage the checkpoint started must be unchanged
        if (
            i >= len(want["stages"])
            or i >= len(have.get("stages", []))
            or have["stages"][i] != want["stages"][i]
        ):
            raise UserError(
                f"stages.{i}: differs from the checkpoint {ckpt} (the stage list changed after it was "
                f"started); restore the stage or use a new output_dir"
            )
    return state


def save_checkpoint(
    accelerator, model, run_dir: Path, cfg: ExperimentConfig, pos: Position, keep: int
) -> Path:
    """Accelerate state + unwrapped student + trainer state, written to a temp folder then renamed."""
    root = run_dir / "checkpoints"
    final = root / (f"step-{pos.global_step:08d}" + ("-end" if pos.stage_complete else ""))
    tmp = final.with_name(final.name + ".tmp")
    with writing(final, tmp):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank's files are in tmp before rank 0 renames it
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            student = accelerator.unwrap_model(model)
            student.save_pretrained(tmp / "student", state_dict=state_dict)
            dump_config(cfg, tmp / "config.yaml")
            state = {**pos.__dict__, "stage_name": cfg.stages[pos.stage_index].name, "compat": _compat(cfg)}
            state["world_size"] = accelerator.num_processes
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # last: marks the folder complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    if accelerator.is_main_process:
        for old in list_checkpoints(run_dir)[:-keep]:
            (old / STATE_FILE).unlink()  # first, so a half-deleted folder is never listed as complete
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.iterdir():  # *.tmp or half-pruned folders left by a killed run
            if stale.is_dir() and stale != final and not (stale / STATE_FILE).is_file():
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """metrics.jsonl in the run folder (main process) and wandb when enabled."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, accelerator):
        self.main = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if (
            not self.main
            or cfg.logging.wandb.mode == "disabled"
            or os.environ.get("WANDB_MODE") == "disabled"
        ):
            return
        mode = cfg.logging.wandb.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            try:
                import wandb

                logged_in = bool(wandb.api.api_key)
            except Exception:
                logged_in = False
            if not logged_in:
                print("wandb: no API key set; logging offline (sync later with `wandb sync`)")
                mode = "offline"
        import wandb

        self.wandb = wandb.init(
            project=cfg.logging.wandb.project,
            entity=cfg.logging.wandb.entity,
            name=cfg.name,
            dir=str(run_dir),
            mode=mode,
            config=cfg.to_dict(),
            resume="allow",
        )

    def log(self, row: dict) -> None:
        if not self.main:
            return
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step")
            )

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


# ---------------------------------------------------------------------------------------------
# The run


def make_accelerator():
    """An Accelerator that is really distributed on CPU too (`cpu=True` when no GPU: see NOTES.md)."""
    from accelerate import Accelerator

    # step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule once per
    # process per optimizer step (it assumes per-process data shards); our batches are global.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type.value == "DEEPSPEED" else None
    if plugin is not None and not plugin.zero3_init_flag:
        # accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says;
        # under ZeRO-3 every later from_pretrained would then build partitioned (empty) parameters,
        # which the student, checkpoint resume and the rank-0-only export/evaluate cannot use.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return accelerator


def _optimizer(model: StudentModel, stage: StageConfig, fused: bool) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": stage.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=stage.lr, fused=fused or None)


def _scheduler(optimizer, stage: StageConfig, steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[stage.scheduler]
    return get_scheduler(
        name, optimizer, num_warmup_steps=int(stage.warmup_ratio * steps), num_training_steps=steps
    )


def train(cfg: ExperimentConfig) -> Path:
    """Run every stage of `cfg.stages`, resuming from the newest checkpoint; return the run folder."""
    if not cfg.stages:
        raise UserError("stages: no training stages configured")
    accelerator = make_accelerator()
    world = accelerator.num_processes
    _check_sharding_setup(cfg, accelerator)
    run_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        with writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / "config.yaml")

    # ---- data: corpus, caches (checked against config and corpus), rows, lengths
    corpus: Corpus = load_corpus(cfg.data, log=print if accelerator.is_main_process else (lambda *a: None))
    caches: list[TeacherCache] = open_caches(cfg, corpus)
    valid = np.logical_and.reduce([c.valid_mask for c in caches])
    train_rows, eval_rows = split_rows(valid, cfg.data.eval_fraction, cfg.data.eval_limit, cfg.seed)
    if len(train_rows) == 0:
        bad = ", ".join(f"{t.name}: {int((~c.valid_mask).sum())}" for c, t in zip(caches, cfg.teachers))
        raise UserError(
            f"data: no valid training rows: every row is held out or listed in a cache's invalid_rows "
            f"(non-finite teacher vectors; {bad})"
        )
    lengths = np.fromiter((len(t) for t in corpus.texts), dtype=np.int64, count=len(corpus.texts))
    target_dim = sum(c.dim for c in caches)
    if cfg.student.target_dim is not None and cfg.student.target_dim != target_dim:
        dims = " + ".join(f"{c.dim} ({t.name})" for c, t in zip(caches, cfg.teachers))
        raise UserError(
            f"student.target_dim: {cfg.student.target_dim} differs from the teachers' concatenated dim "
            f"{dims} = {target_dim}; leave it unset or make it match"
        )

    # ---- student and resume point
    torch.manual_seed(cfg.seed)
    model = StudentModel.from_config(cfg.student, target_dim=target_dim, max_length=cfg.data.max_length)
    n_layers = len(find_layer_list(model.backbone)[1])
    for i, stage in enumerate(cfg.stages):
        if stage.trainable == "last_layers" and not 1 <= stage.last_layers <= n_layers:
            raise UserError(
                f"stages.{i}.last_layers: {stage.last_layers} must be between 1 and the student's {n_layers} layers"
            )
    resume_from, pos = _resume_point(cfg, run_dir)
    if resume_from is not None and pos.stage_complete:
        model.load_state_dict(StudentModel.from_pretrained(resume_from / "student").state_dict())
    log = MetricsLog(cfg, run_dir, accelerator)
    if accelerator.is_main_process:
        print(
            f"train: {len(train_rows)} training rows, {len(eval_rows)} held out, target dim {target_dim}, "
            f"world_size={world}, device={accelerator.device}"
            + (f", resuming from {resume_from}" if resume_from else "")
        )

    prepared = False  # whether `model` is wrapped by accelerator.prepare (a stage ran in this process)
    for stage_index, stage in enumerate(cfg.stages):
        if stage_index < pos.stage_index or (stage_index == pos.stage_index and pos.stage_complete):
            continue
        resume_here = resume_from if (resume_from is not None and stage_index == pos.stage_index) else None
        start = pos.stage_step if resume_here is not None else 0
        if prepared:  # drop this function's reference to the last stage's wrapper (DDP buckets, engine)
            sharded = _shards_parameters(accelerator)
            model = _rebuilt_student(cfg, model, accelerator) if sharded else accelerator.unwrap_model(model)
        model, global_step = run_stage(
            cfg, stage_index, stage, model, accelerator, log, corpus, caches, train_rows, eval_rows, lengths,
            start_step=start, global_step=pos.global_step, resume_dir=resume_here,
        )  # fmt: skip
        pos = Position(stage_index, 0, global_step, True)
        prepared = True

    student = accelerator.unwrap_model(model)
    # Under DeepSpeed ZeRO-3 / FSDP the student's own tensors are shards: gather the whole weights
    # (a collective: every process takes part) and save those.
    state_dict = accelerator.get_state_dict(model) if model is not student else None
    if accelerator.is_main_process:
        final = run_dir / "final"
        tmp = run_dir / "final.tmp"
        with writing(final, tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            student.save_pretrained(tmp / "student", state_dict=state_dict)
            (tmp / STATE_FILE).write_text(
                json.dumps(
                    {"global_step": pos.global_step, "stages": len(cfg.stages), "compat": _compat(cfg)}
                )
            )
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        print(f"train: done after {pos.global_step} steps; student at {final / 'student'}")
    accelerator.wait_for_everyone()
    log.close()
    return run_dir


def _resume_point(cfg: ExperimentConfig, run_dir: Path) -> tuple[Path | None, Position]:
    if cfg.train.resume is None:
        return None, Position()
    if cfg.train.resume == "auto":
        found = list_checkpoints(run_dir)
        if not found:
            return None, Position()
        ckpt = found[-1]
    else:
        ckpt = Path(cfg.train.resume)
        if not (ckpt / STATE_FILE).is_file():
            raise UserError(f"train.resume: {ckpt} is not a checkpoint folder (no {STATE_FILE})")
    state = check_resumable(ckpt, cfg)
    if state["stage_index"] >= len(cfg.stages):
        raise UserError(
            f"train.resume: {ckpt} is at stage {state['stage_index']} but the config has fewer stages"
        )
    pos = Position(state["stage_index"], state["stage_step"], state["global_step"], state["stage_complete"])
    return ckpt, pos


def run_stage(
    cfg, stage_index, stage, model, accelerator, log, corpus, caches, train_rows, eval_rows, lengths,
    *, start_step, global_step, resume_dir,
):  # fmt: skip
    """Train one stage: fresh optimizer and schedule, from the weights `model` holds (or `resume_dir`)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if accelerator.distributed_type.value == "DEEPSPEED" and (
        stage.grad_accumulation > 1 or cfg.train.embedding_chunk_size
    ):
        # accelerate's DeepSpeed wrapper steps the engine inside every backward(); our manual
        # accumulation and GradCache call backward() several times per optimizer step.
        raise UserError(
            f"stages.{stage_index}.grad_accumulation / train.embedding_chunk_size: not supported under "
            f"DeepSpeed yet; use a larger per-device batch_size, or DDP / FSDP for GradCache"
        )
    torch.manual_seed(cfg.seed + 1 + stage_index)  # a stage starts from the same RNG state, resumed or not
    student = accelerator.unwrap_model(model)
    trainable = student.set_trainable(stage.trainable, stage.last_layers)
    if not stage.mrl:  # unused heads must not require grad (DDP refuses unused trainable parameters)
        for p in student.mrl_heads.parameters():
            p.requires_grad_(False)
        trainable = [n for n in trainable if not n.startswith("mrl_heads.")]
    global_batch = stage.batch_size * world
    steps = stage_steps(stage, len(train_rows), global_batch)
    optimizer = _optimizer(student, stage, fused=accelerator.device.type in ("cuda", "cpu"))
    scheduler = _scheduler(optimizer, stage, steps)
    accelerator.free_memory()
    _check_precision(stage, stage_index, accelerator)
    if accelerator.distributed_type.value == "DEEPSPEED":
        _deepspeed_stage_config(accelerator, stage)
    model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if resume_dir is not None and start_step > 0:
        try:
            accelerator.load_state(str(resume_dir))
        except Exception as exc:
            raise UserError(
                f"{resume_dir}: cannot resume from this checkpoint ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:300]}); delete it to resume from an earlier one"
            ) from None
    student = accelerator.unwrap_model(model)
    amp = _autocast(stage, accelerator)

    batches = stage_batches(
        train_rows, lengths, global_batch, cfg.seed + 1000 * stage_index, cfg.data.group_by_length
    )
    for _ in range(start_step * stage.grad_accumulation):  # data position: skip what the checkpoint consumed
        next(batches)
    if accelerator.is_main_process:
        print(
            f"stage {stage_index} '{stage.name}': {stage.trainable}, {len(trainable)} trainable tensors, "
            f"{steps} steps, global batch {global_batch} x {stage.grad_accumulation}, lr {stage.lr}"
        )
    progress = _progress(cfg, accelerator, steps, start_step, stage.name)
    model.train()
    step = start_step
    while step < steps:
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n_tokens = 0
        for micro in range(stage.grad_accumulation):
            rows = next(batches)
            local = rows[rank * stage.batch_size : (rank + 1) * stage.batch_size]
            features = student.tokenize([corpus.texts[i] for i in local])
            features = {k: v.to(accelerator.device) for k, v in features.items()}
            n_tokens += int(features["attention_mask"].sum()) * world
            target = torch.from_numpy(
                build_target(caches, rows if cfg.train.gather_across_devices else local)
            )
            target = target.to(accelerator.device)
            last = micro == stage.grad_accumulation - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
            with sync:
                terms = _backward(cfg, stage, model, student, features, target, accelerator, amp)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v / stage.grad_accumulation
        loss_value = sums.get("loss", float("nan"))
        if not math.isfinite(loss_value) or any(not math.isfinite(v) for v in sums.values()):
            bad = ", ".join(f"{k}={v}" for k, v in sums.items() if not math.isfinite(v))
            when = (
                "DeepSpeed applied this step's update inside backward"
                if accelerator.distributed_type.value == "DEEPSPEED"
                else "stopped before the update"
            )
            raise NonFiniteLossError(
                f"stages.{stage_index} ('{stage.name}'), step {global_step + 1}: non-finite loss ({bad}); "
                f"{when}; the last good checkpoint is kept"
            )
        grad_norm = None
        if stage.max_grad_norm is not None:
            # all of the prepared model's parameters (frozen ones have no gradient and are skipped):
            # accelerate takes FSDP's sharded-norm path only for exactly this list
            grad_norm = accelerator.clip_grad_norm_(list(model.parameters()), stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        global_step += 1
        dt = time.perf_counter() - t0
        progress.update(1)
        if step % cfg.train.log_every == 0 or step == steps:
            row = {
                "step": global_step, "stage": stage.name, "stage_index": stage_index, "stage_step": step,
                **sums, "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "samples_per_s": global_batch * stage.grad_accumulation / dt, "tokens_per_s": n_tokens / dt,
                "world_size": world,
            }  # fmt: skip
            if accelerator.device.type == "cuda":  # peak so far on this process's GPU
                row["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
            log.log(row)
            progress.set_postfix(loss=f"{loss_value:.4f}")
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
            log.log(
                evaluate_fidelity(
                    model, student, corpus, caches, eval_rows, accelerator, global_step, stage, stage_index
                )
            )
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < steps:
            pos = Position(stage_index, step, global_step, False)
            save_checkpoint(accelerator, model, Path(cfg.output_dir), cfg, pos, cfg.train.keep_checkpoints)
    progress.close()
    log.log(
        evaluate_fidelity(
            model, student, corpus, caches, eval_rows, accelerator, global_step, stage, stage_index
        )
    )
    pos = Position(stage_index, step, global_step, True)
    save_checkpoint(accelerator, model, Path(cfg.output_dir), cfg, pos, cfg.train.keep_checkpoints)
    return model, global_step  # as prepared (DDP / DeepSpeed engine / FSDP): the next stage unwraps it


def _check_sharding_setup(cfg: ExperimentConfig, accelerator) -> None:
    """Refuse launcher settings under which a later stage would not start from rank 0's weights."""
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero3_init_flag:
        raise UserError(
            "accelerate config zero3_init_flag: must be false: the student is built whole (pretrained "
            "backbone plus new heads) and rebuilt between stages from gathered weights; DeepSpeed "
            "partitions it when each stage starts"
        )
    if kind != "FSDP" or accelerator.num_processes < 2 or len(cfg.stages) < 2:
        return
    fsdp = accelerator.state.fsdp_plugin
    if getattr(fsdp, "fsdp_version", 1) == 2:
        # FSDP2 hands rank 0's weights to the others only with cpu-RAM-efficient loading
        if not fsdp.cpu_ram_efficient_loading:
            raise UserError(
                "accelerate config fsdp_cpu_ram_efficient_loading: must be true with FSDP2 and several "
                "processes: each stage after the first starts from the previous stage's weights, gathered on rank 0"
            )
    elif not fsdp.sync_module_states:
        raise UserError(
            "accelerate config fsdp_sync_module_states: must be true with several processes: each stage "
            "after the first starts from the previous stage's weights, gathered on rank 0"
        )


def _deepspeed_stage_config(accelerator, stage: StageConfig) -> None:
    """This stage's batch and clipping in the DeepSpeed config, before the engine is built.

    accelerate fills DeepSpeed's "auto" batch fields from a DataLoader, which this trainer does not
    pass (its batches are global and built by hand), and keeps whatever the first prepare wrote; the
    engine clips gradients itself (``gradient_clipping``) and accelerate's default for it is 1.0.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = stage.batch_size
    config["gradient_accumulation_steps"] = 1  # more is refused above
    config["train_batch_size"] = stage.batch_size * accelerator.num_processes
    config["gradient_clipping"] = float(stage.max_grad_norm) if stage.max_grad_norm is not None else 0.0


def _check_precision(stage: StageConfig, stage_index: int, accelerator) -> None:
    """fp16 needs loss scaling, which only the launcher's mixed precision (accelerate) provides; a
    launcher precision other than 'no' applies to every stage, whatever the stage says."""
    launcher = accelerator.mixed_precision
    if accelerator.device.type != "cuda" or stage.mixed_precision == launcher:
        return
    if launcher == "no" and stage.mixed_precision == "fp16":
        raise UserError(
            f"stages.{stage_index}.mixed_precision: fp16 needs loss scaling; use bf16, or launch with "
            f"accelerate's mixed_precision fp16 (accelerate launch --mixed_precision fp16), which scales the loss"
        )
    if launcher != "no" and accelerator.is_main_process:
        print(
            f"stages.{stage_index}.mixed_precision: {stage.mixed_precision!r} is overridden by the launcher's "
            f"{launcher!r} (accelerate config mixed_precision; set it to 'no' to let each stage choose)"
        )


def _shards_parameters(accelerator) -> bool:
    """DeepSpeed ZeRO-3 and FSDP: the prepared model's own tensors are shards (or flat views)."""
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED":
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return kind == "FSDP"


def _rebuilt_student(cfg: ExperimentConfig, model, accelerator) -> StudentModel:
    """A plain student holding the whole weights of a ZeRO-3 / FSDP-prepared one, ready to prepare again.

    A model wrapped by FSDP (its layers are FSDP units) or partitioned by ZeRO-3 cannot be wrapped
    a second time for the next stage's trainable set and optimizer; gathering the full weights into
    a freshly built student gives that stage the previous stage's weights. The gather is a collective
    and lands on the main process. The student stays on the CPU; the next prepare hands rank 0's
    weights to every process (ZeRO-3 broadcasts each parameter from rank 0 as it partitions it, FSDP
    does with ``sync_module_states``, which ``train`` requires for several processes).
    """
    prepared = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)
    accelerator.free_memory()
    student = StudentModel.from_config(
        cfg.student, target_dim=prepared.target_dim, max_length=prepared.max_length
    )
    del model, prepared
    if state:
        student.load_state_dict(state)
    return student


def _backward(cfg, stage, model, student, features, target, accelerator, amp) -> dict[str, float]:
    """Forward, in-batch loss on the (gathered) batch, backward; GradCache when chunking is on."""
    chunk = cfg.train.embedding_chunk_size
    n_local = features["input_ids"].shape[0]
    mrl = stage.mrl
    gather = cfg.train.gather_across_devices
    if not chunk or chunk >= n_local:
        with amp:
            outputs = model(**features, mrl=mrl)
        outputs = {d: _upcast(v) for d, v in outputs.items()}
        total, terms = distill_loss(
            gather_outputs(outputs, accelerator, gather), target, stage, student.target_dim, student.mrl_dims
        )
        accelerator.backward(total / stage.grad_accumulation)
        return {"loss": float(total.detach()), **terms}

    # GradCache (Gao et al. 2021): vectors without graph, loss and d(loss)/d(vectors) on the full
    # batch, then each chunk again with graph, back-propagating its slice of that gradient.
    slices = [slice(i, min(i + chunk, n_local)) for i in range(0, n_local, chunk)]
    rng_states, cached = [], []
    with torch.no_grad():
        for sl in slices:
            rng_states.append(_rng_state(accelerator.device))
            with amp:
                out = model(**{k: v[sl] for k, v in features.items()}, mrl=mrl)
            cached.append({d: _upcast(v) for d, v in out.items()})
    leaves = {d: torch.cat([c[d] for c in cached]).requires_grad_(True) for d in cached[0]}
    total, terms = distill_loss(
        gather_outputs(leaves, accelerator, gather), target, stage, student.target_dim, student.mrl_dims
    )
    grads = torch.autograd.grad(total / stage.grad_accumulation, list(leaves.values()), allow_unused=True)
    grads = dict(zip(leaves.keys(), grads))
    for i, sl in enumerate(slices):
        _set_rng_state(rng_states[i], accelerator.device)
        ctx = contextlib.nullcontext() if i == len(slices) - 1 else accelerator.no_sync(model)
        with ctx:
            with amp:
                out = model(**{k: v[sl] for k, v in features.items()}, mrl=mrl)
            surrogate = sum((_upcast(out[d]) * grads[d][sl]).sum() for d in out if grads.get(d) is not None)
            accelerator.backward(surrogate)
    return {"loss": float(total.detach()), **terms}


def _upcast(v: torch.Tensor) -> torch.Tensor:
    """Losses run in float32 at least (bf16/fp16 outputs are cast up; float64 stays float64)."""
    return v if v.dtype in (torch.float32, torch.float64) else v.float()


def _rng_state(device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _autocast(stage: StageConfig, accelerator):
    """bf16/fp16 autocast on GPU when the stage asks and accelerate is not already doing it."""
    if (
        stage.mixed_precision == "no"
        or accelerator.device.type != "cuda"
        or accelerator.mixed_precision != "no"
    ):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if stage.mixed_precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _progress(cfg, accelerator, total, initial, name):
    from tqdm.auto import tqdm

    disable = not (cfg.logging.progress and accelerator.is_main_process)
    return tqdm(total=total, initial=initial, desc=f"stage {name}", disable=disable, dynamic_ncols=True)


@torch.no_grad()
def evaluate_fidelity(
    model, student, corpus, caches, eval_rows, accelerator, global_step, stage, stage_index
) -> dict:
    """Teacher fidelity on held-out rows: mean cosine to the target (full dim) and losses per dim.

    Every process runs the forward passes through ``model`` as prepared (under DeepSpeed ZeRO-3 and
    FSDP a forward gathers parameter shards from all processes, so all must take part); the main
    process computes and returns the figures. ``student`` is the unwrapped model, for tokenizing.
    """
    row = {
        "step": global_step,
        "stage": stage.name,
        "stage_index": stage_index,
        "world_size": accelerator.num_processes,
    }
    if len(eval_rows) == 0:
        return row
    was_training = model.training
    model.eval()
    outs: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for i in range(0, len(eval_rows), 64):
            rows = eval_rows[i : i + 64]
            texts = [corpus.texts[r] for r in rows]
            features = {k: v.to(accelerator.device) for k, v in student.tokenize(texts).items()}
            for d, v in model(**features, mrl=True).items():
                outs.setdefault(d, []).append(v.float().cpu())
    if was_training:
        model.train()
    if not accelerator.is_main_process:
        return row
    target = torch.from_numpy(build_target(caches, eval_rows))
    full = torch.cat(outs[student.target_dim])
    row["eval/cosine"] = float(torch.nn.functional.cosine_similarity(full, target).mean())
    sample = slice(0, min(256, len(eval_rows)))
    for d, parts in outs.items():
        v = torch.cat(parts)
        row[f"eval/similarity_mse@{d}"] = float(losses.similarity_loss(v[sample], target[sample]))
    return row
