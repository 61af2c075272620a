"""Typed experiment configuration: one YAML per experiment, dotted CLI overrides.

Every section is a dataclass; every field carries a one-line doc in ``metadata["doc"]``.
``load_config(path, overrides)`` reads the YAML, applies ``a.b.0.c=value`` overrides, converts
and validates every field, and raises :class:`ConfigError` whose message starts with the dotted
field path (``teachers.1.pooling: expected one of cls, mean, last_token; got 'max'``).
The CLI turns that into one line on stderr and exit code 2, before any work starts.

This module must stay light: no torch, no transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stella_distill.configfile import apply_override, build, read_yaml, show
from stella_distill.errors import ConfigError

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "from_dict", "dump_config", "read_yaml"]


def _f(default: Any = dataclasses.MISSING, doc: str = "", factory: Any = None) -> Any:
    """A dataclass field with a one-line doc."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# cache_dir/<teacher.name> is a teacher's cache; this name is the corpus table's (data.py), not a teacher's
CORPUS_FOLDER = "corpus"

Pooling = Literal["cls", "mean", "last_token"]
Tracker = Literal[
    "wandb", "tensorboard", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"
]
DType = Literal["float32", "bfloat16", "float16"]


@dataclass
class SourceConfig:
    """One corpus source; several sources are concatenated in order."""

    path: str = _f(
        doc="local file (.txt/.jsonl/.json/.parquet/.csv/.tsv; text formats also .gz/.bz2/.xz) or folder, "
        "or a Hugging Face dataset id"
    )
    text_field: str = _f("text", doc="column / JSON key holding the text (ignored for .txt)")
    split: str = _f(
        "train",
        doc="split of a Hub dataset, a saved dataset, or a folder of split-named files (train-*.parquet)",
    )
    subset: str | None = _f(None, doc="dataset configuration name (Hugging Face datasets only)")
    limit: int | None = _f(None, doc="take at most this many texts from this source")
    revision: str | None = _f(
        None,
        doc="Hub datasets: branch, tag or commit (the commit it resolves to is recorded with the corpus)",
    )
    streaming: bool | None = _f(
        None,
        doc="Hub datasets: stream rows instead of downloading the whole split; null: stream when a limit "
        "(this source's or data.limit) caps what is read",
    )
    quoting: Literal["auto", "csv", "none"] = _f(
        "auto",
        doc=".csv/.tsv quoting: csv (quoted fields, doubled quotes), none (split on the delimiter), auto "
        "(.csv: csv; .tsv: none, unless its first lines show csv-quoted fields)",
    )


@dataclass
class DataConfig:
    """The training corpus and how it is cut and batched."""

    train: list[SourceConfig] = _f(factory=list, doc="corpus sources, concatenated in order")
    limit: int | None = _f(None, doc="use at most this many texts of the concatenated corpus")
    max_length: int = _f(512, doc="max tokens per text for the student (and teachers unless they set theirs)")
    dedupe: bool = _f(False, doc="drop exact duplicate texts (counted in the summary line)")
    eval_fraction: float = _f(0.0, doc="fraction of the corpus held out for teacher-fidelity evaluation")
    eval_limit: int | None = _f(
        None, doc="cap on held-out rows (or the held-out count if eval_fraction is 0)"
    )
    group_by_length: bool = _f(True, doc="batch texts of similar length together (less padding)")


@dataclass
class TeacherConfig:
    """One teacher model whose vectors become part of the target."""

    name: str = _f(doc="short unique name; its cache folder is cache_dir/<name> ('corpus' is taken)")
    model: str = _f(doc="Hugging Face model id or local path")
    revision: str | None = _f(None, doc="model revision (branch, tag or commit) for Hub ids")
    pooling: Pooling | None = _f(
        None, doc="cls, mean or last_token (null: the model's own 1_Pooling mode, else mean)"
    )
    prompt: str | None = _f(
        None, doc="text prefix of every corpus text (null: the model's default prompt, else none)"
    )
    max_length: int | None = _f(None, doc="max tokens for this teacher (default: data.max_length)")
    dtype: DType = _f("float32", doc="compute dtype of the teacher forward pass")
    normalize: bool = _f(
        True, doc="L2-normalise vectors before they are cached (the target normalises anyway)"
    )
    dense: str | list[str] | None = _f(
        None,
        doc="sentence-transformers Dense module(s) applied after pooling: subfolders of the model or local "
        "folders, e.g. 2_Dense_8192 (null: the model's own, from modules.json; []: none)",
    )
    trust_remote_code: bool = _f(False, doc="allow the model's own Python code (off unless you trust it)")
    batch_tokens: int | None = _f(
        None, doc="token budget per forward batch (null: 16384 on GPU, 1024 on CPU)"
    )
    max_batch_size: int | None = _f(None, doc="cap on texts per forward batch (null: 256 on GPU, 64 on CPU)")
    shard_size: int = _f(4096, doc="rows per cache shard (the unit of atomic writes and resume)")


@dataclass
class MRLConfig:
    """Matryoshka reduced dimensions of the student."""

    mode: Literal["heads", "truncate", "none"] = _f(
        "heads", doc="heads: one Linear per dim; truncate: prefixes"
    )
    dims: list[int] = _f(factory=list, doc="reduced output dims, e.g. [1024, 512, 256]")


@dataclass
class StudentConfig:
    """The student: backbone + pooling + projection to the target dim + MRL part."""

    model: str = _f(doc="Hugging Face model id or local path of the backbone")
    revision: str | None = _f(None, doc="backbone revision for Hub ids")
    pooling: Pooling = _f("mean", doc="pooling of the backbone states: cls, mean or last_token")
    keep_layers: list[int] | None = _f(None, doc="keep only these transformer layers, e.g. [0, 5]")
    target_dim: int | None = _f(None, doc="projection output dim (default: sum of teacher dims)")
    mrl: MRLConfig = _f(factory=MRLConfig, doc="Matryoshka reduced dims")
    gradient_checkpointing: bool = _f(False, doc="recompute activations in backward to save memory")
    attn_implementation: Literal["sdpa", "eager"] = _f("sdpa", doc="attention kernel of the backbone")
    trust_remote_code: bool = _f(False, doc="allow the backbone's own Python code")
    prompt: str = _f("", doc="text prefix the student sees for corpus texts during training")


@dataclass
class LossWeights:
    """Weights of the three distillation losses (paper: 10 / 200 / 20)."""

    cosine: float = _f(10.0, doc="weight of 1 - cos(student, target)")
    similarity: float = _f(200.0, doc="weight of the MSE between in-batch similarity matrices")
    relative_similarity: float = _f(20.0, doc="weight of the pair-ranking hinge loss")


@dataclass
class MRLLossWeights:
    """Weights of the losses on reduced-dim outputs (no cosine: dims differ from the target)."""

    similarity: float = _f(200.0, doc="weight of the similarity loss per reduced dim")
    relative_similarity: float = _f(20.0, doc="weight of the relative-similarity loss per reduced dim")


@dataclass
class StageConfig:
    """One training stage; each starts from the previous stage's weights with a fresh optimizer."""

    name: str = _f(doc="stage name (used in logs and checkpoint metadata)")
    trainable: Literal["head", "last_layers", "all"] = _f("head", doc="which parameters train")
    last_layers: int = _f(3, doc="with trainable=last_layers: how many final transformer layers train")
    steps: int | None = _f(None, doc="optimizer steps of this stage (or set epochs)")
    epochs: float | None = _f(None, doc="passes over the training rows (used when steps is unset)")
    batch_size: int = _f(128, doc="texts per device per micro-batch")
    grad_accumulation: int = _f(1, doc="micro-batches per optimizer step")
    lr: float = _f(1e-4, doc="peak learning rate (AdamW)")
    warmup_ratio: float = _f(0.0, doc="fraction of steps of linear warm-up")
    scheduler: Literal["cosine", "linear", "constant"] = _f("cosine", doc="decay after warm-up")
    weight_decay: float = _f(0.01, doc="AdamW weight decay")
    max_grad_norm: float | None = _f(1.0, doc="gradient clipping norm (null: no clipping)")
    loss_weights: LossWeights = _f(factory=LossWeights, doc="weights of the full-dim losses")
    margin: float = _f(0.015, doc="margin of the relative-similarity loss")
    mrl: bool = _f(False, doc="train the reduced-dim outputs (student.mrl) in this stage")
    mrl_loss_weights: MRLLossWeights = _f(factory=MRLLossWeights, doc="weights per reduced dim")
    mixed_precision: Literal["no", "bf16", "fp16"] = _f("no", doc="autocast dtype on GPU (ignored on CPU)")


@dataclass
class TrainConfig:
    """Run-wide trainer settings."""

    checkpoint_every: int = _f(
        500, doc="save a checkpoint every this many optimizer steps (0: stage ends only)"
    )
    keep_checkpoints: int = _f(2, doc="keep this many most recent step checkpoints")
    resume: str | None = _f("auto", doc="auto: continue the newest checkpoint in output_dir; a path; or null")
    gather_across_devices: bool = _f(True, doc="compute in-batch losses over the global batch under DDP")
    embedding_chunk_size: int | None = _f(None, doc="GradCache chunk size (texts per forward with grad)")
    eval_every: int = _f(0, doc="evaluate fidelity on held-out rows every N steps (0: stage ends only)")
    log_every: int = _f(
        10,
        doc="write a metrics row every N optimizer steps (losses averaged over them); also where the trainer "
        "reads the device (one sync) and stops on a non-finite loss or weight",
    )


@dataclass
class ExportConfig:
    """The sentence-transformers folder produced by `export`."""

    out_dir: str | None = _f(None, doc="export folder (default: <output_dir>/export)")
    default_dim: int | None = _f(None, doc="dim used by SentenceTransformer(folder) (default: full dim)")
    prompts: dict[str, str] = _f(factory=dict, doc="named prompts, e.g. s2p_query: 'Instruct: ...'")
    default_prompt_name: str | None = _f(None, doc="prompt applied when encode() names none")
    push_to_hub: str | None = _f(None, doc="Hub repo id to push to after export (e.g. org/name)")
    private: bool = _f(False, doc="create the Hub repo as private")
    layout: Literal["per-dim", "single"] = _f(
        "per-dim", doc="per-dim: also dims/<d>/, a complete folder per dim (Hub: branch dim-<d>); single: no"
    )
    license: str | None = _f(None, doc="the model card's license id (the Hub's), e.g. apache-2.0 or mit")
    language: list[str] = _f(factory=list, doc="language codes of the training data for the card, e.g. [en]")
    datasets: list[str] | None = _f(None, doc="Hub dataset ids for the card (null: Hub ids in data.train)")


@dataclass
class WandbConfig:
    """Weights & Biases settings (with wandb in logging.report_to)."""

    mode: Literal["online", "offline", "disabled"] = _f(
        "offline",
        doc="offline: files under output_dir/wandb, upload later with `wandb sync`; online needs a login",
    )
    project: str = _f(
        "stella-distill",
        doc="project of every tracker: wandb project, MLflow experiment, output_dir/logs/<project>",
    )
    entity: str | None = _f(None, doc="wandb entity (team or user)")


@dataclass
class LoggingConfig:
    """Where scalars go: metrics.jsonl in the run folder always, and the trackers named here."""

    report_to: list[Tracker] = _f(
        factory=lambda: ["wandb"],
        doc="experiment trackers (through accelerate), e.g. [wandb, tensorboard]; [] for metrics.jsonl only",
    )
    wandb: WandbConfig = _f(factory=WandbConfig, doc="Weights & Biases settings")
    progress: bool = _f(True, doc="show progress bars (never under -q)")


@dataclass
class EvaluateConfig:
    """Evaluation run after export by `stella-distill run`."""

    sts: list[str] = _f(
        factory=list,
        doc="scored sentence-pair files: STS-B's tab format, or csv/tsv/jsonl/parquet with sentence1, sentence2, score columns",
    )
    retrieval: list[str] = _f(factory=list, doc="BEIR folders (corpus.jsonl, queries.jsonl, qrels/)")
    batch_size: int = _f(64, doc="encode batch size")
    baseline: bool = _f(True, doc="also score the untrained student's pooled vectors")
    sts_prompt_name: str | None = _f(
        None, doc="export prompt for both STS sentences (null: the default prompt)"
    )
    query_prompt_name: str | None = _f(None, doc="export prompt for retrieval queries, e.g. s2p_query")
    doc_prompt_name: str | None = _f(
        None, doc="export prompt for retrieval documents (null: the default prompt)"
    )


@dataclass
class ExperimentConfig:
    """One distillation experiment."""

    name: str = _f(doc="experiment name")
    output_dir: str = _f(doc="run folder: checkpoints, metrics.jsonl, export")
    cache_dir: str = _f(doc="teacher cache root; one folder per teacher")
    seed: int = _f(42, doc="seed for shuffling, initialisation and dropout")
    data: DataConfig = _f(factory=DataConfig, doc="corpus")
    teachers: list[TeacherConfig] = _f(factory=list, doc="teachers; their vectors are concatenated")
    student: StudentConfig | None = _f(None, doc="student model")
    stages: list[StageConfig] = _f(factory=list, doc="training stages, run in order")
    train: TrainConfig = _f(factory=TrainConfig, doc="trainer settings")
    export: ExportConfig = _f(factory=ExportConfig, doc="export settings")
    logging: LoggingConfig = _f(factory=LoggingConfig, doc="logging settings")
    evaluate: EvaluateConfig = _f(factory=EvaluateConfig, doc="evaluation settings")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-able) of the resolved config."""
        return dataclasses.asdict(self)

    def teacher_max_length(self, teacher: TeacherConfig) -> int:
        """The max length a teacher encodes with."""
        return teacher.max_length or self.data.max_length

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (all if none), for checkpoint compatibility checks."""
        d = self.to_dict()
        if sections:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def fingerprint_stage(self, index: int) -> str:
        """Stable hash of one stage's training-relevant fields (not its name)."""
        d = dataclasses.asdict(self.stages[index])
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Cross-field checks


def _positive(value: float | int | None, path: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}; got {show(value)}")


MAX_SEED = 2**32 - 1  # numpy's and every framework's seed range
MAX_NAME_BYTES = 255  # the longest file name Linux and macOS file systems take
# Folders and files of a run folder; a teacher's cache folder must not be one of them.
RUN_FOLDER_NAMES = ("checkpoints", "final", "export", "config.yaml", "metrics.jsonl")


def _path(value: str | None, path: str) -> None:
    """A path the user gave: not blank, and no component longer than a file system takes."""
    if value is None:
        return
    if not value.strip():
        raise ConfigError(f"{path}: must not be empty")
    for part in Path(value).parts:
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise ConfigError(
                f"{path}: the name {show(part)} is {len(part.encode('utf-8'))} bytes; file systems take "
                f"at most {MAX_NAME_BYTES}"
            )


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_folders(cfg: ExperimentConfig) -> None:
    """The run folder and the teacher caches must not overlap: one would overwrite the other."""
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    cache_dir = Path(cfg.cache_dir).expanduser().resolve()
    if run_dir == cache_dir:
        raise ConfigError(
            f"cache_dir: is output_dir ({cfg.output_dir}); the run folder (checkpoints, final, export) and the "
            f"teacher caches need folders of their own"
        )
    if _inside(run_dir, cache_dir / CORPUS_FOLDER):
        raise ConfigError(
            f"output_dir: {cfg.output_dir} lies inside cache_dir/{CORPUS_FOLDER}, the corpus table's folder"
        )
    for i, t in enumerate(cfg.teachers):
        folder = cache_dir / t.name
        if _inside(run_dir, folder):
            raise ConfigError(
                f"output_dir: {cfg.output_dir} lies inside the cache of teachers.{i} ({folder})"
            )
        if any(_inside(folder, run_dir / name) for name in RUN_FOLDER_NAMES):
            raise ConfigError(
                f"teachers.{i}.name: its cache folder {folder} would be part of the run folder {cfg.output_dir}"
            )


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-field checks that single-field typing cannot express."""
    if not cfg.name.strip():
        raise ConfigError("name: must not be empty")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed: must be in [0, {MAX_SEED}]; got {cfg.seed}")
    _path(cfg.output_dir, "output_dir")
    _path(cfg.cache_dir, "cache_dir")
    _path(cfg.export.out_dir, "export.out_dir")
    for i, p in enumerate(cfg.evaluate.sts):
        _path(p, f"evaluate.sts.{i}")
    for i, p in enumerate(cfg.evaluate.retrieval):
        _path(p, f"evaluate.retrieval.{i}")
    _positive(cfg.data.limit, "data.limit")
    _positive(cfg.data.max_length, "data.max_length")
    _positive(cfg.data.eval_limit, "data.eval_limit")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1); got {cfg.data.eval_fraction!r}")
    for i, src in enumerate(cfg.data.train):
        _path(src.path, f"data.train.{i}.path")
        _positive(src.limit, f"data.train.{i}.limit")
    if not cfg.teachers:
        raise ConfigError("teachers: at least one teacher is required")
    seen: dict[str, int] = {}
    for i, t in enumerate(cfg.teachers):
        if (
            not t.name.strip()
            or "/" in t.name
            or "\\" in t.name
            or t.name.startswith(".")
            or any(ord(c) < 32 for c in t.name)
        ):
            raise ConfigError(
                f"teachers.{i}.name: must be a folder name without '/' or control characters that does not "
                f"start with '.'; "
                f"got {show(t.name)}"
            )
        _path(t.name, f"teachers.{i}.name")
        if t.name in seen:
            raise ConfigError(
                f"teachers.{i}.name: duplicate teacher name {t.name!r} (also teachers.{seen[t.name]})"
            )
        if t.name == CORPUS_FOLDER:
            raise ConfigError(
                f"teachers.{i}.name: {t.name!r} is reserved: cache_dir/{CORPUS_FOLDER} holds the corpus table"
            )
        seen[t.name] = i
        _path(t.model, f"teachers.{i}.model")
        for j, dense in enumerate(t.dense if isinstance(t.dense, list) else [t.dense]):
            _path(dense, f"teachers.{i}.dense" + (f".{j}" if isinstance(t.dense, list) else ""))
        _positive(t.max_length, f"teachers.{i}.max_length")
        _positive(t.batch_tokens, f"teachers.{i}.batch_tokens")
        _positive(t.max_batch_size, f"teachers.{i}.max_batch_size")
        _positive(t.shard_size, f"teachers.{i}.shard_size")
    st = cfg.student
    if st is not None:
        _path(st.model, "student.model")
        if st.keep_layers is not None:
            if not st.keep_layers:
                raise ConfigError("student.keep_layers: must list at least one layer (or be null)")
            if any(layer < 0 for layer in st.keep_layers):
                raise ConfigError(f"student.keep_layers: layer indices must be >= 0; got {st.keep_layers}")
            if len(set(st.keep_layers)) != len(st.keep_layers):
                raise ConfigError(f"student.keep_layers: duplicated layer index in {st.keep_layers}")
            if st.keep_layers != sorted(st.keep_layers):
                raise ConfigError(f"student.keep_layers: must be increasing; got {st.keep_layers}")
        _positive(st.target_dim, "student.target_dim")
        dims = st.mrl.dims
        for j, d in enumerate(dims):
            _positive(d, f"student.mrl.dims.{j}")
        if len(set(dims)) != len(dims):
            raise ConfigError(f"student.mrl.dims: duplicated dim in {dims}")
        if dims not in (sorted(dims), sorted(dims, reverse=True)):
            raise ConfigError(f"student.mrl.dims: must be sorted (increasing or decreasing); got {dims}")
        if st.target_dim is not None and dims and max(dims) > st.target_dim:
            raise ConfigError(
                f"student.mrl.dims: dim {max(dims)} is larger than student.target_dim {st.target_dim}"
            )
        if dims and st.mrl.mode == "none":
            raise ConfigError("student.mrl.mode: is 'none' but student.mrl.dims lists dims")
    if cfg.stages and st is None:
        raise ConfigError("student: required when stages are given")
    names: dict[str, int] = {}
    for i, s in enumerate(cfg.stages):
        p = f"stages.{i}"
        if s.name in names:
            raise ConfigError(f"{p}.name: duplicate stage name {s.name!r} (also stages.{names[s.name]})")
        names[s.name] = i
        if s.steps is None and s.epochs is None:
            raise ConfigError(f"{p}.steps: set steps or epochs")
        _positive(s.steps, f"{p}.steps")
        _positive(s.epochs, f"{p}.epochs")
        _positive(s.batch_size, f"{p}.batch_size")
        _positive(s.grad_accumulation, f"{p}.grad_accumulation")
        _positive(s.lr, f"{p}.lr")
        _positive(s.last_layers, f"{p}.last_layers")
        _positive(s.weight_decay, f"{p}.weight_decay", allow_zero=True)
        _positive(s.max_grad_norm, f"{p}.max_grad_norm")
        _positive(s.margin, f"{p}.margin", allow_zero=True)
        if not 0.0 <= s.warmup_ratio < 1.0:
            raise ConfigError(f"{p}.warmup_ratio: must be in [0, 1); got {s.warmup_ratio!r}")
        for k, v in dataclasses.asdict(s.loss_weights).items():
            _positive(v, f"{p}.loss_weights.{k}", allow_zero=True)
        for k, v in dataclasses.asdict(s.mrl_loss_weights).items():
            _positive(v, f"{p}.mrl_loss_weights.{k}", allow_zero=True)
        if not any(dataclasses.asdict(s.loss_weights).values()) and not (
            s.mrl and any(dataclasses.asdict(s.mrl_loss_weights).values())
        ):
            raise ConfigError(f"{p}.loss_weights: every loss weight is 0; the stage would train nothing")
        if s.mrl and (st is None or not st.mrl.dims):
            raise ConfigError(f"{p}.mrl: stage trains reduced dims but student.mrl.dims is empty")
    _positive(cfg.train.checkpoint_every, "train.checkpoint_every", allow_zero=True)
    _positive(cfg.train.keep_checkpoints, "train.keep_checkpoints")
    _positive(cfg.train.embedding_chunk_size, "train.embedding_chunk_size")
    _positive(cfg.train.eval_every, "train.eval_every", allow_zero=True)
    _positive(cfg.train.log_every, "train.log_every")
    _positive(cfg.evaluate.batch_size, "evaluate.batch_size")
    if len(set(cfg.logging.report_to)) != len(cfg.logging.report_to):
        raise ConfigError(f"logging.report_to: a tracker is listed twice in {cfg.logging.report_to}")
    ex = cfg.export
    _positive(ex.default_dim, "export.default_dim")
    for what in ("sts", "query", "doc"):
        name = getattr(cfg.evaluate, f"{what}_prompt_name")
        if name is not None and name not in ex.prompts:
            raise ConfigError(
                f"evaluate.{what}_prompt_name: {name!r} is not one of export.prompts "
                f"({', '.join(ex.prompts) or 'none defined'})"
            )
    for name, values, pattern, what in (  # the card's metadata: what the Hub accepts
        ("license", [ex.license] if ex.license else [], r"[a-z0-9][a-z0-9.+-]*", "a license id such as mit"),
        ("language", ex.language, r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", "a language code such as en or pt-BR"),
        ("datasets", ex.datasets or [], r"(?!\.)(?!.*\.\.)[\w.-]+(/[\w.-]+)?", "a Hub dataset id (org/name)"),
    ):
        for i, value in enumerate(values):
            if not re.fullmatch(pattern, value):
                where = "export.license" if name == "license" else f"export.{name}.{i}"
                raise ConfigError(f"{where}: expected {what}; got {value!r}")
    if ex.default_prompt_name is not None and ex.default_prompt_name not in ex.prompts:
        raise ConfigError(
            f"export.default_prompt_name: {ex.default_prompt_name!r} is not one of export.prompts "
            f"({', '.join(ex.prompts) or 'none defined'})"
        )
    if ex.push_to_hub is not None and not HUB_REPO.fullmatch(ex.push_to_hub):
        raise ConfigError(f"export.push_to_hub: {ex.push_to_hub!r} is not a Hub repo id of the form org/name")
    check_dims(cfg, st.target_dim if st is not None else None)
    _check_folders(cfg)
    most = cfg.data.limit
    if most is None and cfg.data.train and all(src.limit is not None for src in cfg.data.train):
        most = sum(src.limit for src in cfg.data.train)
    for i, s in enumerate(cfg.stages):
        if most is not None and s.batch_size > most:
            raise ConfigError(
                f"stages.{i}.batch_size: {s.batch_size} is more than the at most {most} texts the corpus "
                f"limits allow (data.limit / data.train.*.limit); no batch could be formed"
            )
    return cfg


def check_teacher_dims(cfg: ExperimentConfig, dims: list[int]) -> None:
    """The teachers' output dims (from their files, or from their caches) against ``student.target_dim``,
    ``student.mrl.dims`` and ``export.default_dim``."""
    st, total = cfg.student, sum(dims)
    if st is not None and st.target_dim is not None and st.target_dim != total:
        parts = " + ".join(f"{d} ({t.name})" for d, t in zip(dims, cfg.teachers))
        raise ConfigError(
            f"student.target_dim: {st.target_dim} differs from the teachers' concatenated dim "
            f"{parts} = {total}; leave it unset or make it match"
        )
    check_dims(cfg, total)


def check_dims(cfg: ExperimentConfig, target: int | None) -> None:
    """``student.mrl.dims`` and ``export.default_dim`` against the student's target dim (None: not known
    yet; the teachers' dims decide it). Checked at load time, again when the models' files tell the
    teachers' dims, and at the start of training with the caches' dims."""
    st, default = cfg.student, cfg.export.default_dim
    if st is None:
        return
    if target is not None:
        for d in st.mrl.dims:
            if d > target:
                raise ConfigError(f"student.mrl.dims: dim {d} is larger than the target dim {target}")
            if d == target:
                raise ConfigError(
                    f"student.mrl.dims: dim {d} equals the target dim; the projection already outputs it, "
                    f"list only reduced dims"
                )
    if default is None or default in st.mrl.dims:
        return
    if st.mrl.mode == "truncate":
        if target is not None and default > target:
            raise ConfigError(f"export.default_dim: {default} is larger than the target dim {target}")
    elif target is not None and default != target:
        raise ConfigError(
            f"export.default_dim: {default} is not an offered dim: one of student.mrl.dims "
            f"{st.mrl.dims or '[]'} or the target dim {target}"
        )


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fill what the models' own files say into the fields left unset and check the config against
    those files (``model_files``: JSON files only, local or through the Hub cache; nothing loads)."""
    from stella_distill import model_files

    files = [
        model_files.read_model_files(t.model, t.revision, f"teachers.{i}.model")
        for i, t in enumerate(cfg.teachers)
    ]
    cfg.teachers = [
        model_files.resolve_teacher(t, f"teachers.{i}", f)
        for i, (t, f) in enumerate(zip(cfg.teachers, files))
    ]
    model_files.check_models(cfg, files)
    return cfg


# ---------------------------------------------------------------------------------------------
# Entry point


def from_dict(data: dict, resolve_models: bool = True) -> ExperimentConfig:
    """Build and validate a config from plain data (as YAML would give); with ``resolve_models``, also
    fill and check it from the models' files (``resolve``)."""
    cfg = validate(build(ExperimentConfig, data, ""))
    return resolve(cfg) if resolve_models else cfg


def load_config(
    path: str | Path, overrides: list[str] | None = None, resolve_models: bool = True
) -> ExperimentConfig:
    """Load a YAML experiment config, apply dotted overrides, convert and validate it (``from_dict``).

    ``resolve_models=False`` reads a config as written, e.g. a run folder's ``config.yaml``, which
    holds the resolved values already."""
    data = read_yaml(path)
    for ov in overrides or []:
        apply_override(data, ov)
    return from_dict(data, resolve_models)


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the run folder's `config.yaml`)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
