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

import inspect
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stella_distill import logs
from stella_distill.cache import CacheBuild, cache_folder, hold_build_lock, release_build_lock
from stella_distill.config import ExperimentConfig, TeacherConfig
from stella_distill.data import Corpus, load_corpus
from stella_distill.distributed import on_main
from stella_distill.errors import UserError, first_line
from stella_distill.logs import get_logger
from stella_distill.model_files import dense_list, resolve_teacher, usable_positions
from stella_distill.packed import PACKED_ATTENTION, pack, pool_packed, to_device, use_packed_attention
from stella_distill.pooling import (
    DTYPES,
    load_backbone,
    load_dense,
    load_tokenizer,
    pool,
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
# token than 16k-token ones (activations stay in cache), while GPUs want the large ones; packed
# batches carry no padding, so on a GPU short texts fill a batch of up to 1,024.
CPU_BATCH_TOKENS, CPU_MAX_BATCH_SIZE = 1024, 64
GPU_BATCH_TOKENS, GPU_MAX_BATCH_SIZE = 32768, 1024


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

    ``packed``: run each batch padding-free (``stella_distill.packed``: no attention mask, the flash
    kernel on a GPU). Default: on a GPU with bf16/fp16 weights, for models that use transformers'
    attention interface. A packed model is checked against a plain padded forward on a few probe
    texts when it is loaded; if they disagree it stays padded, and says so.
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
        packed: bool | None = None,
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
        self._ahead: tuple[object, Future] | None = None
        self._token_type_ids = "token_type_ids" in inspect.signature(self.model.forward).parameters
        if packed is None:
            packed = self.device.type == "cuda" and DTYPES[teacher.dtype] in (torch.bfloat16, torch.float16)
        self.packed = bool(packed) and use_packed_attention(self.model)
        if self.packed:
            self._check_packing(log)

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

    def prefetch(self, texts: list[str]) -> None:
        """Tokenize ``texts`` in a background thread while the device works on the current ones; the
        next ``encode`` of this same list object uses the result (GPU only: on a CPU the tokenizer
        would compete with the model for the same cores)."""
        if self.device.type != "cuda":
            return
        self._ahead = (texts, _TOKENIZER_THREAD.submit(self.tokenize, list(texts)))

    def encode(self, texts: list[str], progress: Callable[[int], Any] | None = None) -> np.ndarray:
        """Encode ``texts`` into float32 ``(len(texts), dim)``, rows in input order.

        Texts are tokenized once, sorted by token length and cut into batches under the token
        budget (``batch_limits``), so little compute goes to padding. The batching depends only on
        ``texts``, which makes the output deterministic. On a GPU the host never waits inside the
        loop: inputs go up from pinned memory, vectors come back into one pinned buffer with
        asynchronous copies, and the one synchronisation is at the end.
        """
        if self._ahead is not None and self._ahead[0] is texts:
            ids = self._ahead[1].result()
        else:
            ids = self.tokenize(list(texts))
        self._ahead = None
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        staged: torch.Tensor | None = None  # vectors in sorted order, on the host
        for start, stop in length_batches(lengths[order], self.batch_tokens, self.max_batch_size):
            vectors = self._forward([ids[i] for i in order[start:stop]])
            if staged is None:
                pinned = self.device.type == "cuda"
                staged = torch.empty((len(ids), vectors.shape[1]), dtype=torch.float32, pin_memory=pinned)
            staged[start:stop].copy_(vectors, non_blocking=True)
            if progress is not None:
                progress(stop - start)
        if staged is None:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        out = np.empty(tuple(staged.shape), dtype=np.float32)
        out[order] = staged.numpy()
        self._dim = out.shape[1]
        return out

    def _forward(self, batch: list[list[int]], packed: bool | None = None) -> torch.Tensor:
        """Pooled (+ Dense, + normalised) float32 vectors of one batch, left on the device."""
        with torch.inference_mode():
            if self.packed if packed is None else packed:
                inputs = pack(batch, self.device)
                extra = {"token_type_ids": torch.zeros_like(inputs.inputs["input_ids"])}
                output = self.model(**inputs.inputs, **(extra if self._token_type_ids else {}))
                hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                pooled = pool_packed(hidden, inputs, self.teacher.pooling).float()
            else:
                input_ids, mask = self._padded(batch)
                output = self.model(input_ids=input_ids, attention_mask=mask)
                hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                pooled = pool(hidden, mask, self.teacher.pooling).float()
            if self.dense is not None:
                if pooled.shape[1] != self.dense[0].in_features:
                    raise UserError(
                        f"{self.field}.dense: the Dense module takes {self.dense[0].in_features}-d input; "
                        f"{self.teacher.model} pools to {pooled.shape[1]}-d"
                    )
                pooled = self.dense(pooled)
            if self.teacher.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def _padded(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of a padded batch, on the device (filled without a
        Python loop: the mask's True cells, row by row, take the texts' ids in order)."""
        lengths = np.fromiter((len(x) for x in batch), dtype=np.int64, count=len(batch))
        longest = int(lengths.max())
        cols = np.arange(longest)
        real = cols >= longest - lengths[:, None] if self.left_padding else cols < lengths[:, None]
        input_ids = np.full((len(batch), longest), self.pad_id, dtype=np.int64)
        input_ids[real] = np.concatenate([np.asarray(x, dtype=np.int64) for x in batch])
        return (
            to_device(torch.from_numpy(input_ids), self.device),
            to_device(torch.from_numpy(real.astype(np.int64)), self.device),
        )

    def _check_packing(self, log: Callable[[str], Any]) -> None:
        """Compare packed and padded vectors on probe texts of different lengths; stay padded if they
        differ (an architecture whose attention packing does not reach, e.g. relative position biases)."""
        probe = self.tokenize(_PROBE_TEXTS)
        self.truncated = 0
        try:
            packed = self._forward(probe, packed=True)
        except (RuntimeError, ValueError, TypeError) as exc:
            # e.g. a flash kernel this GPU or torch build lacks, or a transformers version that still
            # builds a mask for a custom attention implementation (packed_attention refuses one)
            packed, why = None, f"it failed: {first_line(exc)[:200]}"
        self.model.set_attn_implementation("sdpa")
        padded = self._forward(probe, packed=False)
        if packed is not None:
            cosine = float(torch.nn.functional.cosine_similarity(packed.float(), padded.float()).min())
            if cosine >= PACKED_MIN_COSINE:
                self.model.set_attn_implementation(PACKED_ATTENTION)
                return
            why = f"it gives other vectors than a padded forward (min cosine {cosine:.4f})"
        self.packed = False
        log(f"{self.field}: padding-free (packed) attention not used for {type(self.model).__name__}: {why}")


# Packed and padded forwards differ only by rounding (bf16: ~1e-3 relative).
PACKED_MIN_COSINE = 0.995
_PROBE_TEXTS = [
    "A short probe.",
    "A somewhat longer probe text, so that the packed texts differ in length and padding shows.",
    "Three.",
]
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stella-tokenize")


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
    # they are alone (measured with accelerate 1.15); cpu=True makes them one gloo group.
    state = PartialState(cpu=not torch.cuda.is_available())
    log = logger.info if state.is_main_process else _quiet
    log(
        f"precompute: world_size={state.num_processes} rank={state.process_index} "
        f"({state.distributed_type}), device {state.device}"
    )
    corpus = load_corpus(cfg.data, log=log, cache_dir=cfg.cache_dir)
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
    taken = on_main(state, lambda: hold_build_lock(folder))
    try:
        return _build_teacher_cache(cfg, index, teacher, corpus, state, log, folder)
    finally:
        if taken:
            release_build_lock(folder)


def _build_teacher_cache(cfg, index, teacher, corpus, state, log, folder: Path) -> Path:
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
    upcoming = None
    for j, i in enumerate(mine):
        texts = upcoming if upcoming is not None else corpus.texts[slice(*bounds[i])]
        upcoming = corpus.texts[slice(*bounds[mine[j + 1]])] if j + 1 < len(mine) else None
        if upcoming is not None:
            encoder.prefetch(upcoming)  # tokenized while this shard is on the device
        vectors = encoder.encode(texts, progress=bar.update if bar is not None else None)
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
