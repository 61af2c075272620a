"""What an exported sentence-transformers folder offers, and loading it at any of its dims.

An export of ours holds one ``2_Dense_{d}`` head per offered dim (``heads`` mode) or one full head
whose prefixes are embeddings (``truncate`` mode), and, unless written with ``export.layout: single``,
``dims/{d}/``: one self-contained sentence-transformers folder per offered dim (backbone files shared
by hard link), which any tool that loads such folders serves at that dim without knowing our format.
``read_layout`` also reads plain sentence-transformers folders (one dim) and released multi-head
folders such as Stella's. Nothing here writes; ``export`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stella_distill.errors import UserError
from stella_distill.tables import read_json

INFO_FILE = "stella_distill.json"
DIMS_FOLDER = "dims"  # dims/{d}/: one plain sentence-transformers folder per offered dim


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
    dim_folders: dict[int, str] = field(default_factory=dict)  # dim -> "dims/{d}" (relative), if written
    trust_remote_code: bool = False  # the backbone runs its own code (the run's config trusted it)


def dim_folder(root: str | Path, dim: int) -> Path:
    """The self-contained folder of ``dim`` inside the export ``root``."""
    return Path(root) / DIMS_FOLDER / str(int(dim))


def read_object(path: Path) -> dict:
    """A JSON file that must hold an object; ``UserError`` naming the file otherwise."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_info(path: str | Path) -> dict:
    """The ``stella_distill.json`` of a folder (``{}`` for a folder we did not export)."""
    info_file = Path(path) / INFO_FILE
    return read_object(info_file) if info_file.is_file() else {}


def is_export_root(path: str | Path) -> bool:
    """Whether ``path`` is the root of an export of ours (its ``stella_distill.json`` lists its files);
    only those get their card and results rewritten."""
    return isinstance(read_info(path).get("files"), list)


def check_dim(dim: int, mode: str, dims: list[int], full: int, where: str) -> int:
    """``dim`` when the folder offers it (any prefix 1..full in truncate mode); ``UserError`` otherwise."""
    dim = int(dim)
    if mode == "truncate" and 1 <= dim <= full:
        return dim
    if dim in dims:
        return dim
    extra = f" (truncate mode: any prefix 1..{full})" if mode == "truncate" else ""
    raise UserError(f"{where}: dim {dim} is not offered; offered dims: {', '.join(map(str, dims))}{extra}")


def read_layout(path: str | Path) -> Layout:
    """Read what a sentence-transformers folder offers: ours, one with several ``2_Dense_{d}`` heads
    (like the released Stella models), or any plain one (a single dim, from its Dense or Pooling)."""
    path = Path(path)
    modules_file = path / "modules.json"
    modules = read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UserError(
            f"{modules_file}: expected a list of module objects (sentence-transformers' modules.json)"
        )
    st_file = path / "config_sentence_transformers.json"
    st_cfg = read_object(st_file) if st_file.is_file() else {}
    info = read_info(path)
    dense = [m for m in modules if str(m.get("type", "")).endswith("Dense")]
    pooling = [m for m in modules if str(m.get("type", "")).endswith("Pooling")]
    if dense:
        out_dim = read_object(path / str(dense[-1].get("path", "")) / "config.json").get("out_features")
    elif pooling:
        pool_cfg = read_object(path / str(pooling[0].get("path", "")) / "config.json")
        out_dim = pool_cfg.get("word_embedding_dimension") or pool_cfg.get("embedding_dimension")
    else:
        out_dim = 0
    out_dim = out_dim if isinstance(out_dim, int) and not isinstance(out_dim, bool) else 0
    if out_dim <= 0:
        raise UserError(f"{modules_file}: cannot tell the output dim (no Dense or Pooling module config)")
    heads = sorted(
        (int(p.name.rsplit("_", 1)[1]) for p in path.glob("2_Dense_*") if p.name.rsplit("_", 1)[1].isdigit()),
        reverse=True,
    )
    truncate_dim = st_cfg.get("truncate_dim")
    mode = info.get("mrl_mode") or ("heads" if len(heads) > 1 else "truncate" if truncate_dim else "none")
    full = int(info.get("full_dim") or (max(heads) if mode == "heads" else out_dim))
    folders = {}
    if (path / DIMS_FOLDER).is_dir():
        for sub in (path / DIMS_FOLDER).iterdir():
            if sub.name.isdigit() and (sub / "modules.json").is_file():
                folders[int(sub.name)] = f"{DIMS_FOLDER}/{sub.name}"
    described = {
        "prompts": st_cfg.get("prompts") or {},
        "default_prompt_name": st_cfg.get("default_prompt_name"),
        "pooling": info.get("pooling", "mean"),
        "max_length": info.get("max_length"),
        "source": info.get("source"),
        "trust_remote_code": info.get("trust_remote_code") is True,
        "dim_folders": dict(sorted(folders.items(), reverse=True)),
    }
    if mode == "heads":
        return Layout(mode, heads, out_dim, full, **described)
    dims = sorted({int(d) for d in info.get("dims", [])} | {full}, reverse=True)
    return Layout(mode, dims, int(truncate_dim) if truncate_dim else full, full, **described)


def local_folder(path: str | Path, revision: str | None = None) -> Path:
    """``path`` itself when it is a folder, else the local snapshot of the Hub repo ``path``."""
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
    dim = check_dim(dim, layout.mode, layout.dims, layout.full_dim, f"{path}")
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

    folder = local_folder(path, kwargs.get("revision"))
    layout = read_layout(folder)
    if layout.trust_remote_code:  # an export of a student whose config trusted its backbone's code
        kwargs.setdefault("trust_remote_code", True)
    if dim is not None:
        check_dim(dim, layout.mode, layout.dims, layout.full_dim, str(path))
        if layout.mode == "truncate":
            kwargs["truncate_dim"] = int(dim)
    model = SentenceTransformer(str(folder), **kwargs)
    if dim is not None and layout.mode == "heads":
        set_dim(model, folder, dim, layout)
    return model


def dim_revision(dim: int, revision: str | None = None) -> str:
    """The Hub branch that holds ``dims/{dim}`` when the export's root goes to ``revision`` (None: main)."""
    return f"dim-{int(dim)}" if revision in (None, "main") else f"{revision}-dim-{int(dim)}"
