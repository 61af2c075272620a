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
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from stella_distill import logs, losses, metrics, run
from stella_distill.cache import TeacherCache, build_target, cache_folder, open_caches, peek_dim
from stella_distill.checks import check_teacher_dims
from stella_distill.config import ExperimentConfig, StageConfig, dump_config
from stella_distill.data import Corpus, load_corpus, split_rows, stage_batches
from stella_distill.distributed import (
    check_sharding_setup,
    check_stages,
    deepspeed_stage_config,
    gather_outputs,
    make_accelerator,
    on_main,
    shards_parameters,
)
from stella_distill.errors import UserError
from stella_distill.logs import get_logger
from stella_distill.packed import to_device
from stella_distill.run import Position
from stella_distill.student import StudentModel, find_layer_list

logger = get_logger(__name__)


class NonFiniteLossError(UserError):
    """A loss or a trained weight became NaN or inf; the run stops before saving anything and the
    last good checkpoint stays."""


# ---------------------------------------------------------------------------------------------
# Rows, batches and targets


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the paper's losses on the full-dim output (+ reduced dims when the stage trains them).

    Returns the total (with graph) and every weighted term as a detached 0-dim tensor on the device:
    reading them (a host sync) is left to the caller, once per logged step.
    """
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
    return total, {f"loss/{k}": v.detach() for k, v in terms.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(accelerator, model, cfg: ExperimentConfig, pos: Position) -> Path:
    """Accelerate state + unwrapped student + trainer state, written to a temp folder then renamed."""
    run_dir = Path(cfg.output_dir)
    final = run.checkpoint_dir(run_dir, pos)
    tmp = run.temp_dir(final)
    with run.writing(final, tmp):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank's files are in tmp before rank 0 renames it
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            student = accelerator.unwrap_model(model)
            student.save_pretrained(tmp / run.STUDENT, state_dict=state_dict)
            run.finish_checkpoint(tmp, final, cfg, pos, accelerator.num_processes)
    if accelerator.is_main_process:
        run.prune_checkpoints(run_dir, cfg.train.keep_checkpoints, final)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------
# The run


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


def train(cfg: ExperimentConfig, trackers: tuple = ()) -> Path:
    """Run every stage of `cfg.stages`, resuming from the newest checkpoint; return the run folder.

    Scalars go to ``metrics.jsonl`` and to the trackers of ``logging.report_to``; ``trackers`` adds
    accelerate ``GeneralTracker`` objects of your own.
    """
    if not cfg.stages:
        raise UserError("stages: no training stages configured")
    run_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(metrics.trackers(cfg) + list(trackers), str(run_dir / metrics.LOGS))
    world = accelerator.num_processes
    check_sharding_setup(cfg, accelerator)
    check_stages(cfg, accelerator)  # every stage before the first trains, not hours later
    taken = on_main(accelerator, lambda: run.hold_lock(run_dir, "train"))  # one job per run folder
    try:
        return _train(cfg, accelerator, world, run_dir)
    finally:
        if taken:
            run.release_lock(run_dir)


def preflight(cfg: ExperimentConfig) -> None:
    """The cached teachers' dims (their manifests read, nothing verified) against the student and export
    settings, before the corpus, the caches and the student load. (The models' own files were checked
    when the config loaded: ``model_files.check_models``.)"""
    dims = [peek_dim(cache_folder(cfg, t)) for t in cfg.teachers]
    if None not in dims:  # else a cache is not built yet: open_caches names it
        check_teacher_dims(cfg, dims)
    found = run.list_checkpoints(Path(cfg.output_dir)) if cfg.train.resume is None else []
    if found:  # a fresh run's checkpoints would mix with these, and pruning would keep the wrong ones
        raise UserError(
            f"train.resume: null, but {found[-1].parent} holds checkpoints of an earlier run (newest "
            f"{found[-1].name}); to start afresh use a new output_dir, or move that folder away"
        )


def _train(cfg: ExperimentConfig, accelerator, world: int, run_dir: Path) -> Path:
    preflight(cfg)
    if accelerator.is_main_process:
        with run.writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, run_dir / run.CONFIG_FILE)

    # ---- data: corpus, caches (checked against config and corpus), rows, lengths
    quiet = not accelerator.is_main_process
    corpus: Corpus = load_corpus(
        cfg.data, log=(lambda *a: None) if quiet else logger.info, cache_dir=cfg.cache_dir
    )
    # one process reads every shard's checksum (opening them verified); the others then open them unverified
    verified: list[TeacherCache] = []
    on_main(accelerator, lambda: verified.extend(open_caches(cfg, corpus)))
    caches: list[TeacherCache] = verified or open_caches(cfg, corpus, verify=False)
    valid = np.logical_and.reduce([c.valid_mask for c in caches])
    train_rows, eval_rows = split_rows(valid, cfg.data.eval_fraction, cfg.data.eval_limit, cfg.seed)
    if len(train_rows) == 0:
        bad = ", ".join(f"{t.name}: {int((~c.valid_mask).sum())}" for c, t in zip(caches, cfg.teachers))
        raise UserError(
            f"data: no valid training rows: every row is held out or listed in a cache's invalid_rows "
            f"(non-finite teacher vectors; {bad})"
        )
    lengths = corpus.lengths  # characters per text, from the table (no text is read)
    target_dim = sum(c.dim for c in caches)  # student.target_dim agrees: preflight checked it

    # ---- student and resume point
    torch.manual_seed(cfg.seed)
    model = StudentModel.from_config(cfg.student, target_dim=target_dim, max_length=cfg.data.max_length)
    n_layers = len(find_layer_list(model.backbone)[1])
    for i, stage in enumerate(cfg.stages):
        if stage.trainable == "last_layers" and not 1 <= stage.last_layers <= n_layers:
            raise UserError(
                f"stages.{i}.last_layers: {stage.last_layers} must be between 1 and the student's {n_layers} layers"
            )
    resume_from, pos = run.resume_point(cfg, run_dir, world)
    if accelerator.is_main_process:  # a resumed run logs the steps after its checkpoint again
        run.truncate_metrics(run_dir, pos.global_step)
    if resume_from is not None and pos.stage_complete:
        model.load_state_dict(StudentModel.from_pretrained(resume_from / run.STUDENT).state_dict())
    log = metrics.MetricsLog(cfg, run_dir, accelerator)
    if accelerator.is_main_process:
        logger.info(
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
            sharded = shards_parameters(accelerator)
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
        final = run.save_final(
            run_dir,
            cfg,
            pos.global_step,
            lambda folder: student.save_pretrained(folder, state_dict=state_dict),
        )
        logger.info(f"train: done after {pos.global_step} steps; student at {final / run.STUDENT}")
    accelerator.wait_for_everyone()
    log.close()
    return run_dir


def run_stage(
    cfg, stage_index, stage, model, accelerator, log, corpus, caches, train_rows, eval_rows, lengths,
    *, start_step, global_step, resume_dir,
):  # fmt: skip
    """Train one stage: fresh optimizer and schedule, from the weights `model` holds (or `resume_dir`)."""
    world, rank = accelerator.num_processes, accelerator.process_index
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
    if accelerator.distributed_type.value == "DEEPSPEED":
        deepspeed_stage_config(accelerator, stage)
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
        logger.info(
            f"stage {stage_index} '{stage.name}': {stage.trainable}, {len(trainable)} trainable tensors, "
            f"{steps} steps, global batch {global_batch} x {stage.grad_accumulation}, lr {stage.lr}"
        )
    progress = _progress(cfg, accelerator, steps, start_step, stage.name)
    params = [p for p in model.parameters() if p.requires_grad]
    # Nothing in the step reads a device value on the host: losses, terms and the all-finite flag stay
    # on the device and are read together (one sync) at logged steps and before anything is saved.
    finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
    sums: dict[str, torch.Tensor] = {}
    model.train()
    step = start_step
    window = _Window(time.perf_counter())
    while step < steps:
        for micro in range(stage.grad_accumulation):
            rows = next(batches)
            local = rows[rank * stage.batch_size : (rank + 1) * stage.batch_size]
            features = student.tokenize(corpus.texts[local])
            mask = features.get("attention_mask")  # CPU tensors: counting costs no device sync
            window.tokens += int(mask.sum() if mask is not None else features["input_ids"].numel()) * world
            features = {k: to_device(v, accelerator.device) for k, v in features.items()}
            target = torch.from_numpy(
                build_target(caches, rows if cfg.train.gather_across_devices else local)
            )
            target = to_device(target, accelerator.device)
            last = micro == stage.grad_accumulation - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
            with sync:
                terms = _backward(cfg, stage, model, student, features, target, accelerator, amp)
            finite &= torch.isfinite(terms["loss"])
            for k, v in terms.items():
                sums[k] = sums[k] + v / stage.grad_accumulation if k in sums else v / stage.grad_accumulation
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
        window.steps += 1
        progress.update(1)
        logged = step % cfg.train.log_every == 0 or step == steps
        evaluated = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0 and step < steps
        saved = bool(cfg.train.checkpoint_every) and step % cfg.train.checkpoint_every == 0 and step < steps
        if logged or evaluated or saved:
            values = _read_step(sums, finite, params, grad_norm, accelerator, window.steps)
            _stop_if_non_finite(values, stage_index, stage.name, global_step)
        if logged:
            seconds = window.close()
            row = {
                "step": global_step, "stage": stage.name, "stage_index": stage_index, "stage_step": step,
                **{k: values[k] for k in sums}, "lr": scheduler.get_last_lr()[0],
                "grad_norm": values.get("grad_norm"),
                "samples_per_s": global_batch * stage.grad_accumulation * window.steps / seconds,
                "tokens_per_s": window.tokens / seconds, "world_size": world,
            }  # fmt: skip
            if accelerator.device.type == "cuda":  # peak so far on this process's GPU
                row["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
            log.log(row)
            progress.set_postfix(loss=f"{values['loss']:.4f}")
            sums = {}
            window = _Window(time.perf_counter())
        if evaluated:
            log.log(
                evaluate_fidelity(
                    model, student, corpus, caches, eval_rows, accelerator, global_step, stage, stage_index
                )
            )
        if saved:
            pos = Position(stage_index, step, global_step, False)
            save_checkpoint(accelerator, model, cfg, pos)
    progress.close()
    log.log(
        evaluate_fidelity(
            model, student, corpus, caches, eval_rows, accelerator, global_step, stage, stage_index
        )
    )
    pos = Position(stage_index, step, global_step, True)
    save_checkpoint(accelerator, model, cfg, pos)
    return model, global_step  # as prepared (DDP / DeepSpeed engine / FSDP): the next stage unwraps it


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


def _backward(cfg, stage, model, student, features, target, accelerator, amp) -> dict[str, torch.Tensor]:
    """Forward, in-batch loss on the (gathered) batch, backward; GradCache when chunking is on.

    Returns the total loss and its weighted terms as detached device tensors (no host sync).
    """
    chunk = cfg.train.embedding_chunk_size
    n_local = features["input_ids"].shape[0]
    mrl = stage.mrl
    gather = cfg.train.gather_across_devices
    if not chunk or chunk >= n_local:
        with amp:
            outputs = model(**features, mrl=mrl)
        outputs = {d: _upcast(v) for d, v in student.by_dim(outputs, mrl).items()}
        total, terms = distill_loss(
            gather_outputs(outputs, accelerator, gather), target, stage, student.target_dim, student.mrl_dims
        )
        accelerator.backward(total / stage.grad_accumulation)
        return {"loss": total.detach(), **terms}

    # GradCache (Gao et al. 2021): vectors without graph, loss and d(loss)/d(vectors) on the full
    # batch, then each chunk again with graph, back-propagating its slice of that gradient.
    slices = [slice(i, min(i + chunk, n_local)) for i in range(0, n_local, chunk)]
    rng_states, cached = [], []
    with torch.no_grad():
        for sl in slices:
            rng_states.append(_rng_state(accelerator.device))
            with amp:
                out = model(**{k: v[sl] for k, v in features.items()}, mrl=mrl)
            cached.append({d: _upcast(v) for d, v in student.by_dim(out, mrl).items()})
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
                out = student.by_dim(model(**{k: v[sl] for k, v in features.items()}, mrl=mrl), mrl)
            surrogate = sum((_upcast(out[d]) * grads[d][sl]).sum() for d in out if grads.get(d) is not None)
            accelerator.backward(surrogate)
    return {"loss": total.detach(), **terms}


class _Window:
    """Samples, tokens and wall time since the last logged step (throughput is read per window)."""

    def __init__(self, start: float):
        self.start, self.steps, self.tokens = start, 0, 0

    def close(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def _read_step(sums, finite, params, grad_norm, accelerator, steps: int) -> dict[str, float]:
    """Everything a logged step reads from the device, in one transfer (the hot loop's only host sync).

    ``finite`` (every loss since the stage began) is and-ed with the finiteness of the trained
    parameters as they are now, so an update that put NaN/inf into a weight is caught too; with several
    processes the flag is the minimum over all, so that every process stops at the same step.
    """
    flag = finite.clone()
    params = [p for p in params if p.numel()]  # ZeRO-3 leaves empty placeholders outside forward
    if params:
        # the max-abs norm is finite exactly when every element is (an L2 norm overflows on large weights)
        norms = torch._foreach_norm(params, float("inf"))
        flag &= torch.isfinite(torch.stack([n.to(torch.float32) for n in norms])).all()
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        flag_int = flag.to(torch.int32)
        torch.distributed.all_reduce(flag_int, op=torch.distributed.ReduceOp.MIN)
        flag = flag_int.bool()
    names = list(sums)
    values = [sums[k].to(torch.float32) / steps for k in names] + [flag.to(torch.float32)]
    if isinstance(grad_norm, torch.Tensor):
        names.append("grad_norm")
        values.append(grad_norm.detach().to(device=flag.device, dtype=torch.float32))
    host = torch.stack(values).tolist()
    out = dict(zip([*names[: len(sums)], "finite", *names[len(sums) :]], host))
    if grad_norm is not None and not isinstance(grad_norm, torch.Tensor):
        out["grad_norm"] = float(grad_norm)
    return out


def _stop_if_non_finite(values: dict[str, float], stage_index: int, name: str, global_step: int) -> None:
    """Raise ``NonFiniteLossError`` (before anything is saved) when the device flag says so."""
    if values["finite"] == 1.0:
        return
    bad = ", ".join(f"{k}={v}" for k, v in values.items() if k.startswith("loss") and not math.isfinite(v))
    raise NonFiniteLossError(
        f"stages.{stage_index} ('{name}'), step {global_step}: non-finite loss or weights "
        f"({bad or 'a trained weight is NaN/inf'}); stopped before saving anything, the last good "
        f"checkpoint is kept"
    )


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

    disable = not (cfg.logging.progress and accelerator.is_main_process and logs.show_progress())
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
            texts = corpus.texts[rows]
            features = {k: v.to(accelerator.device) for k, v in student.tokenize(texts).items()}
            for d, v in student.by_dim(model(**features, mrl=True)).items():
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
