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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stella_distill.checks import CORPUS_FOLDER, validate
from stella_distill.configfile import apply_override, build, read_yaml
from stella_distill.errors import ConfigError

__all__ = [
    "CORPUS_FOLDER",
    "ConfigError",
    "ExperimentConfig",
    "load_config",
    "from_dict",
    "dump_config",
    "read_yaml",
]


def _f(default: Any = dataclasses.MISSING, doc: str = "", factory: Any = None) -> Any:
    """A dataclass field with a one-line doc."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


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
        None, doc="token budget per forward batch (null: 32768 on GPU, 1024 on CPU)"
    )
    max_batch_size: int | None = _f(None, doc="cap on texts per forward batch (null: 1024 on GPU, 64 on CPU)")
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

    def fingerprint_stage(self, index: int) -> str:
        """Stable hash of one stage's training-relevant fields (not its name)."""
        d = dataclasses.asdict(self.stages[index])
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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
    cfg = validate(build(ExperimentConfig, data, ""))  # checks.validate: the cross-field rules
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
