"""Send an export to the Hugging Face Hub as it is now: its root to one branch, each dim to its own.

The export's root (card included, ``dims/`` left out) goes to ``revision`` (the repo's main branch by
default) and each ``dims/{d}`` to the branch ``dim-{d}`` (``{revision}-dim-{d}`` for another
revision), created when missing. So ``SentenceTransformer(repo)`` gives the default dim and
``SentenceTransformer(repo, revision="dim-128")``, or a server's ``--revision dim-128``, gives 128-d
vectors with no option to set. Each branch is made to mirror its folder: files the folder no longer
has (a dropped head) are deleted in the same commit. With ``create_pr`` each upload opens a pull
request against its branch instead of committing to it.

The token is ``HF_TOKEN`` or the Hub login cache, which huggingface_hub finds by itself; it is never
written anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

from stella_distill.errors import UserError, first_line
from stella_distill.hub import is_hub_id
from stella_distill.layout import DIMS_FOLDER, dim_revision, read_layout
from stella_distill.logs import get_logger

logger = get_logger(__name__)

# What git accepts as a branch name, roughly: no spaces, no '..', no leading '-' or '/'.
BRANCH = re.compile(r"^(?!-)(?!/)(?!.*\.\.)[A-Za-z0-9._/-]{1,200}(?<!/)(?<!\.lock)$")


def check_target(repo_id: str, revision: str | None, what: str = "--repo") -> None:
    """Refuse, before any work, a repo id or branch name the Hub would refuse."""
    if not is_hub_id(repo_id):
        raise UserError(f"{what}: {repo_id!r} is not a Hub repo id of the form org/name")
    if revision is not None and not BRANCH.match(revision):
        raise UserError(f"--revision: {revision!r} is not a branch name (letters, digits, . _ - /)")


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    create_pr: bool = False,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    what: str = "--repo",
) -> list[str]:
    """Upload the export ``folder`` to the Hub model repo ``repo_id`` (created if missing).

    The root goes to ``revision`` and every ``dims/{d}`` to ``dim_revision(d, revision)``, one commit
    (or, with ``create_pr``, one pull request) per branch, the folders as they are (``export.push_export``
    rewrites the card first). ``private`` applies to a repo this call creates.
    ``what`` names the option in errors. Returns the commit or pull-request URLs, root first.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        raise UserError(f"{folder}: not an export folder (no modules.json); nothing to push")
    check_target(repo_id, revision, what)
    layout = read_layout(folder)
    targets = [(folder, revision, [f"{DIMS_FOLDER}/**"])]
    targets += [(folder / sub, dim_revision(d, revision), None) for d, sub in layout.dim_folders.items()]
    message = commit_message or f"Upload {folder.name} (stella-distill export)"
    api = HfApi(token=token)
    urls = []
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        for path, branch, ignore in targets:
            if branch not in (None, "main"):
                api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
            info = api.upload_folder(
                folder_path=str(path),
                repo_id=repo_id,
                repo_type="model",
                revision=branch,
                create_pr=create_pr,
                commit_message=message if path == folder else f"{message}: {path.name}-d folder",
                ignore_patterns=ignore,
                delete_patterns=["*"],
            )
            url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)
            urls.append(url)
            where = f"{repo_id}@{branch or 'main'}"
            print(
                f"push: {path} -> https://huggingface.co/{where} ({'pull request ' if create_pr else ''}{url})"
            )
    except (
        Exception
    ) as exc:  # HTTP errors, a lost connection (httpx), a refused token: the text holds no token
        done = f"{len(urls)} of {len(targets)} branches were sent; " if urls else ""
        raise UserError(
            f"{what} {repo_id}: {first_line(exc)[:300]}; {done}the export at {folder} is complete and "
            f"unchanged; send it again with `stella-distill push {folder} --repo {repo_id}` once the Hub is "
            "reachable"
        ) from None
    return urls
