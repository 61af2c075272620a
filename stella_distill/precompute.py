"""The teacher job: encode the corpus with every teacher into its on-disk cache.

``stella-distill precompute CONFIG`` runs :func:`run_precompute`. Under ``accelerate launch
--multi_gpu --num_processes N`` or ``torchrun --nproc_per_node N`` every process encodes a disjoint
set of shards (shard ``i`` goes to rank ``i % world``) into the same files, and the result is
byte-identical to a one-process run: a shard's batching depends only on its own texts.
Rank 0 decides what to do, creates the files and writes the manifest; the other ranks follow
its decisions (broadcast), so an error stops every rank with the same message.

Uses data, pooling and cache; never the trainer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stella_distill import logs
from stella_distill.cache import CacheBuild, cache_folder
from stella_distill.config import ExperimentConfig, TeacherConfig
from stella_distill.data import Corpus, load_corpus
from stella_distill.distributed import on_main
from stella_distill.errors import UserError
from stella_distill.logs import get_logger
from stella_distill.model_files import dense_list, resolve_teacher
from stella_distill.pooling import (
    DTYPES,
    load_backbone,
    load_dense,
    load_tokenizer,
    pool,
    usable_positions,
    with_prompt,
)

logger = get_logger(__name__)


def length_batches(
    sorted_lengths: np.ndarray, batch_tokens: int, max_batch_size: int
) -> list[tuple[int, int]]:
    """Cut texts sorted by decreasing token length into ``[(start, stop), ...]`` batches.

    A batch holds at most ``max_batch_size`` texts and at most ``batch_tokens`` padded tokens
    (texts x its first, longest, text). At least one text per batch, however long it is.
    """
    batches = []
    start, n = 0, len(sorted_lengths)
    while start < n:
        longest = max(int(sorted_lengths[start]), 1)
        size = max(1, min(max_batch_size, batch_tokens // longest))
        stop = min(n, start + size)
        batches.append((start, stop))
        start = stop
    return batches


# Measured with all-MiniLM-L6-v2 on a 2-core CPU: 1k-2k token batches run about 1.4x faster per
# token than 16k-token ones (activations stay in cache), while GPUs want the large ones.
CPU_BATCH_TOKENS, CPU_MAX_BATCH_SIZE = 1024, 64
GPU_BATCH_TOKENS, GPU_MAX_BATCH_SIZE = 16384, 256


def batch_limits(teacher: TeacherConfig, device: torch.device) -> tuple[int, int]:
    """(token budget, max texts) per forward batch for ``teacher`` on ``device``.

    Values set in the config are used as given; unset ones take the device's default: GPUs want big
    batches, while on CPU 1-2k-token batches run about 1.4x faster per token than 16k-token ones.
    """
    cpu = device.type == "cpu"
    tokens = teacher.batch_tokens or (CPU_BATCH_TOKENS if cpu else GPU_BATCH_TOKENS)
    size = teacher.max_batch_size or (CPU_MAX_BATCH_SIZE if cpu else GPU_MAX_BATCH_SIZE)
    return int(tokens), int(size)


class TeacherEncoder:
    """One teacher model, ready to turn texts into float32 vectors the way its config says.

    Loads tokenizer and model (``teachers.N.model``; remote code only with ``trust_remote_code``;
    SDPA attention; the configured dtype, loaded natively, not autocast) and applies the
    prompt, truncation to ``max_length``, pooling and optional L2 normalisation. Errors name
    ``field`` (default ``teachers.<index>``), the config path of this teacher.
    """

    def __init__(
        self,
        teacher: TeacherConfig,
        *,
        max_length: int,
        index: int = 0,
        field: str | None = None,
        device: str | torch.device | None = None,
        log: Callable[[str], Any] = logger.warning,
    ):
        self.field = field or f"teachers.{index}"  # the config path that errors name
        if teacher.pooling is None or teacher.prompt is None:  # not from a loaded config: ask the folder
            teacher = resolve_teacher(teacher, self.field)
        self.teacher = teacher
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        common = {
            "revision": teacher.revision,
            "trust_remote_code": teacher.trust_remote_code,
            "field": f"{self.field}.model",
        }
        self.tokenizer = load_tokenizer(teacher.model, **common)
        self.model = load_backbone(
            teacher.model, dtype=DTYPES[teacher.dtype], attn_implementation="sdpa", **common
        )
        self.model.to(self.device).eval()
        self.dense = None  # the model's own Dense head(s) (teachers.N.dense), applied after pooling
        heads = [
            load_dense(
                teacher.model,
                folder,
                revision=teacher.revision,
                trust_remote_code=teacher.trust_remote_code,
                field=f"{self.field}.dense",
            )
            for folder in dense_list(teacher.dense)
        ]
        for a, b in zip(heads, heads[1:]):
            if a.out_features != b.in_features:
                raise UserError(
                    f"{self.field}.dense: a Dense module outputs {a.out_features} dims, the next takes {b.in_features}"
                )
        if heads:
            self.dense = torch.nn.Sequential(*heads).to(self.device)
        self.max_length = int(max_length)
        limit = usable_positions(self.model.config)
        if limit is not None and limit < self.max_length:
            # Longer inputs would index past the position table of absolute-position models.
            log(
                f"{self.field}: max_length {self.max_length} > the model's {limit} positions; truncating at {limit}"
            )
            self.max_length = limit
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.left_padding = self.tokenizer.padding_side == "left"
        self.batch_tokens, self.max_batch_size = batch_limits(teacher, self.device)
        self._dim: int | None = None
        self.truncated = 0  # texts longer than max_length tokens, cut by tokenize()

    @property
    def dim(self) -> int:
        """Output dimension (found by encoding one short text)."""
        if self._dim is None:
            self._dim = int(self.encode(["dimension probe"]).shape[1])
        return self._dim

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of every text (prompt prepended, special tokens added, truncated).

        Texts longer than ``max_length`` tokens are cut and counted in ``self.truncated``. They are
        found by tokenizing at ``max_length + 1`` (identical ids for every text that fits) and only
        those are tokenized again at ``max_length``, so counting costs no second pass over the corpus.
        """
        prompted = with_prompt(texts, self.teacher.prompt, self.max_length)
        options = {
            "add_special_tokens": True,
            "truncation": True,
            "return_attention_mask": False,
            "return_token_type_ids": False,
        }
        ids = self.tokenizer(prompted, max_length=self.max_length + 1, **options)["input_ids"]
        cut = [i for i, x in enumerate(ids) if len(x) > self.max_length]
        if cut:
            again = self.tokenizer([prompted[i] for i in cut], max_length=self.max_length, **options)
            for i, x in zip(cut, again["input_ids"]):
                ids[i] = x
            self.truncated += len(cut)
        return ids

    def encode(self, texts: list[str], progress: Callable[[int], Any] | None = None) -> np.ndarray:
        """Encode ``texts`` into float32 ``(len(texts), dim)``, rows in input order.

        Texts are tokenized once, sorted by token length and cut into batches under the token
        budget (``batch_limits``), so little compute goes to padding. The batching depends only on ``texts``, which makes the output deterministic.
        """
        ids = self.tokenize(list(texts))
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        out: np.ndarray | None = None
        for start, stop in length_batches(lengths[order], self.batch_tokens, self.max_batch_size):
            rows = order[start:stop]
            vectors = self._forward([ids[i] for i in rows])
            if out is None:
                out = np.empty((len(ids), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
            if progress is not None:
                progress(len(rows))
        if out is None:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        self._dim = out.shape[1]
        return out

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        longest = max(len(x) for x in batch)
        input_ids = np.full((len(batch), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for r, seq in enumerate(batch):
            if self.left_padding:
                input_ids[r, longest - len(seq) :] = seq
                mask[r, longest - len(seq) :] = 1
            else:
                input_ids[r, : len(seq)] = seq
                mask[r, : len(seq)] = 1
        input_ids_t = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
        mask_t = torch.from_numpy(mask).to(self.device, non_blocking=True)
        with torch.inference_mode():
            output = self.model(input_ids=input_ids_t, attention_mask=mask_t)
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            pooled = pool(hidden, mask_t, self.teacher.pooling).float()
            if self.dense is not None:
                if pooled.shape[1] != self.dense[0].in_features:
                    raise UserError(
                        f"{self.field}.dense: the Dense module takes {self.dense[0].in_features}-d input; "
                        f"{self.teacher.model} pools to {pooled.shape[1]}-d"
                    )
                pooled = self.dense(pooled)
            if self.teacher.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy()


# ---------------------------------------------------------------------------------------------
# The job


def _quiet(_: str) -> None:
    pass


def run_precompute(cfg: ExperimentConfig) -> list[Path]:
    """Encode the corpus with every teacher of ``cfg`` into ``cache_dir/<name>``; return the folders.

    A teacher whose cache is complete and matches is skipped; a cache (complete or not) built
    for another teacher or corpus is refused (remove the folder to rebuild it); an interrupted
    build resumes, redoing only the shards without a record.
    """
    from accelerate import PartialState

    # A plain PartialState on a CPU machine under --multi_gpu gives N processes that each think
    # they are alone (shared/NOTES.md); cpu=True makes them one gloo group.
    state = PartialState(cpu=not torch.cuda.is_available())
    log = logger.info if state.is_main_process else _quiet
    log(
        f"precompute: world_size={state.num_processes} rank={state.process_index} "
        f"({state.distributed_type}), device {state.device}"
    )
    corpus = load_corpus(cfg.data, log=log)
    return [
        _precompute_teacher(cfg, i, teacher, corpus, state, log) for i, teacher in enumerate(cfg.teachers)
    ]


def _precompute_teacher(
    cfg: ExperimentConfig,
    index: int,
    teacher: TeacherConfig,
    corpus: Corpus,
    state,
    log: Callable[[str], Any],
) -> Path:
    folder = cache_folder(cfg, teacher)
    max_length = cfg.teacher_max_length(teacher)
    build = on_main(
        state, lambda: CacheBuild.plan(folder, teacher, index=index, max_length=max_length, corpus=corpus)
    )
    if build.skip:
        log(f"teacher {teacher.name}: cache at {folder} is complete and matches; nothing to do")
        return folder
    if state.device.type == "cpu" and teacher.dtype != "float32" and state.is_main_process:
        logger.warning(f"teachers.{index}.dtype: {teacher.dtype} on CPU is slow; float32 is the CPU setting")
    warn = logger.warning if state.is_main_process else _quiet
    encoder = TeacherEncoder(teacher, max_length=max_length, index=index, device=state.device, log=warn)
    dim = encoder.dim
    encoder.truncated = 0  # count corpus texts only, not the dim probe
    todo = on_main(state, lambda: build.start(dim, corpus.row_hashes))
    bounds = build.bounds()
    mine = [i for i in todo if i % state.num_processes == state.process_index]
    bar = None
    if state.is_main_process and cfg.logging.progress and logs.show_progress():
        from tqdm.auto import tqdm

        who = f" (rank 0 of {state.num_processes})" if state.num_processes > 1 else ""
        bar = tqdm(
            total=sum(bounds[i][1] - bounds[i][0] for i in mine), desc=f"{teacher.name}{who}", unit="text"
        )
    started = time.perf_counter()
    for i in mine:
        start, stop = bounds[i]
        vectors = encoder.encode(corpus.texts[start:stop], progress=bar.update if bar is not None else None)
        build.write_shard(i, vectors)
    if bar is not None:
        bar.close()
    state.wait_for_everyone()
    seconds = time.perf_counter() - started
    commit = getattr(encoder.model.config, "_commit_hash", None)
    manifest = on_main(state, lambda: build.finish(commit))
    invalid = manifest["invalid_rows"]
    if invalid:
        shown = ", ".join(map(str, invalid[:5])) + (", ..." if len(invalid) > 5 else "")
        warn(
            f"{build.label}: {len(invalid)} rows gave NaN/inf vectors (rows {shown}); stored as zeros and "
            f"listed in manifest invalid_rows (valid_mask excludes them)"
        )
    encoded = sum(bounds[i][1] - bounds[i][0] for i in todo)
    truncated = encoder.truncated
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        truncated = sum(gather_object([truncated]))
    if truncated:
        log(
            f"teachers.{index}.max_length: {truncated} of the {encoded} texts encoded now are longer than "
            f"{encoder.max_length} tokens and were truncated to it (raise teachers.{index}.max_length or "
            f"data.max_length to keep them whole)"
        )
    log(
        f"teacher {teacher.name}: {manifest['rows']} rows, dim {dim}, {encoded / max(seconds, 1e-9):.1f} texts/s "
        f"({encoded} encoded now in {len(todo)} shards on {state.num_processes} process(es), "
        f"{len(invalid)} invalid, {truncated} truncated at {encoder.max_length} tokens) -> {folder}"
    )
    del encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder
