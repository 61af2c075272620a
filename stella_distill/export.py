"""Export a trained student as a sentence-transformers folder, write its model card, push it to the Hub.

The folder is what users take away from a run, so it must load anywhere with nothing but
sentence-transformers installed (no ``trust_remote_code``, no stella_distill import)::

    README.md                          model card (Hub metadata header) + loss_curve.png, metrics_by_dim.png
    config.json, model.safetensors     the backbone (Hugging Face format, safetensors only)
    tokenizer files                    with the student's padding side (Qwen2: left) and pad token
    sentence_bert_config.json          max_seq_length = the student's max length
    modules.json                       Transformer -> 1_Pooling -> 2_Dense_{default} -> Normalize
    1_Pooling/config.json              mean | cls | lasttoken, as the student pooled
    2_Dense_{d}/                       Linear(hidden, d) with bias, Identity activation
    config_sentence_transformers.json  prompts, default_prompt_name, similarity_fn_name, truncate_dim
    stella_distill.json                MRL mode, offered dims, provenance (optional for loading)

``modules.json`` uses the legacy ``sentence_transformers.models.*`` type strings and the module configs
use their legacy keys, which serving stacks (TEI, vLLM) parse. The MRL part of the student maps to:

- ``heads``: one ``2_Dense_{d}`` folder per offered dim (the full target dim included), with
  ``modules.json`` naming the default one, like the released Stella models. ``load(path, dim)``
  swaps in another head.
- ``truncate``: one ``2_Dense_{full}`` and ``truncate_dim`` (the default dim) in
  ``config_sentence_transformers.json``; every prefix is a valid embedding.
- ``none``: one ``2_Dense_{full}``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stella_distill import card
from stella_distill.errors import UserError, first_line, write_failure
from stella_distill.files import replace_folder
from stella_distill.hub import is_hub_id
from stella_distill.logs import get_logger
from stella_distill.run import Source, consolidate_state_dict, find_source
from stella_distill.student import StudentModel
from stella_distill.tables import read_json

logger = get_logger(__name__)

LEGACY_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Dense": "sentence_transformers.models.Dense",
    "Normalize": "sentence_transformers.models.Normalize",
}
ST_POOLING = {"mean": "mean", "cls": "cls", "last_token": "lasttoken"}
INFO_FILE = "stella_distill.json"
# Sentences the export is checked on: the loaded folder must reproduce the student on them.
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Distillation transfers what a large model knows into a small one.",
    "a",
    "Rivers flow to the sea, and the sea gives back rain to the hills and the rivers again.",
]


# ---------------------------------------------------------------------------------------------
# Loading the student of a run


def load_student(source: Source) -> StudentModel:
    """The ``StudentModel`` of ``source``: loaded from its folder or rebuilt from config + consolidated state."""
    if source.student_dir is not None:
        return StudentModel.from_pretrained(source.student_dir)
    cfg = source.config
    if cfg is None or cfg.student is None:
        raise UserError(
            f"{source.checkpoint}: rebuilding the student from a model state needs the run's config.yaml "
            f"(next to the checkpoint or in the run folder)"
        )
    state = consolidate_state_dict(source.checkpoint)
    if "projection.weight" not in state:
        raise UserError(f"{source.checkpoint}: the model state has no projection.weight; not a student state")
    with torch.random.fork_rng(devices=[]):
        student = StudentModel.from_config(
            cfg.student, target_dim=int(state["projection.weight"].shape[0]), max_length=cfg.data.max_length
        )
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:400]
        raise UserError(
            f"{source.checkpoint}: the model state does not fit the configured student: {first}"
        ) from None
    return student.eval()


# ---------------------------------------------------------------------------------------------
# Writing the sentence-transformers folder


def offered_dims(student) -> list[int]:
    """The dims a student offers, largest first: the full target dim and its MRL dims."""
    return sorted({int(student.target_dim), *(int(d) for d in student.mrl_dims)}, reverse=True)


def _check_dim(dim: int, mode: str, dims: list[int], full: int, where: str) -> int:
    dim = int(dim)
    if mode == "truncate" and 1 <= dim <= full:
        return dim
    if dim in dims:
        return dim
    extra = f" (truncate mode: any prefix 1..{full})" if mode == "truncate" else ""
    raise UserError(f"{where}: dim {dim} is not offered; offered dims: {', '.join(map(str, dims))}{extra}")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_dense(folder: Path, linear) -> None:
    from safetensors.torch import save_file

    weight = linear.weight.detach().float().cpu().contiguous()
    bias = linear.bias.detach().float().cpu().contiguous()
    _write_json(
        folder / "config.json",
        {
            "in_features": int(weight.shape[1]),
            "out_features": int(weight.shape[0]),
            "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity",
        },
    )
    save_file({"linear.weight": weight, "linear.bias": bias}, str(folder / "model.safetensors"))


def _pooling_config(hidden: int, pooling: str) -> dict:
    # The legacy boolean form: what TEI/vLLM parse, and what sentence-transformers still reads.
    mode = ST_POOLING[pooling]
    return {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": mode == "lasttoken",
        "include_prompt": True,
    }


def _versions() -> dict:
    import transformers

    try:
        import sentence_transformers

        st = sentence_transformers.__version__
    except ImportError:  # the export itself does not need it; only loading does
        st = "unknown"
    return {
        "sentence_transformers": st,
        "transformers": transformers.__version__,
        "pytorch": torch.__version__,
    }


TMP_SUFFIX = ".stella-distill-tmp"
OLD_SUFFIX = ".stella-distill-old"
# Files commands of ours add to an export after it is written (evaluate, the card); not foreign.
LATER_FILES = ("README.md", "loss_curve.png", "metrics_by_dim.png", "eval.json")
LATER_FOLDERS = ("mteb",)


def _files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def _foreign_files(out: Path) -> list[str]:
    """Files in ``out`` that no export of ours wrote (all of them if ``out`` is not an export of ours)."""
    have = _files_in(out)
    try:
        info = read_json(out / INFO_FILE) if (out / INFO_FILE).is_file() else {}
    except UserError:
        info = {}
    ours = set(info.get("files") or []) if isinstance(info, dict) else set()
    if not ours:
        return sorted(have)
    ours |= {INFO_FILE, *LATER_FILES}
    return sorted(f for f in have if f not in ours and f.split("/", 1)[0] not in LATER_FOLDERS)


def _siblings(out: Path, suffix: str) -> list[Path]:
    """Temp or former-version folders of ours beside ``out`` (``.NAME.PID.*SUFFIX``), oldest first."""
    found = [p for p in out.parent.glob(f".{out.name}.*{suffix}") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _pid_alive(folder: Path) -> bool:
    try:
        os.kill(int(folder.name[len(".") :].split(".")[-2].split("-")[0]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that exists and holds anything an export of ours did not write."""
    if not out.exists():
        former = _siblings(out, OLD_SUFFIX)
        if former:  # a replacement was interrupted between its two renames: put the old version back
            os.replace(former[-1], out)
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    foreign = _foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(
            f"{out}: the folder holds files stella-distill did not write ({shown}); it is left as it is: "
            f"choose another --out, or move those files away"
        )


def _prepare_out(out: Path) -> Path:
    """A fresh temp folder beside ``out`` (ours alone: a unique name with our suffix); stale ones of
    ours whose process is gone are removed first."""
    import tempfile

    _check_out(out)
    for parent in (out.parent, *out.parent.parents):
        if parent.exists() and not parent.is_dir():  # mkdir would say "File exists", which misleads
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _siblings(out, TMP_SUFFIX):
        if not _pid_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=TMP_SUFFIX, dir=out.parent))


def _publish(tmp: Path, out: Path) -> Path:
    """Record the files of ``tmp`` in its INFO_FILE and put it in place of ``out``; the former
    version is kept beside it until the new one is in place, then removed."""
    info = read_json(tmp / INFO_FILE)
    info["files"] = sorted(_files_in(tmp) - {INFO_FILE})
    _write_json(tmp / INFO_FILE, info)
    _check_out(out)  # again: the folder may have changed while the export was written
    former = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)] + OLD_SUFFIX)
    replace_folder(tmp, out, former)
    shutil.rmtree(former, ignore_errors=True)
    return out


def check_finite(student: StudentModel, where: str) -> None:
    """Refuse a student whose weights hold NaN or inf (a diverged run): it must never ship."""
    bad = [
        name
        for name, t in student.state_dict().items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(
            f"{where}: the student's weights hold NaN/inf ({len(bad)} tensors: {shown}); the run diverged "
            f"and is not exported; export an earlier checkpoint (checkpoints/step-*) instead"
        )


def export_student(
    student,
    out: str | Path,
    *,
    default_dim: int | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    info: dict | None = None,
    default_dim_field: str = "export.default_dim",
    before_publish: Callable[[Path], Any] | None = None,
) -> Path:
    """Write ``student`` (a ``StudentModel``) as a sentence-transformers folder at ``out``.

    ``default_dim`` is the dim ``SentenceTransformer(out)`` returns (default: the full target dim).
    ``default_dim_field`` names where the default dim came from in errors. ``prompts`` become named
    prompts; a non-empty training prefix of the student (``student.prompt``) is added as the
    ``document`` prompt unless a prompt already holds it.

    The folder is written beside ``out`` and ``before_publish(folder)`` (the card, a check) runs on it
    there; then it replaces ``out`` as a whole, so no stale head survives and ``out`` always holds one
    complete export. ``out`` must be empty, missing, or an export of ours with nothing foreign added
    (a folder holding files stella-distill did not write is refused, never deleted). A student with
    NaN/inf weights is refused.
    """
    out = Path(out)
    dims = offered_dims(student)
    full = int(student.target_dim)
    mode = student.mrl_mode
    default_dim = (
        full if default_dim is None else _check_dim(default_dim, mode, dims, full, default_dim_field)
    )
    prompts = dict(prompts or {})
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise UserError(f"export.default_prompt_name: {default_prompt_name!r} is not one of export.prompts")
    if student.prompt and student.prompt not in prompts.values():
        prompts.setdefault("document", student.prompt)

    check_finite(student, str(out))
    tmp = None
    try:
        tmp = _prepare_out(out)
        _write_export(student, tmp, default_dim, prompts, default_prompt_name, info)
        if before_publish is not None:
            before_publish(tmp)
        return _publish(tmp, out)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; an earlier export stays whole
        reason = write_failure(exc) if isinstance(exc, Exception) else None
        if reason is None:
            raise
        raise UserError(
            f"{out}: cannot write the export ({reason}); an earlier export there, if any, is unchanged"
        ) from None


def _write_export(student, tmp: Path, default_dim: int, prompts: dict, default_prompt_name, info) -> None:
    full = int(student.target_dim)
    mode = student.mrl_mode
    dims = offered_dims(student)
    student.backbone.save_pretrained(tmp)
    student.tokenizer.save_pretrained(tmp)
    _write_json(
        tmp / "sentence_bert_config.json", {"max_seq_length": int(student.max_length), "do_lower_case": False}
    )
    _write_json(tmp / "1_Pooling" / "config.json", _pooling_config(int(student.hidden_size), student.pooling))
    heads = {full: student.projection}
    if mode == "heads":
        heads.update({int(d): student.mrl_heads[str(d)] for d in student.mrl_dims})
    for d, linear in heads.items():
        _write_dense(tmp / f"2_Dense_{d}", linear)
    dense_dim = default_dim if mode == "heads" else full
    _write_json(
        tmp / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": LEGACY_TYPES["Transformer"]},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": LEGACY_TYPES["Pooling"]},
            {"idx": 2, "name": "2", "path": f"2_Dense_{dense_dim}", "type": LEGACY_TYPES["Dense"]},
            {"idx": 3, "name": "3", "path": "3_Normalize", "type": LEGACY_TYPES["Normalize"]},
        ],
    )
    st_config: dict[str, Any] = {
        "__version__": _versions(),
        "model_type": "SentenceTransformer",
        "prompts": prompts,
        "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine",
    }
    if mode == "truncate":
        st_config["truncate_dim"] = default_dim
    _write_json(tmp / "config_sentence_transformers.json", st_config)
    _write_json(
        tmp / INFO_FILE,
        {
            "mrl_mode": mode,
            "dims": dims,
            "default_dim": default_dim,
            "full_dim": full,
            "pooling": student.pooling,
            "max_length": int(student.max_length),
            "hidden_size": int(student.hidden_size),
            "training_prompt": student.prompt,
            **(info or {}),
        },
    )
    for stray in list(tmp.rglob("*.bin")) + list(tmp.rglob("*.pt")):
        stray.unlink()  # safetensors only


# ---------------------------------------------------------------------------------------------
# Loading an export at any offered dim


@dataclass
class Layout:
    """What an exported folder offers: its output dims, prompts, pooling and length."""

    mode: str  # heads | truncate | none
    dims: list[int]  # offered dims, largest first
    default_dim: int
    full_dim: int
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    pooling: str = "mean"
    max_length: int | None = None
    source: str | None = None  # the run or checkpoint it was exported from (stella_distill.json)


def _read_object(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_layout(path: str | Path) -> Layout:
    """Read what a sentence-transformers folder offers: ours, one with several ``2_Dense_{d}`` heads
    (like the released Stella models), or any plain one (a single dim, from its Dense or Pooling)."""
    path = Path(path)
    modules_file = path / "modules.json"
    modules = read_json(modules_file)
    st_file = path / "config_sentence_transformers.json"
    st_cfg = _read_object(st_file) if st_file.is_file() else {}
    info = _read_object(path / INFO_FILE) if (path / INFO_FILE).is_file() else {}
    dense = [m for m in modules if str(m.get("type", "")).endswith("Dense")]
    pooling = [m for m in modules if str(m.get("type", "")).endswith("Pooling")]
    if dense:
        out_dim = int(_read_object(path / dense[-1]["path"] / "config.json")["out_features"])
    elif pooling:
        pool_cfg = _read_object(path / pooling[0]["path"] / "config.json")
        out_dim = int(pool_cfg.get("word_embedding_dimension") or pool_cfg.get("embedding_dimension") or 0)
    else:
        out_dim = 0
    if out_dim <= 0:
        raise UserError(f"{modules_file}: cannot tell the output dim (no Dense or Pooling module config)")
    heads = sorted(
        (int(p.name.rsplit("_", 1)[1]) for p in path.glob("2_Dense_*") if p.name.rsplit("_", 1)[1].isdigit()),
        reverse=True,
    )
    truncate_dim = st_cfg.get("truncate_dim")
    mode = info.get("mrl_mode") or ("heads" if len(heads) > 1 else "truncate" if truncate_dim else "none")
    full = int(info.get("full_dim") or (max(heads) if mode == "heads" else out_dim))
    described = {
        "prompts": st_cfg.get("prompts") or {},
        "default_prompt_name": st_cfg.get("default_prompt_name"),
        "pooling": info.get("pooling", "mean"),
        "max_length": info.get("max_length"),
        "source": info.get("source"),
    }
    if mode == "heads":
        return Layout(mode, heads, out_dim, full, **described)
    dims = sorted({int(d) for d in info.get("dims", [])} | {full}, reverse=True)
    return Layout(mode, dims, int(truncate_dim) if truncate_dim else full, full, **described)


def write_card(
    folder: str | Path,
    *,
    cfg=None,
    run_dir: str | Path | None = None,
    repo_id: str | None = None,
    source: str | None = None,
    license: str | None = None,
    model_ref: str | None = None,
) -> Path:
    """Write the model card (``README.md`` and its plots) of an export folder.

    Metrics come from ``run_dir/metrics.jsonl`` and the first ``eval.json`` found in ``folder`` or
    ``run_dir``: call it again after ``evaluate`` to put the evaluation into the card. ``model_ref``
    is what the card's snippets load (default: the Hub repo, else ``folder``).
    """
    folder = Path(folder)
    data = card.collect(
        folder,
        read_layout(folder),
        cfg=cfg,
        run_dir=Path(run_dir) if run_dir is not None else None,
        repo_id=repo_id,
        source=source,
        license=license,
        model_ref=model_ref,
    )
    try:
        return card.write_model_card(folder, data)
    except OSError as exc:
        raise UserError(f"{folder}: cannot write the model card ({write_failure(exc)})") from None


def _local_folder(path: str | Path, revision: str | None = None) -> Path:
    if Path(path).is_dir():
        return Path(path)
    if Path(path).exists() or str(path).count("/") != 1:
        raise UserError(f"{path}: not an exported model folder (and not a Hub id org/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), revision=revision))


def set_dim(model, path: str | Path, dim: int, layout: Layout | None = None):
    """Make a loaded export return ``dim``-d vectors: swap in ``2_Dense_{dim}`` (heads) or set ``truncate_dim``."""
    path = Path(path)
    layout = layout or read_layout(path)
    dim = _check_dim(dim, layout.mode, layout.dims, layout.full_dim, f"{path}")
    if layout.mode != "heads":
        model.truncate_dim = dim if layout.mode == "truncate" else None
        return model
    index = next(i for i, m in enumerate(model) if type(m).__name__ == "Dense")
    current = model[index]
    if current.out_features == dim:
        return model
    head = type(current).load(str(path / f"2_Dense_{dim}"))
    model[index] = head.to(device=current.linear.weight.device, dtype=current.linear.weight.dtype)
    return model


def load(path: str | Path, dim: int | None = None, **kwargs):
    """Load an export as a ``SentenceTransformer`` at ``dim`` (default: the folder's default dim).

    ``path`` is a folder or a Hub id. In ``heads`` mode the Dense module is the ``2_Dense_{dim}``
    head; in ``truncate`` mode ``truncate_dim=dim``. Keyword arguments go to ``SentenceTransformer``.
    A dim the folder does not offer raises ``UserError`` listing the offered dims.
    """
    from sentence_transformers import SentenceTransformer

    folder = _local_folder(path, kwargs.get("revision"))
    layout = read_layout(folder)
    if dim is not None:
        _check_dim(dim, layout.mode, layout.dims, layout.full_dim, str(path))
        if layout.mode == "truncate":
            kwargs["truncate_dim"] = int(dim)
    model = SentenceTransformer(str(folder), **kwargs)
    if dim is not None and layout.mode == "heads":
        set_dim(model, folder, dim, layout)
    return model


def verify_export(
    out: str | Path, student, texts: list[str] = PROBE_TEXTS, min_cosine: float = 0.9999
) -> dict:
    """Load ``out`` with sentence-transformers and check it reproduces ``student`` at every offered dim.

    Returns ``{dim: min cosine}``. A mismatch is a bug in the export, not a user mistake: it raises
    ``RuntimeError``.
    """
    layout = read_layout(out)
    model = load(out, dim=layout.dims[0], device="cpu")
    worst = {}
    for d in layout.dims:
        set_dim(model, out, d, layout)
        got = model.encode(
            list(texts), prompt=student.prompt or "", convert_to_tensor=True, normalize_embeddings=True
        )
        want = student.encode(list(texts), dim=d)
        worst[d] = float(torch.nn.functional.cosine_similarity(got.float().cpu(), want).min())
        if got.shape[1] != d or not worst[d] >= min_cosine:  # NaN fails too
            raise RuntimeError(
                f"{out}: the exported model does not reproduce the student at dim {d} "
                f"(shape {tuple(got.shape)}, min cosine {worst[d]:.6f})"
            )
    return worst


# ---------------------------------------------------------------------------------------------
# Hub


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload ``folder`` to the Hub model repo ``repo_id`` (created if missing) as one commit.

    The remote repo is made to mirror the folder (files it no longer has, such as a dropped head, are
    deleted in the same commit). ``token`` defaults to ``HF_TOKEN`` or the Hub login cache, which
    ``huggingface_hub`` finds by itself; it is never written anywhere. Returns the commit URL.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        raise UserError(f"{folder}: not an export folder (no modules.json); nothing to push")
    if not is_hub_id(repo_id):
        raise UserError(f"--push-to-hub: {repo_id!r} is not a Hub repo id of the form org/name")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message or f"Upload {folder.name} (stella-distill export)",
            delete_patterns=["*"],
        )
    except (
        Exception
    ) as exc:  # HTTP errors, a lost connection (httpx), a refused token: the text holds no token
        raise UserError(
            f"--push-to-hub {repo_id}: {first_line(exc)[:300]}; the export at {folder} is complete and "
            f"unchanged; push it again with `stella-distill export` and --push-to-hub {repo_id} once the Hub "
            f"is reachable"
        ) from None
    url = getattr(info, "commit_url", None) or str(info)
    logger.info(f"export: pushed {folder} to https://huggingface.co/{repo_id} ({url})")
    return url


# ---------------------------------------------------------------------------------------------
# Entry point


def export_run(
    run_dir: str | Path,
    out: str | Path,
    dim: int | None = None,
    repo_id: str | None = None,
    private: bool = False,
    *,
    verify: bool = True,
    license: str | None = None,
    push: bool = True,
    made_from: str | None = None,
) -> Path:
    """``stella-distill export``: write the sentence-transformers folder of a run (or one checkpoint).

    The default dim is ``dim`` (``--dim``), else the config's ``export.default_dim``, else the full
    dim. Prompts come from ``export.prompts``. With ``verify`` the folder is loaded back with
    sentence-transformers and must reproduce the student at every dim. ``repo_id`` (``--push-to-hub``,
    else ``export.push_to_hub``) uploads the folder; ``private`` or ``export.private`` makes a new repo
    private. ``push=False`` never uploads (a pipeline that evaluates first, rewrites the card with
    ``write_card`` and then calls ``push_to_hub`` itself); the card still names the repo.
    ``made_from`` (the pipeline's fingerprint of what the export is made from) is recorded in
    ``stella_distill.json``.
    """
    out = Path(out)
    _check_out(out)
    source = find_source(run_dir)
    cfg = source.config
    ex = cfg.export if cfg is not None else None
    student = load_student(source)
    default_dim = dim if dim is not None else (ex.default_dim if ex is not None else None)
    repo_id = repo_id or (ex.push_to_hub if ex is not None else None)
    info = {"source": source.label, "step": source.step}
    if cfg is not None:
        info["run"] = cfg.name
    if made_from is not None:
        info["made_from"] = made_from

    def card_and_check(folder: Path) -> None:  # before the folder replaces `out`: never a broken export there
        write_card(
            folder, cfg=cfg, run_dir=source.run_dir, repo_id=repo_id, source=source.label, license=license,
            model_ref=repo_id or str(out),
        )  # fmt: skip
        if verify:
            worst = verify_export(folder, student)
            checked = ", ".join(f"{d}: {c:.6f}" for d, c in worst.items())
            logger.info(
                f"export: {out} reloads with sentence-transformers (min cosine to the student per dim: {checked})"
            )

    with torch.no_grad():
        export_student(
            student,
            out,
            default_dim=default_dim,
            prompts=ex.prompts if ex is not None else None,
            default_prompt_name=ex.default_prompt_name if ex is not None else None,
            info=info,
            default_dim_field="--dim" if dim is not None else "export.default_dim",
            before_publish=card_and_check,
        )
    layout = read_layout(out)
    logger.info(
        f"export: wrote {out} from {source.label}; dims {layout.dims}, default {layout.default_dim} ({layout.mode})"
    )
    if repo_id and push:
        run_name = cfg.name if cfg is not None else Path(run_dir).name
        push_to_hub(
            out,
            repo_id,
            private=private or bool(ex is not None and ex.private),
            commit_message=f"stella-distill export of run {run_name} ({source.label})",
        )
    return out
