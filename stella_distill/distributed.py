"""accelerate, the ordinary way, plus what its launchers need from us.

Making the Accelerator (really distributed on CPU too), refusing launcher settings under which a stage
would not start from the previous stage's weights, writing each stage's batch into the DeepSpeed
config, gathering in-batch outputs across processes with their gradients, and ending a multi-process
job (torchrun / accelerate launch) cleanly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from stella_distill.config import ExperimentConfig, StageConfig
from stella_distill.errors import UserError
from stella_distill.logs import get_logger

logger = get_logger(__name__)


def leave_process_group() -> None:
    """All processes leave the torch.distributed group together (a barrier, then an orderly destroy).

    A gloo group left to interpreter shutdown can abort a process ("terminate called without an
    active exception", exit -6) when a peer that finished first closes its connection: measured on
    2-process CPU precompute runs, 1 in 4 aborted without this, 0 of 24 with it. A no-op when no
    group is initialised (one process).
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


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


def make_accelerator(log_with: list | None = None, logging_dir: str | None = None):
    """An Accelerator that is really distributed on CPU too (`cpu=True` when no GPU: a plain one under
    `accelerate launch --multi_gpu` on a CPU machine gives processes that each think they are alone),
    with the experiment trackers ``log_with`` (names or ``GeneralTracker``s) writing files under ``logging_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=logging_dir, logging_dir=logging_dir) if logging_dir else None
    # step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule once per
    # process per optimizer step (it assumes per-process data shards); our batches are global.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,
        log_with=log_with or None,
        project_config=project,
    )
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type.value == "DEEPSPEED" else None
    if plugin is not None and not plugin.zero3_init_flag:
        # accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says;
        # under ZeRO-3 every later from_pretrained would then build partitioned (empty) parameters,
        # which the student, checkpoint resume and the rank-0-only export/evaluate cannot use.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return accelerator


def check_sharding_setup(cfg: ExperimentConfig, accelerator) -> None:
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


def deepspeed_stage_config(accelerator, stage: StageConfig) -> None:
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


def check_stages(cfg: ExperimentConfig, accelerator) -> None:
    """Refuse, before any stage trains, a stage this launcher cannot run (see ``check_precision``)."""
    for i, stage in enumerate(cfg.stages):
        if accelerator.distributed_type.value == "DEEPSPEED" and (
            stage.grad_accumulation > 1 or cfg.train.embedding_chunk_size
        ):
            # accelerate's DeepSpeed wrapper steps the engine inside every backward(); our manual
            # accumulation and GradCache call backward() several times per optimizer step.
            raise UserError(
                f"stages.{i}.grad_accumulation / train.embedding_chunk_size: not supported under "
                f"DeepSpeed yet; use a larger per-device batch_size, or DDP / FSDP for GradCache"
            )
        check_precision(stage, i, accelerator)


def check_precision(stage: StageConfig, stage_index: int, accelerator) -> None:
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
        logger.warning(
            f"stages.{stage_index}.mixed_precision: {stage.mixed_precision!r} is overridden by the launcher's "
            f"{launcher!r} (accelerate config mixed_precision; set it to 'no' to let each stage choose)"
        )


def shards_parameters(accelerator) -> bool:
    """DeepSpeed ZeRO-3 and FSDP: the prepared model's own tensors are shards (or flat views)."""
    kind = accelerator.distributed_type.value
    if kind == "DEEPSPEED":
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return kind == "FSDP"


def on_main(state, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process only and give every process its result, or its ``UserError``.

    ``state`` is an ``Accelerator`` or ``PartialState``. A user mistake found on the main process
    stops every process with the same one-line error; a crash there stops the others with a line that
    points to it.
    """
    result: list[Any] = [None]
    if state.is_main_process:
        try:
            result[0] = ("ok", fn())
        except UserError as exc:
            result[0] = ("user_error", exc)
        except BaseException as exc:
            result[0] = ("crash", f"{type(exc).__name__}: {exc}")
            if state.num_processes > 1:
                broadcast_object_list(result, from_process=0)
            raise
    if state.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    kind, value = result[0]
    if kind == "user_error":
        raise value
    if kind == "crash":
        raise RuntimeError(f"failed on the main process: {value}")
    return value
