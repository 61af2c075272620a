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

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stella_distill.errors import UserError, write_failure  # noqa: F401 (public here too)

LEGACY_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Dense": "sentence_transformers.models.Dense",
    "Normalize": "sentence_transformers.models.Normalize",
}
ST_POOLING = {"mean": "mean", "cls": "cls", "last_token": "lasttoken"}
INFO_FILE = "stella_distill.json"
LOSS_PLOT = "loss_curve.png"
DIM_PLOT = "metrics_by_dim.png"
EVAL_FILE = "eval.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
# Sentences the export is checked on: the loaded folder must reproduce the student on them.
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Distillation transfers what a large model knows into a small one.",
    "a",
    "Rivers flow to the sea, and the sea gives back rain to the hills and the rivers again.",
]
PAPER_BIBTEX = """@misc{zhang2025jasperstelladistillationsota,
  title         = {Jasper and Stella: distillation of SOTA embedding models},
  author        = {Dun Zhang and Jiacheng Li and Ziyang Zeng and Fulong Wang},
  year          = {2025},
  eprint        = {2412.19048},
  archivePrefix = {arXiv},
  primaryClass  = {cs.IR},
  url           = {https://arxiv.org/abs/2412.19048},
}"""


# ---------------------------------------------------------------------------------------------
# Finding the weights of a run


@dataclass
class Source:
    """Where the weights to export come from."""

    run_dir: Path | None  # run folder (config.yaml, metrics.jsonl, eval.json), if known
    checkpoint: Path  # the folder that holds the weights (final/, checkpoints/<name>/ or a student folder)
    student_dir: Path | None  # a StudentModel.save_pretrained folder, or None for a sharded/plain state
    config: Any  # ExperimentConfig or None
    step: int | None  # global optimizer step of the weights
    label: str  # human-readable origin, for logs, the card and the commit message


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def _is_student(path: Path) -> bool:
    return (path / "student.json").is_file()


def _checkpoint_step(ckpt: Path) -> int:
    return int(_read_json(ckpt / STATE_FILE).get("global_step", -1))


def _newest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    found = [
        p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()
    ]
    return max(found, key=_checkpoint_step) if found else None


def _config_near(*folders: Path | None):
    from stella_distill.config import load_config

    for folder in folders:
        if folder is not None and (folder / "config.yaml").is_file():
            return load_config(folder / "config.yaml")
    return None


def find_source(path: str | Path) -> Source:
    """Resolve what ``export`` reads from ``path``.

    ``path`` may be a run folder (its ``final/student``, else the newest checkpoint by
    ``trainer_state.json`` global step: that checkpoint's ``student/``, else its accelerate state,
    sharded or not, which is consolidated), one checkpoint folder, ``final/``, or a student folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: run folder not found")
    if _is_student(path) and path.name == "student" and (path.parent / STATE_FILE).is_file():
        return find_source(path.parent)  # final/student or checkpoints/<name>/student: keep the run context
    if _is_student(path):
        return Source(
            None, path, path, _config_near(path.parent, path.parent.parent), None, f"student {path}"
        )
    if (path / "final" / "student").is_dir():
        ckpt, run_dir = path / "final", path
    elif (path / "checkpoints").is_dir():
        run_dir, ckpt = path, _newest_checkpoint(path)
        if ckpt is None:
            raise UserError(
                f"{path}: the run has no final/student and no complete checkpoint under checkpoints/"
            )
    else:
        ckpt = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        if not (run_dir / METRICS_FILE).is_file() and not (run_dir / "config.yaml").is_file():
            run_dir = None
    step = _checkpoint_step(ckpt) if (ckpt / STATE_FILE).is_file() else None
    config = _config_near(ckpt, run_dir)
    label = "final" if ckpt.name == "final" else f"checkpoint {ckpt.name}"
    if step is not None:
        label += f" (step {step})"
    if _is_student(ckpt / "student"):
        return Source(run_dir, ckpt, ckpt / "student", config, step, label)
    if find_state_files(ckpt) is None:
        raise UserError(
            f"{ckpt}: no student/ folder and no model state (model.safetensors, pytorch_model_fsdp_0/, "
            f"a DeepSpeed folder with *model_states.pt) to export"
        )
    return Source(run_dir, ckpt, None, config, step, label)


# ---------------------------------------------------------------------------------------------
# Consolidating accelerate states (plain, FSDP full / sharded, DeepSpeed ZeRO)


def find_state_files(ckpt: Path) -> tuple[str, Path] | None:
    """``(kind, path)`` of the model state an accelerate checkpoint holds, or None.

    kinds: ``safetensors`` / ``torch`` (a full state dict file: plain, DDP or FSDP FULL_STATE_DICT),
    ``dcp`` (FSDP SHARDED_STATE_DICT, torch.distributed.checkpoint folder), ``deepspeed`` (ZeRO).
    """
    for name in ("model.safetensors",):
        if (ckpt / name).is_file():
            return "safetensors", ckpt / name
    for name in ("pytorch_model.bin", "pytorch_model_fsdp.bin", "pytorch_model_fsdp_0.bin"):
        if (ckpt / name).is_file():
            return "torch", ckpt / name
    if (ckpt / ".metadata").is_file():
        return "dcp", ckpt
    for sub in sorted(ckpt.glob("pytorch_model_fsdp_*")):
        if (sub / ".metadata").is_file():
            return "dcp", sub
    for sub in sorted(p for p in ckpt.iterdir() if p.is_dir()):
        if any(sub.glob("*model_states.pt")):
            return "deepspeed", sub
    return None


def _clean_keys(state: dict) -> dict:
    # accelerate nests a DCP model state as {"model": {...}}; wrappers add prefixes to every name.
    if len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    out = {}
    for key, value in state.items():
        for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
            key = key.replace(wrapper, "")
        if key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def consolidate_state_dict(ckpt: str | Path) -> dict:
    """The full (gathered) model state dict stored in an accelerate checkpoint folder.

    FSDP ``SHARDED_STATE_DICT`` checkpoints are read with ``torch.distributed.checkpoint`` in this
    one process (no process group needed); DeepSpeed ZeRO checkpoints with deepspeed's
    ``zero_to_fp32`` (fp32 master weights), which needs ``deepspeed`` importable.
    """
    import torch

    ckpt = Path(ckpt)
    found = find_state_files(ckpt)
    if found is None:
        raise UserError(f"{ckpt}: no model state found to consolidate")
    kind, where = found
    if kind == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(where))
    elif kind == "torch":
        state = torch.load(where, map_location="cpu", weights_only=True)
    elif kind == "dcp":
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory(prefix="stella-distill-dcp-") as tmp:
            merged = Path(tmp) / "merged.pt"
            try:
                dcp_to_torch_save(str(where), str(merged))
            except Exception as exc:  # torch raises CheckpointException and friends for broken folders
                raise UserError(f"{where}: cannot read the sharded (DCP) checkpoint: {exc}") from None
            state = torch.load(merged, map_location="cpu", weights_only=True)
    else:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise UserError(
                f"{where}: a DeepSpeed ZeRO checkpoint; consolidating it needs deepspeed "
                f"(pip install deepspeed), or export a checkpoint that has a student/ folder"
            ) from None
        state = get_fp32_state_dict_from_zero_checkpoint(str(where.parent), tag=where.name)
    return _clean_keys(dict(state))


def load_student(source: Source):
    """The ``StudentModel`` of ``source``: loaded from its folder or rebuilt from config + consolidated state."""
    import torch

    from stella_distill.student import StudentModel

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
    import torch
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


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "modules.json").is_file():
        raise UserError(
            f"{out}: folder exists, is not empty and is not an earlier export; choose another --out"
        )


def _prepare_out(out: Path) -> Path:
    _check_out(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def export_student(
    student,
    out: str | Path,
    *,
    default_dim: int | None = None,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    info: dict | None = None,
    default_dim_field: str = "export.default_dim",
) -> Path:
    """Write ``student`` (a ``StudentModel``) as a sentence-transformers folder at ``out``.

    ``default_dim`` is the dim ``SentenceTransformer(out)`` returns (default: the full target dim).
    ``default_dim_field`` names where the default dim came from in errors. ``prompts`` become named prompts; a non-empty training prefix of the student (``student.prompt``)
    is added as the ``document`` prompt unless a prompt already holds it. An earlier export at
    ``out`` is replaced as a whole (written next to it, then renamed), so no stale head survives.
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

    try:
        return _write_export(student, out, default_dim, prompts, default_prompt_name, info)
    except Exception as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        shutil.rmtree(out.with_name(out.name + ".tmp"), ignore_errors=True)  # give the space back
        raise UserError(
            f"{out}: cannot write the export ({reason}); an earlier export there, if any, is unchanged"
        ) from None


def _write_export(student, out: Path, default_dim: int, prompts: dict, default_prompt_name, info) -> Path:
    full = int(student.target_dim)
    mode = student.mrl_mode
    dims = offered_dims(student)
    tmp = _prepare_out(out)
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
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# Loading an export at any offered dim


@dataclass
class Layout:
    """What an exported folder offers."""

    mode: str  # heads | truncate | none
    dims: list[int]  # offered dims, largest first
    default_dim: int
    full_dim: int


def read_layout(path: str | Path) -> Layout:
    """Read the output dims of a sentence-transformers folder: ours, one with several ``2_Dense_{d}``
    heads (like the released Stella models), or any plain one (a single dim, from its Dense or Pooling)."""
    path = Path(path)
    modules_file = path / "modules.json"
    modules = _read_json(modules_file)
    st_file = path / "config_sentence_transformers.json"
    st_cfg = _read_json(st_file) if st_file.is_file() else {}
    info = _read_json(path / INFO_FILE) if (path / INFO_FILE).is_file() else {}
    dense = [m for m in modules if str(m.get("type", "")).endswith("Dense")]
    pooling = [m for m in modules if str(m.get("type", "")).endswith("Pooling")]
    if dense:
        out_dim = int(_read_json(path / dense[-1]["path"] / "config.json")["out_features"])
    elif pooling:
        pool_cfg = _read_json(path / pooling[0]["path"] / "config.json")
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
    if mode == "heads":
        return Layout(mode, heads, out_dim, full)
    dims = sorted({int(d) for d in info.get("dims", [])} | {full}, reverse=True)
    return Layout(mode, dims, int(truncate_dim) if truncate_dim else full, full)


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
    import torch

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
        if got.shape[1] != d or worst[d] < min_cosine:
            raise RuntimeError(
                f"{out}: the exported model does not reproduce the student at dim {d} "
                f"(shape {tuple(got.shape)}, min cosine {worst[d]:.6f})"
            )
    return worst


# ---------------------------------------------------------------------------------------------
# Run records: metrics.jsonl and eval.json


def read_metrics(run_dir: str | Path | None) -> list[dict]:
    """Rows of ``run_dir/metrics.jsonl`` (a torn last line of a killed run is skipped)."""
    if run_dir is None or not (Path(run_dir) / METRICS_FILE).is_file():
        return []
    rows = []
    for line in (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def last_eval_row(rows: list[dict]) -> dict:
    """The ``eval/...`` values of the last row that has any (the end of the last evaluated stage)."""
    for row in reversed(rows):
        values = {k: v for k, v in row.items() if k.startswith("eval/")}
        if values:
            return {"step": row.get("step"), "stage": row.get("stage"), **values}
    return {}


def find_eval(*folders: Path | None) -> dict | None:
    """The first ``eval.json`` found in ``folders``."""
    for folder in folders:
        if folder is not None and (Path(folder) / EVAL_FILE).is_file():
            return _read_json(Path(folder) / EVAL_FILE)
    return None


def plot_loss_curve(rows: list[dict], path: str | Path) -> Path | None:
    """Total loss (log scale) against the global step, one colour per stage; None without loss rows."""
    # A resumed run logs some steps twice; the last record of a step wins.
    by_step = {
        r["step"]: r
        for r in rows
        if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("step"), int)
    }
    points = [by_step[s] for s in sorted(by_step)]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    stages: dict[str, list[dict]] = {}
    for r in points:
        stages.setdefault(str(r.get("stage", "")), []).append(r)
    for name, rs in stages.items():
        ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], label=name or None, linewidth=1.2)
    if all(r["loss"] > 0 for r in points):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("total loss")
    ax.set_title("training loss")
    if len(stages) > 1 or next(iter(stages)):
        ax.legend(title="stage", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_metrics_by_dim(result: dict, path: str | Path) -> Path | None:
    """One panel per metric of an ``eval.json`` result, metric against output dim; None without metrics."""
    by_dim = {int(d): m for d, m in (result.get("dims") or {}).items()}
    names = sorted({k for m in by_dim.values() for k, v in m.items() if isinstance(v, (int, float))})
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    dims = sorted(by_dim)
    for ax, name in zip(axes.flat, names):
        xs = [d for d in dims if isinstance(by_dim[d].get(name), (int, float))]
        ax.plot(xs, [by_dim[d][name] for d in xs], marker="o")
        if len(xs) > 1 and min(xs) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(d) for d in xs])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("dim")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Model card


def _is_hub_id(name: str | None) -> bool:
    if not name or Path(name).exists() or name.count("/") != 1 or Path(name).suffix:
        return False
    return all(part and not part.startswith(".") for part in name.split("/"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return "" if value is None else str(value)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def _yaml_header(cfg, license: str | None) -> str:
    import yaml

    meta: dict[str, Any] = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": [
            "sentence-transformers",
            "sentence-similarity",
            "feature-extraction",
            "embeddings",
            "distillation",
            "matryoshka",
            "stella-distill",
        ],
    }
    if cfg is not None and cfg.student is not None and _is_hub_id(cfg.student.model):
        meta["base_model"] = cfg.student.model
    datasets = [s.path for s in cfg.data.train if _is_hub_id(s.path)] if cfg is not None else []
    if datasets:
        meta["datasets"] = datasets
    if license:
        meta["license"] = license
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _stages_table(cfg, rows: list[dict]) -> list[str]:
    world = next((r["world_size"] for r in reversed(rows) if isinstance(r.get("world_size"), int)), None)
    last_step: dict[int, int] = {}
    last_loss: dict[int, float] = {}
    for r in rows:
        i = r.get("stage_index")
        if isinstance(i, int) and isinstance(r.get("step"), int):
            last_step[i] = max(last_step.get(i, 0), r["step"])
            if isinstance(r.get("loss"), (int, float)):
                last_loss[i] = r["loss"]
    lines = [
        "| stage | trainable | steps | lr | batch | loss weights (cos / sim / rel) | MRL heads (sim / rel) "
        "| last logged step | last loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(cfg.stages):
        trainable = f"last {s.last_layers} layers + head" if s.trainable == "last_layers" else s.trainable
        steps = str(s.steps) if s.steps is not None else f"{s.epochs} epochs"
        batch = f"{s.batch_size}" + (f" x {s.grad_accumulation} accum" if s.grad_accumulation > 1 else "")
        if world:
            batch += f" x {world} proc = {s.batch_size * s.grad_accumulation * world}"
        w = s.loss_weights
        mrl = (
            f"{s.mrl_loss_weights.similarity:g} / {s.mrl_loss_weights.relative_similarity:g}"
            if s.mrl
            else "-"
        )
        lines.append(
            f"| {s.name} | {trainable} | {steps} | {s.lr:g} | {batch} | "
            f"{w.cosine:g} / {w.similarity:g} / {w.relative_similarity:g} | {mrl} | "
            f"{last_step.get(i, '')} | {_fmt(last_loss.get(i))} |"
        )
    return lines


def _eval_table(result: dict) -> list[str]:
    by_dim = {int(d): m for d, m in (result.get("dims") or {}).items()}
    names = sorted({k for m in by_dim.values() for k in m})
    if not names:
        return []
    lines = ["| dim | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for d in sorted(by_dim, reverse=True):
        lines.append(f"| {d} | " + " | ".join(_fmt(by_dim[d].get(n)) for n in names) + " |")
    return lines


def _pooling_snippet(pooling: str) -> list[str]:
    if pooling == "mean":
        return [
            "mask = batch['attention_mask'].unsqueeze(-1).to(hidden.dtype)",
            "pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling",
        ]
    if pooling == "cls":
        return ["pooled = hidden[:, 0]  # CLS pooling"]
    return [
        "positions = torch.arange(batch['attention_mask'].shape[1])",
        "last = (batch['attention_mask'] * positions).argmax(1)  # last real token, any padding side",
        "pooled = hidden[torch.arange(hidden.shape[0]), last]  # last-token pooling",
    ]


def render_model_card(
    folder: str | Path,
    *,
    cfg=None,
    rows: list[dict] | None = None,
    eval_result: dict | None = None,
    repo_id: str | None = None,
    source: str | None = None,
    license: str | None = None,
    plots: tuple[str, ...] = (),
) -> str:
    """The README.md text of an export (see ``write_model_card``)."""
    folder = Path(folder)
    layout = read_layout(folder)
    info = _read_json(folder / INFO_FILE) if (folder / INFO_FILE).is_file() else {}
    st_cfg = _read_json(folder / "config_sentence_transformers.json")
    prompts: dict[str, str] = st_cfg.get("prompts") or {}
    rows = rows or []
    name = repo_id or (cfg.name if cfg is not None else folder.name)
    model_ref = repo_id or str(folder)
    pooling = info.get("pooling", "mean")
    max_length = info.get("max_length")
    other = [d for d in layout.dims if d != layout.default_dim]
    path_line = f'path = snapshot_download("{repo_id}")' if repo_id else f"path = {str(folder)!r}"

    out = [_yaml_header(cfg, license), f"# {name}", ""]
    summary = (
        "A text-embedding model distilled with stella-distill, which implements the Jasper/Stella recipe "
        "([arXiv:2412.19048](https://arxiv.org/abs/2412.19048)): the student's pooled vectors are projected "
        "to the teachers' concatenated target space and trained with cosine, similarity and "
        "relative-similarity losses, stage by stage."
    )
    out += [summary, ""]
    facts = [
        (
            "base model (student backbone)",
            f"`{cfg.student.model}`" if cfg is not None and cfg.student else "-",
        ),
        ("pooling", pooling),
        ("output dims", ", ".join(map(str, layout.dims)) + f" (default {layout.default_dim})"),
        ("Matryoshka mode", layout.mode),
        ("max sequence length", str(max_length) if max_length else "-"),
        ("similarity", "cosine"),
    ]
    if cfg is not None and cfg.student is not None and cfg.student.keep_layers:
        facts.append(("kept backbone layers", ", ".join(map(str, cfg.student.keep_layers))))
    if source:
        facts.append(("exported from", source))
    out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts] + [""]

    if cfg is not None:
        out += [
            "## Teachers",
            "",
            "| name | model | pooling | prompt | max length |",
            "|---|---|---|---|---|",
        ]
        for t in cfg.teachers:
            prompt = f"`{_md_escape(t.prompt)}`" if t.prompt else "(none)"
            out.append(
                f"| {t.name} | `{t.model}`{f' @ {t.revision}' if t.revision else ''} | {t.pooling}"
                f"{f' + `{t.dense}`' if t.dense else ''} | {prompt} | "
                f"{cfg.teacher_max_length(t)} |"
            )
        out += [
            "",
            "Target = concatenation of the L2-normalised teacher vectors, normalised again.",
            "",
            "## Training data",
            "",
        ]
        for s in cfg.data.train:
            extra = f" (split {s.split}{f', subset {s.subset}' if s.subset else ''}, field `{s.text_field}`"
            extra += f", first {s.limit})" if s.limit else ")"
            out.append(f"- `{s.path}`{extra}")
        if cfg.data.limit:
            out.append(f"- at most {cfg.data.limit} texts in all")
        out += ["", "## Training stages", ""] + _stages_table(cfg, rows) + [""]

    out += ["## Results", ""]
    if eval_result:
        table = _eval_table(eval_result)
        if table:
            out += (
                ["Evaluation of this folder (`stella-distill evaluate`), per output dim:", ""] + table + [""]
            )
    final = last_eval_row(rows)
    if final:
        out += [
            f"Teacher fidelity on held-out corpus rows at the end of training (stage {final.get('stage')}, "
            f"step {final.get('step')}):",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        out += [f"| {k} | {_fmt(v)} |" for k, v in final.items() if k.startswith("eval/")] + [""]
    if not eval_result and not final:
        out += ["No evaluation was recorded for this export.", ""]
    for plot in plots:
        title = "training loss" if plot == LOSS_PLOT else "metrics by output dim"
        out += [f"![{title}]({plot})", ""]

    first_prompt = next(iter(prompts), None)
    out += [
        "## Usage",
        "",
        "### sentence-transformers",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
    ]
    out += [f'model = SentenceTransformer("{model_ref}")']
    if first_prompt:
        out += [
            f'queries = model.encode(["What is distillation?"], prompt_name="{first_prompt}")',
            'documents = model.encode(["Distillation trains a small model to imitate a large one."])',
            "print(model.similarity(queries, documents))",
        ]
    else:
        out += [
            'embeddings = model.encode(["What is distillation?", "A small model imitates a large one."])',
            "print(model.similarity(embeddings, embeddings))",
        ]
    out += ["```", ""]
    if prompts:
        out += ["Prompts (`prompt_name=`):", ""]
        out += [f"- `{k}`: `{_md_escape(v)}`" for k, v in prompts.items()]
        if st_cfg.get("default_prompt_name"):
            out.append(f"- default prompt: `{st_cfg['default_prompt_name']}`")
        out.append("")
    if other:
        d = other[0]
        out += [
            f"### Another output dim ({', '.join(map(str, other))})",
            "",
            "```python",
            "import stella_distill",
            "",
        ]
        out += [f'model = stella_distill.load("{model_ref}", dim={d})', "```", ""]
        if layout.mode == "truncate":
            out += [
                "Every prefix of the full vector is an embedding (Matryoshka truncation):",
                "",
                "```python",
                f'model = SentenceTransformer("{model_ref}", truncate_dim={d})',
                "```",
                "",
            ]
        else:
            out += [
                f"Each dim has its own head (`2_Dense_{{dim}}`); `modules.json` selects {layout.default_dim}. "
                "With sentence-transformers alone, swap the head in:",
                "",
                "```python",
                *(["from huggingface_hub import snapshot_download"] if repo_id else []),
                "from sentence_transformers import SentenceTransformer",
                "from sentence_transformers.models import Dense",
                "",
                path_line,
                "model = SentenceTransformer(path)",
                f'model[2] = Dense.load(f"{{path}}/2_Dense_{d}")',
                "```",
                "",
            ]
    d = layout.default_dim
    dense_dir = f"2_Dense_{d}" if layout.mode == "heads" else f"2_Dense_{layout.full_dim}"
    out += ["### transformers only", "", "```python", "import torch", "import torch.nn.functional as F"]
    out += ["from huggingface_hub import snapshot_download"] if repo_id else []
    out += ["from safetensors.torch import load_file"]
    out += ["from transformers import AutoModel, AutoTokenizer", ""]
    out += [path_line]
    out += [
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModel.from_pretrained(path).eval()",
    ]
    out += [f'dense = load_file(f"{{path}}/{dense_dir}/model.safetensors")', ""]
    out += ['texts = ["What is distillation?", "A small model imitates a large one."]']
    out += [
        f"batch = tokenizer(texts, padding=True, truncation=True, max_length={max_length or 512}, return_tensors='pt')",
        "with torch.no_grad():",
        "    hidden = model(**batch).last_hidden_state",
    ]
    out += _pooling_snippet(pooling)
    out += ["embeddings = pooled @ dense['linear.weight'].T + dense['linear.bias']"]
    if layout.mode == "truncate" and d != layout.full_dim:
        out += [f"embeddings = embeddings[:, :{d}]  # Matryoshka prefix"]
    out += ["embeddings = F.normalize(embeddings, dim=-1)", "```", ""]
    out += ["## Citation", "", "```bibtex", PAPER_BIBTEX, "```", ""]
    return "\n".join(out)


def write_model_card(
    folder: str | Path,
    *,
    cfg=None,
    run_dir: str | Path | None = None,
    repo_id: str | None = None,
    source: str | None = None,
    license: str | None = None,
) -> Path:
    """Write ``README.md``, ``loss_curve.png`` and ``metrics_by_dim.png`` into an export folder.

    Metrics come from ``run_dir/metrics.jsonl`` (loss curve, last ``eval/...`` row) and from the first
    ``eval.json`` found in ``folder`` or ``run_dir``. Call it again after ``evaluate`` to put the
    evaluation into the card.
    """
    folder = Path(folder)
    run_dir = Path(run_dir) if run_dir is not None else None
    if source is None and (folder / INFO_FILE).is_file():
        source = _read_json(folder / INFO_FILE).get("source")
    rows = read_metrics(run_dir)
    eval_result = find_eval(folder, run_dir)
    plots = []
    if plot_loss_curve(rows, folder / LOSS_PLOT):
        plots.append(LOSS_PLOT)
    if eval_result and plot_metrics_by_dim(eval_result, folder / DIM_PLOT):
        plots.append(DIM_PLOT)
    text = render_model_card(
        folder,
        cfg=cfg,
        rows=rows,
        eval_result=eval_result,
        repo_id=repo_id,
        source=source,
        license=license,
        plots=tuple(plots),
    )
    (folder / "README.md").write_text(text, encoding="utf-8")
    return folder / "README.md"


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
    if not _is_hub_id(repo_id):
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
    except OSError as exc:  # HTTP errors of huggingface_hub subclass OSError; their text holds no token
        raise UserError(
            f"--push-to-hub {repo_id}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from None
    url = getattr(info, "commit_url", None) or str(info)
    print(f"export: pushed {folder} to https://huggingface.co/{repo_id} ({url})")
    return url


_push = push_to_hub  # export_run's keyword argument of the same name shadows the function


# ---------------------------------------------------------------------------------------------
# Entry point


def export_run(
    run_dir: str | Path,
    out: str | Path,
    dim: int | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    *,
    verify: bool = True,
    license: str | None = None,
    push: bool = True,
) -> Path:
    """``stella-distill export``: write the sentence-transformers folder of a run (or one checkpoint).

    The default dim is ``dim`` (``--dim``), else the config's ``export.default_dim``, else the full
    dim. Prompts come from ``export.prompts``. With ``verify`` the folder is loaded back with
    sentence-transformers and must reproduce the student at every dim. ``push_to_hub`` (else
    ``export.push_to_hub``) uploads the folder; ``private`` or ``export.private`` makes a new repo private.
    ``push=False`` never uploads (a pipeline that evaluates first, rewrites the card with
    ``write_model_card`` and then calls ``push_to_hub`` itself); the card still names the repo.
    """
    import torch

    _check_out(Path(out))
    source = find_source(run_dir)
    cfg = source.config
    ex = cfg.export if cfg is not None else None
    student = load_student(source)
    default_dim = dim if dim is not None else (ex.default_dim if ex is not None else None)
    repo_id = push_to_hub or (ex.push_to_hub if ex is not None else None)
    info = {"source": source.label, "step": source.step}
    if cfg is not None:
        info["run"] = cfg.name
    with torch.no_grad():
        out = export_student(
            student,
            out,
            default_dim=default_dim,
            prompts=ex.prompts if ex is not None else None,
            default_prompt_name=ex.default_prompt_name if ex is not None else None,
            info=info,
            default_dim_field="--dim" if dim is not None else "export.default_dim",
        )
    try:
        write_model_card(
            out, cfg=cfg, run_dir=source.run_dir, repo_id=repo_id, source=source.label, license=license
        )
    except OSError as exc:
        raise UserError(f"{out}: cannot write the model card ({write_failure(exc)})") from None
    if verify:
        worst = verify_export(out, student)
        checked = ", ".join(f"{d}: {c:.6f}" for d, c in worst.items())
        print(
            f"export: {out} reloads with sentence-transformers (min cosine to the student per dim: {checked})"
        )
    layout = read_layout(out)
    print(
        f"export: wrote {out} from {source.label}; dims {layout.dims}, default {layout.default_dim} ({layout.mode})"
    )
    if repo_id and push:
        run_name = cfg.name if cfg is not None else Path(run_dir).name
        _push(
            out,
            repo_id,
            private=private or bool(ex is not None and ex.private),
            commit_message=f"stella-distill export of run {run_name} ({source.label})",
        )
    return out
