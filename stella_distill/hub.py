"""Telling a local path from a Hugging Face Hub id, and what the Hub's offline switch means for errors."""

from __future__ import annotations

import os
from pathlib import Path

from stella_distill.tables import is_data_file


def looks_local(name: str) -> bool:
    """A name that cannot be a Hub id (``org/name`` or ``name``): absolute, relative or home paths,
    deeper paths, Windows paths, and data file names (``corpus.jsonl``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or is_data_file(name)


def is_hub_id(name: str | None) -> bool:
    """A name that is a Hub repository id ``org/name`` and no local path."""
    if not name or Path(name).exists() or name.count("/") != 1 or Path(name).suffix:
        return False
    return all(part and not part.startswith(".") for part in name.split("/"))


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` switches the Hub off."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def offline_hint() -> str:
    """What to add to a load error when the Hub is switched off."""
    if not offline():
        return ""
    return " (HF_HUB_OFFLINE is set: only local folders and the local Hub cache are used)"


def dense_location(model: str, dense: str) -> tuple[str, str]:
    """Where the Dense module ``dense`` of ``model`` lives: ``(name_or_path, subfolder)``.

    A ``dense`` that starts with ``/``, ``.`` or ``~`` is a folder of its own; anything else is a
    subfolder of the model (a local folder or a Hub repository, as in ``2_Dense_8192``).
    """
    if dense.startswith(("/", ".", "~")):
        return str(Path(dense).expanduser()), ""
    return model, dense.strip("/")


def resolve_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit ``revision`` (None: main) of the Hub model ``repo_id`` is now: from the local Hugging
    Face cache when it holds that revision, else from the Hub (unless offline); None when neither can tell."""
    if looks_local(repo_id):
        return None
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
        return Path(folder).name
    except (OSError, ValueError, HFValidationError):  # not in the cache (LocalEntryNotFoundError), a bad id
        pass
    if offline():
        return None
    try:
        return huggingface_hub.HfApi().model_info(repo_id, revision=revision, timeout=10).sha
    except Exception:  # unreachable, unknown repo, no permission: nothing can tell
        return None
