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
    stella_distill.json                MRL mode, offered dims, provenance, the card's facts (not needed to load)
    dims/{d}/                          export.layout per-dim: a complete folder per offered dim (see layout.py)

``modules.json`` uses the legacy ``sentence_transformers.models.*`` type strings and the module configs
use their legacy keys, which serving stacks (TEI, vLLM) parse. The MRL part of the student maps to:
``heads``: one ``2_Dense_{d}`` per offered dim (the full target dim included), ``modules.json`` naming
the default, like the released Stella models; ``truncate``: one ``2_Dense_{full}`` and ``truncate_dim``
(the default dim), every prefix an embedding; ``none``: one ``2_Dense_{full}``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stella_distill import card
from stella_distill.errors import UserError, write_failure
from stella_distill.files import open_as_umask, replace_folder
from stella_distill.layout import INFO_FILE, check_dim, dim_folder, is_export_root, load, read_layout, set_dim
from stella_distill.logs import get_logger
from stella_distill.model_files import POOLING_FLAGS, POOLING_TO_ST
from stella_distill.push import check_target, push_folder
from stella_distill.run import Source, consolidate_state_dict, find_source, read_metrics
from stella_distill.student import StudentModel, nonfinite_tensors
from stella_distill.tables import read_json

logger = get_logger(__name__)
LEGACY_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Dense": "sentence_transformers.models.Dense",
    "Normalize": "sentence_transformers.models.Normalize",
}
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


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_dense(folder: Path, linear, rows: int | None = None) -> None:
    """A sentence-transformers Dense module of ``linear`` (its first ``rows`` outputs, if given)."""
    from safetensors.torch import save_file

    weight = linear.weight.detach().float().cpu()[:rows].contiguous()
    bias = linear.bias.detach().float().cpu()[:rows].contiguous()
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
    mode = POOLING_TO_ST[pooling]
    return {
        "word_embedding_dimension": hidden,
        **{flag: mode == st_mode for flag, st_mode in POOLING_FLAGS.items()},
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
    open_as_umask(tmp)  # mkdtemp and safetensors make private files; an export is read by servers too
    _check_out(out)  # again: the folder may have changed while the export was written
    former = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)] + OLD_SUFFIX)
    replace_folder(tmp, out, former)
    shutil.rmtree(former, ignore_errors=True)
    return out


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
    layout: str = "per-dim",
) -> Path:
    """Write ``student`` (a ``StudentModel``) as a sentence-transformers folder at ``out``.

    ``default_dim`` is the dim ``SentenceTransformer(out)`` returns (default: the full target dim).
    ``default_dim_field`` names where the default dim came from in errors. ``prompts`` become named
    prompts; a non-empty training prefix of the student (``student.prompt``) is added as the
    ``document`` prompt unless a prompt already holds it. ``layout="per-dim"`` also writes
    ``dims/{d}/``, one self-contained folder per offered dim (when there is more than one).

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
    default_dim = full if default_dim is None else check_dim(default_dim, mode, dims, full, default_dim_field)
    prompts = dict(prompts or {})
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise UserError(f"export.default_prompt_name: {default_prompt_name!r} is not one of export.prompts")
    if student.prompt and student.prompt not in prompts.values():
        prompts.setdefault("document", student.prompt)

    bad = nonfinite_tensors(student)
    if bad:
        raise UserError(
            f"{out}: the student's weights hold NaN/inf ({len(bad)} tensors: {', '.join(bad[:3])}); the run "
            f"diverged and is not exported; export an earlier checkpoint (checkpoints/step-*) instead"
        )
    tmp = None
    try:
        tmp = _prepare_out(out)
        _write_export(student, tmp, default_dim, prompts, default_prompt_name, info, layout)
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


def _modules(dense_dir: str) -> list[dict]:
    return [
        {"idx": 0, "name": "0", "path": "", "type": LEGACY_TYPES["Transformer"]},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": LEGACY_TYPES["Pooling"]},
        {"idx": 2, "name": "2", "path": dense_dir, "type": LEGACY_TYPES["Dense"]},
        {"idx": 3, "name": "3", "path": "3_Normalize", "type": LEGACY_TYPES["Normalize"]},
    ]


def _write_export(
    student, tmp: Path, default_dim: int, prompts: dict, default_prompt_name, info, layout: str = "per-dim"
) -> None:
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
    _write_json(tmp / "modules.json", _modules(f"2_Dense_{default_dim if mode == 'heads' else full}"))
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
    described = {
        "pooling": student.pooling,
        "max_length": int(student.max_length),
        "hidden_size": int(student.hidden_size),
        "training_prompt": student.prompt,
        "trust_remote_code": student.trusts_remote_code,
    }
    for stray in list(tmp.rglob("*.bin")) + list(tmp.rglob("*.pt")):
        stray.unlink()  # safetensors only
    if layout == "per-dim" and len(dims) > 1:
        whole = {"mode": mode, "dims": dims, "default_dim": default_dim}
        for d in dims:
            _write_dim_folder(
                student, tmp, d, st_config, {**described, "dim_folder_of": whole, **(info or {})}
            )
    _write_json(
        tmp / INFO_FILE,
        {
            "mrl_mode": mode,
            "dims": dims,
            "default_dim": default_dim,
            "full_dim": full,
            **described,
            **(info or {}),
        },
    )


# Files of the export's root that a dims/{d} folder has its own version of; all others it shares.
OWN_FILES = ("modules.json", "config_sentence_transformers.json", INFO_FILE)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: a copy costs space, not correctness
        shutil.copy2(src, dst)


def _write_dim_folder(student, root: Path, dim: int, st_config: dict, info: dict) -> None:
    """``dims/{dim}/``: Transformer -> Pooling -> Dense(``dim``) -> Normalize, hard links to the root's
    files but its own configs: any loader gets ``dim``-d vectors with nothing to set. The Dense is the
    dim's own head (heads mode) or the first ``dim`` rows of the full one (truncate: the prefix)."""
    sub = dim_folder(root, dim)
    for f in root.iterdir():
        if f.is_file() and f.name not in OWN_FILES:
            _link(f, sub / f.name)
    _link(root / "1_Pooling" / "config.json", sub / "1_Pooling" / "config.json")
    dense = f"2_Dense_{dim}"
    if (root / dense).is_dir():
        for f in (root / dense).iterdir():
            _link(f, sub / dense / f.name)
    else:
        _write_dense(sub / dense, student.projection, rows=dim)
    _write_json(sub / "modules.json", _modules(dense))
    _write_json(
        sub / "config_sentence_transformers.json", {k: v for k, v in st_config.items() if k != "truncate_dim"}
    )
    _write_json(
        sub / INFO_FILE, {"mrl_mode": "none", "dims": [dim], "default_dim": dim, "full_dim": dim, **info}
    )


def write_card(
    folder: str | Path,
    *,
    cfg=None,
    run_dir: str | Path | None = None,
    source: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    model_ref: str | None = None,
) -> Path:
    """Write the model card (``README.md``, plots) of an export folder and of its ``dims/{d}``.

    With ``cfg``/``run_dir`` (at export) the card's facts are collected from the run and kept in the
    folder's ``stella_distill.json``; later calls (``evaluate``, ``push``) rewrite it from the folder
    alone. ``repo_id``/``revision`` name the Hub repo and branch its snippets load; ``model_ref`` what
    they load otherwise (default: ``folder``)."""
    folder = Path(folder)
    rows = None
    if cfg is not None or run_dir is not None:
        rows = read_metrics(run_dir)
        facts = card.collect_facts(cfg, Path(run_dir) if run_dir is not None else None, rows, source, license)
    else:
        facts = card.load_facts(folder)
    if repo_id is not None:
        facts.update(repo_id=repo_id, revision=revision)
    try:
        if (folder / INFO_FILE).is_file():  # ours: the facts stay with the folder
            card.save_facts(folder, facts)
        data = card.card_data(folder, read_layout(folder), facts, model_ref=model_ref)
        return card.write_model_card(folder, data, rows)
    except OSError as exc:
        raise UserError(f"{folder}: cannot write the model card ({write_failure(exc)})") from None


def push_export(
    folder: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    create_pr: bool = False,
    private: bool = False,
    commit_message: str | None = None,
    what: str = "--repo",
) -> list[str]:
    """``stella-distill push``: send an export folder to the Hub as it is, its card first made to name
    the repo and branches (an export of ours), every ``dims/{d}`` to a branch of its own
    (``push.push_folder``). Returns the commit or pull-request URLs."""
    check_target(repo_id, revision, what)
    folder = Path(folder)
    if (folder / "modules.json").is_file() and is_export_root(folder):
        write_card(folder, repo_id=repo_id, revision=revision)
    return push_folder(
        folder, repo_id, revision=revision, create_pr=create_pr, private=private,
        commit_message=commit_message, what=what,
    )  # fmt: skip


def verify_export(
    out: str | Path, student, texts: list[str] = PROBE_TEXTS, min_cosine: float = 0.9999
) -> dict:
    """Load ``out`` with sentence-transformers and check it reproduces ``student`` at every offered dim.

    Each ``dims/{d}`` folder is loaded on its own too. Returns ``{dim: min cosine}``. A mismatch is a bug in the export, not a user mistake: it raises
    ``RuntimeError``.
    """
    from sentence_transformers import SentenceTransformer

    layout = read_layout(out)
    texts = list(texts)
    want = {d: student.encode(texts, dim=d) for d in layout.dims}  # the student once per dim

    def check(got: torch.Tensor, d: int, where: str, what: str) -> float:
        cosine = float(torch.nn.functional.cosine_similarity(got.float().cpu(), want[d]).min())
        if got.shape[1] != d or not cosine >= min_cosine:  # NaN fails too
            raise RuntimeError(
                f"{where}: {what} does not reproduce the student at dim {d} "
                f"(shape {tuple(got.shape)}, min cosine {cosine:.6f})"
            )
        return cosine

    model = load(out, dim=layout.dims[0], device="cpu")
    worst = {}
    for d in layout.dims:
        set_dim(model, out, d, layout)
        got = model.encode(
            texts, prompt=student.prompt or "", convert_to_tensor=True, normalize_embeddings=True
        )
        worst[d] = check(got, d, str(out), "the exported model")
    code = {"trust_remote_code": True} if layout.trust_remote_code else {}  # the backbone's own code
    for d, sub in layout.dim_folders.items():  # loaded as any tool would: nothing set but the folder
        got = SentenceTransformer(str(Path(out) / sub), device="cpu", **code).encode(
            texts, prompt=student.prompt or "", convert_to_tensor=True
        )
        worst[d] = min(worst[d], check(got, d, f"{out}/{sub}", "the folder"))
    return worst


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
    layout: str | None = None,
    made_from: str | None = None,
    config=None,
) -> Path:
    """``stella-distill export``: write the sentence-transformers folder of a run (or one checkpoint).

    The default dim is ``dim`` (``--dim``), else the config's ``export.default_dim``, else the full
    dim. Prompts come from ``export.prompts``; ``layout`` (``--layout``, else ``export.layout``)
    ``per-dim`` adds ``dims/{d}``. With ``verify`` the folder is loaded back with sentence-transformers
    and must reproduce the student at every dim, before it replaces ``out``. ``repo_id``
    (``--push-to-hub``, else ``export.push_to_hub``) uploads the folder (``push_export``); ``private``
    or ``export.private`` makes a new repo private. ``push=False`` never uploads (a pipeline that
    evaluates first, then calls ``push_export``); the card still names the repo. ``made_from`` (the
    pipeline's fingerprint of what the export is made from) is recorded in ``stella_distill.json``.
    ``config`` (an ``ExperimentConfig``) replaces the run's saved ``config.yaml`` for the export and card
    settings: ``run`` passes the config it was given, whose ``export.*`` may have changed since training.
    """
    out = Path(out)
    _check_out(out)
    source = find_source(run_dir)
    cfg = config if config is not None else source.config
    ex = cfg.export if cfg is not None else None
    repo_id = repo_id or (ex.push_to_hub if ex is not None else None)
    if repo_id:
        check_target(repo_id, None, "--push-to-hub")
    student = load_student(source)
    default_dim = dim if dim is not None else (ex.default_dim if ex is not None else None)
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
            layout=layout or (ex.layout if ex is not None else "per-dim"),
        )
    written = read_layout(out)
    per_dim = f"; one folder per dim in {out}/dims" if written.dim_folders else ""
    logger.info(
        f"export: wrote {out} from {source.label}; dims {written.dims}, default {written.default_dim} "
        f"({written.mode}){per_dim}"
    )
    if repo_id and push:
        run_name = cfg.name if cfg is not None else Path(run_dir).name
        push_export(
            out,
            repo_id,
            private=private or bool(ex is not None and ex.private),
            commit_message=f"stella-distill export of run {run_name} ({source.label})",
            what="--push-to-hub",
        )
    return out
