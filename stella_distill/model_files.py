"""What a model's own small files say about it, read without loading it (no torch).

A sentence-transformers folder names its pipeline in ``modules.json``: the pooling mode
(``1_Pooling/config.json``), Dense heads, Normalize; ``config_sentence_transformers.json`` holds its
prompts and the default one; ``config.json`` (any Hugging Face model) its hidden size, layer count and
whether it runs its own code (``auto_map``). Local folders are read directly; Hub ids through the
local Hugging Face cache, and the Hub itself unless ``HF_HUB_OFFLINE`` is set.

The config uses this to fill teacher fields left unset (``resolve_teacher``) and to check, before any
work, what otherwise fails hours later (layer counts, dims, remote code).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stella_distill.checks import check_teacher_dims
from stella_distill.config import ExperimentConfig, TeacherConfig
from stella_distill.errors import ConfigError, UserError
from stella_distill.hub import dense_location, looks_local, offline
from stella_distill.logs import get_logger

logger = get_logger(__name__)

# sentence-transformers' pooling modes -> the name stella-distill gives them (None: not computed here),
# and back; POOLING_FLAGS: the boolean keys of older pooling configs (what TEI and vLLM still parse).
POOLING_FROM_ST = {
    "cls": "cls",
    "mean": "mean",
    "lasttoken": "last_token",
    "max": None,
    "mean_sqrt_len_tokens": None,
    "weightedmean": None,
}
POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_TO_ST = {ours: st for st, ours in POOLING_FROM_ST.items() if ours is not None}
_APPLIED = ("Transformer", "Pooling", "Dense", "Normalize")
_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "dim")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


# Architectures whose position ids start after the padding index (fairseq's convention): their table
# has two rows more than the positions a text can use (RoBERTa and XLM-R: 514 rows, 512 positions).
PADDING_OFFSET_MODELS = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "ernie_m", "luke")


def usable_positions(config: Any) -> int | None:
    """How many tokens a model's position table takes, from its config (a ``PretrainedConfig`` or the
    ``config.json`` mapping); None where the config sets no table."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    limit = get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    if get("model_type") in PADDING_OFFSET_MODELS:
        limit -= (get("pad_token_id") or 1) + 1
    return limit


class _Unreadable:
    """The file may exist but cannot be read here (a Hub id offline and not in the local cache)."""


UNREADABLE = _Unreadable()


@dataclass
class ModelFiles:
    """What the files of one model say; None where a file or a fact is absent or unreadable."""

    model: str
    readable: bool = False  # config.json could be read: the model is here (a folder, or in the cache)
    st_unknown: bool = False  # modules.json could not be read (Hub id offline, not cached)
    modules: list[dict] | None = None  # modules.json (None: not a sentence-transformers folder)
    pooling: str | None = None  # sentence-transformers' mode name, e.g. "mean", "lasttoken", "max"
    include_prompt: bool = True
    dense: list[str] = field(default_factory=list)  # Dense module subfolders, in order
    normalize: bool = False  # a Normalize module ends the pipeline
    other_modules: list[str] = field(default_factory=list)  # module types stella-distill does not apply
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    config: dict | None = None  # config.json

    @property
    def default_prompt(self) -> str:
        """The prompt ``SentenceTransformer.encode`` applies when it is given none ("" if there is none)."""
        return self.prompts.get(self.default_prompt_name or "", "")

    @property
    def hidden_size(self) -> int | None:
        """The width of the last hidden states, from config.json (None for models that run their own code)."""
        return self._config_int(_HIDDEN_KEYS)

    @property
    def num_layers(self) -> int | None:
        """The transformer layer count, from config.json."""
        return self._config_int(_LAYER_KEYS)

    @property
    def remote_code(self) -> bool:
        """Whether the model runs its own Python code (``auto_map`` in config.json)."""
        return bool(self.config and self.config.get("auto_map"))

    def _config_int(self, keys: tuple[str, ...]) -> int | None:
        if not self.config or self.remote_code:
            return None
        for key in keys:
            value = self.config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None


def read_json_file(model: str, revision: str | None, name: str, field_name: str) -> Any:
    """The parsed JSON file ``name`` of ``model`` (a local folder or a Hub id); None when the model has
    no such file, ``UNREADABLE`` when it cannot be told here. Bad JSON is an error naming ``field_name``."""
    where = Path(model).expanduser()
    if where.is_dir():
        path = where / name
        if not path.is_file():
            return None
    elif looks_local(model):
        return UNREADABLE
    else:
        path = _hub_file(model, name, revision)
        if path is None or path is UNREADABLE:
            return path
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{field_name}: {path}: not readable JSON ({exc})") from None


def _hub_file(repo: str, name: str, revision: str | None):
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    try:
        cached = try_to_load_from_cache(repo, name, revision=revision)
    except ValueError:  # not a valid repo id
        return UNREADABLE
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache knows the repository has no such file
        return None
    if offline() or not _hub_reachable():
        return UNREADABLE
    try:
        return Path(hf_hub_download(repo, name, revision=revision))
    except EntryNotFoundError:
        return None
    except Exception:  # no network, no such repo, gated: loading the model says which, with its field
        return UNREADABLE


@functools.cache
def _hub_reachable() -> bool:
    """Whether the Hub's host name resolves. Without a network huggingface_hub retries every file for
    about 20 s; a failed name lookup answers at once, and the files are then as unreadable as offline."""
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        logger.debug(f"{host} does not resolve: model files are read from the local Hub cache only")
        return False
    return True


def read_model_files(model: str, revision: str | None, field_name: str) -> ModelFiles:
    """Read ``config.json``, ``modules.json``, the Pooling config and ``config_sentence_transformers.json``."""
    files = ModelFiles(model)
    config = read_json_file(model, revision, "config.json", field_name)
    if isinstance(config, dict):
        files.config, files.readable = config, True
    modules = read_json_file(model, revision, "modules.json", field_name)
    if modules is UNREADABLE:
        files.st_unknown = True
        return files
    if modules is None:
        return files
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UserError(f"{field_name}: {model}/modules.json: expected a list of modules")
    files.modules = modules
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = str(module.get("path", "")).strip("/")
        if kind == "Pooling":
            pooling = read_json_file(model, revision, f"{path}/config.json", field_name)
            if isinstance(pooling, dict):
                files.pooling = pooling_mode(pooling)
                files.include_prompt = bool(pooling.get("include_prompt", True))
        elif kind == "Dense":
            files.dense.append(path)
        elif kind not in _APPLIED:
            files.other_modules.append(str(module.get("type")))
        files.normalize = kind == "Normalize"  # only a last Normalize makes the output unit-length
    st_config = read_json_file(model, revision, "config_sentence_transformers.json", field_name)
    if isinstance(st_config, dict):
        prompts = st_config.get("prompts") or {}
        files.prompts = {str(k): str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {}
        files.default_prompt_name = st_config.get("default_prompt_name")
    return files


def pooling_mode(config: dict) -> str:
    """sentence-transformers' pooling mode of a Pooling ``config.json`` (``pooling_mode``, or the
    ``pooling_mode_*`` flags of older versions); several modes concatenated read ``"a+b"``."""
    mode = config.get("pooling_mode")
    if mode is None:
        mode = [m for key, m in POOLING_FLAGS.items() if config.get(key)] or ["mean"]
    if isinstance(mode, (list, tuple)):
        return "+".join(map(str, mode))
    return str(mode)


def dense_out_features(model: str, dense: list[str], revision: str | None, field_name: str) -> int | None:
    """``out_features`` of the last Dense module in ``dense`` (each a subfolder of ``model`` or a folder)."""
    if not dense:
        return None
    where, subfolder = dense_location(model, dense[-1])
    name = f"{subfolder}/config.json" if subfolder else "config.json"
    config = read_json_file(where, revision if where == model else None, name, field_name)
    value = config.get("out_features") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


# ---------------------------------------------------------------------------------------------
# Teachers configured from their folders, and the config checked against its models


def resolve_teacher(teacher: TeacherConfig, where: str, files: ModelFiles | None = None) -> TeacherConfig:
    """``teacher`` with ``pooling``, ``dense`` and ``prompt`` filled in from its model's files.

    A field set in the config wins; where it contradicts the model's own files, one warning line
    names the field. Unset fields take the model's 1_Pooling mode, its Dense modules (in order) and
    the prompt ``SentenceTransformer.encode`` applies by default; a model without ``modules.json``
    gives mean pooling, no Dense and no prompt. ``normalize`` keeps its value (the target normalises
    every teacher anyway); a model that ends in Normalize with ``normalize: false`` is warned about.
    A pooling mode stella-distill does not compute (max, weightedmean, ...) is an error unless
    ``pooling`` is set. ``where`` is the teacher's place in the config (``teachers.0``), for messages.
    """
    p = where
    model = teacher.model
    files = files or read_model_files(model, teacher.revision, f"{p}.model")
    unset = [f for f in ("pooling", "dense", "prompt") if getattr(teacher, f) is None]
    if files.st_unknown and files.readable and unset:
        fallback = {"pooling": "mean", "dense": "none", "prompt": "none"}
        logger.warning(
            f"{p}.model: cannot read {model}'s modules.json here (offline and not in the local Hub cache): "
            + ", ".join(f"{p}.{f} falls back to {fallback[f]}" for f in unset)
            + "; set them to be sure"
        )
    own = files.pooling
    ours = POOLING_FROM_ST.get(own) if own is not None else None
    pooling = teacher.pooling
    if pooling is None:
        if own is not None and ours is None:
            raise ConfigError(
                f"{p}.pooling: {model} pools with {own!r} (modules.json), which stella-distill does not "
                f"compute; set {p}.pooling to cls, mean or last_token to use one of those instead"
            )
        pooling = ours or "mean"
    elif own is not None and ours != pooling:
        logger.warning(
            f"{p}.pooling: {pooling!r} overrides {model}'s own pooling {own!r} (modules.json); "
            f"remove the line to follow the model"
        )
    dense = teacher.dense
    if dense is None:
        dense = files.dense[0] if len(files.dense) == 1 else (list(files.dense) or None)
    elif files.modules is not None and dense_list(dense) != files.dense:
        logger.warning(
            f"{p}.dense: {dense_list(dense) or 'none'} overrides {model}'s own Dense modules "
            f"{files.dense or 'none'} (modules.json); remove the line to follow the model"
        )
    prompt = teacher.prompt
    if prompt is None:
        prompt = files.default_prompt
    elif files.default_prompt and prompt != files.default_prompt:
        logger.warning(
            f"{p}.prompt: {prompt!r} overrides {model}'s default prompt {files.default_prompt_name!r} "
            f"(config_sentence_transformers.json); remove the line to follow the model"
        )
    if files.normalize and not teacher.normalize:
        logger.warning(f"{p}.normalize: false, but {model} ends in Normalize (modules.json)")
    if files.other_modules:
        logger.warning(
            f"{p}.model: {model}'s modules.json also has {', '.join(files.other_modules)}, which "
            f"stella-distill does not apply: its cached vectors will differ from SentenceTransformer's"
        )
    if prompt and not files.include_prompt and pooling == "mean":
        logger.warning(
            f"{p}.prompt: {model} leaves prompt tokens out of its pooling (include_prompt: false); "
            f"stella-distill pools over them"
        )
    return dataclasses.replace(teacher, pooling=pooling, dense=dense, prompt=prompt)


def dense_list(dense: str | list[str] | None) -> list[str]:
    """``teachers.N.dense`` as a list of Dense folders, in the order they apply."""
    if dense is None:
        return []
    return [d.rstrip("/") for d in ([dense] if isinstance(dense, str) else dense)]


def check_models(cfg: ExperimentConfig, teacher_files: list[ModelFiles]) -> None:
    """What the models' files tell before any work: folders that are missing, code that would run
    without ``trust_remote_code``, and the dims and layer counts that training and export need."""
    student = cfg.student
    roles = [(f"teachers.{i}", t.model, t.trust_remote_code) for i, t in enumerate(cfg.teachers)]
    if student is not None:
        roles.append(("student", student.model, student.trust_remote_code))
    for where, model, _ in roles:
        if looks_local(model) and not Path(model).expanduser().exists():
            raise ConfigError(
                f"{where}.model: {model}: no such model folder (Hub model ids look like org/name)"
            )
    files = dict(zip([r[0] for r in roles], teacher_files))
    if student is not None:
        files["student"] = read_model_files(student.model, student.revision, "student.model")
    for where, model, trusted in roles:
        if files[where].remote_code and not trusted:
            raise ConfigError(
                f"{where}.model: {model} asks to run its own Python code (auto_map in config.json); "
                f"set trust_remote_code: true next to it only if you trust that code"
            )
    dims = []
    for i, (t, f) in enumerate(zip(cfg.teachers, teacher_files)):
        field_name = f"teachers.{i}.dense"
        dims.append(
            dense_out_features(t.model, dense_list(t.dense), t.revision, field_name)
            if t.dense
            else f.hidden_size
        )
    if student is None:
        return
    if None not in dims:
        check_teacher_dims(cfg, dims)
    st_config = files["student"].config
    positions = usable_positions(st_config) if st_config and not files["student"].remote_code else None
    if positions is not None and cfg.data.max_length > positions:
        raise ConfigError(
            f"data.max_length: {cfg.data.max_length} tokens is more than the student's {positions} positions "
            f"({student.model}); lower it to {positions} at most"
        )
    layers = files["student"].num_layers
    if layers is None:
        return
    for i in student.keep_layers or []:
        if i >= layers:
            raise ConfigError(f"student.keep_layers: layer {i} out of range (the model has {layers} layers)")
    kept = len(student.keep_layers) if student.keep_layers else layers
    for i, stage in enumerate(cfg.stages):
        if stage.trainable == "last_layers" and stage.last_layers > kept:
            raise ConfigError(
                f"stages.{i}.last_layers: {stage.last_layers} must be between 1 and the student's {kept} layers"
            )
