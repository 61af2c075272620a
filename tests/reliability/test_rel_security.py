"""Security: no remote code unless asked, no pickles loaded unsafely, no Hub token in anything a run writes."""

from __future__ import annotations

import ast
import copy
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
from rel_harness import (
    REPO,
    TOKEN,
    assert_user_error,
    base_env,
    experiment,
    python_m,
    write_config,
)

PACKAGE = REPO / "stella_distill"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# What accelerate's save_state writes besides model.safetensors; it reads them back with
# torch.load(weights_only=True) (accelerate.utils.other.load), so they hold tensors and plain data only.
ACCELERATE_PICKLES = {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"}


# ---------------------------------------------------------------------------------------------
# trust_remote_code


@pytest.fixture(scope="module")
def remote_code_model(rel_models, tmp_path_factory):
    """A model folder whose config.json asks for its own code; importing that code leaves a file."""
    root = tmp_path_factory.mktemp("remote-code")
    folder = root / "model"
    shutil.copytree(rel_models["teacher"], folder)
    sentinel = root / "REMOTE_CODE_RAN"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import BertConfig as EvilConfig, BertModel as EvilModel\n"
    )
    return folder, sentinel


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_remote_code_is_refused_unless_the_config_allows_it(
    role, remote_code_model, train_reference, zygote, tmp_path
):
    folder, sentinel = remote_code_model
    cfg, _ = train_reference
    cfg = copy.deepcopy(cfg)
    cfg["output_dir"] = str(tmp_path / "run")
    if role == "teacher":
        cfg["teachers"][0]["model"] = str(folder)
        cfg["cache_dir"] = str(tmp_path / "cache")
        verb, field = "precompute", "teachers.0.model"
    else:
        cfg["student"]["model"] = str(folder)
        verb, field = "train", "student.model"
    res = zygote.run(verb, write_config(tmp_path / "cfg.yaml", cfg))
    line = assert_user_error(
        res, f"{field}: {folder} asks to run its own Python code (auto_map in config.json)"
    )
    assert "trust_remote_code: true" in line
    assert not sentinel.exists(), "the model's own code ran"


# ---------------------------------------------------------------------------------------------
# Pickles


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f"{getattr(f.value, 'id', '?')}.{f.attr}"
                if isinstance(f, ast.Attribute)
                else getattr(f, "id", "")
            )
            yield name, {k.arg: k.value for k in node.keywords}, node


def test_no_unsafe_deserialisation_in_the_package():
    """Every torch.load passes weights_only=True; no pickle/joblib loads; no np.load(allow_pickle=True);
    trust_remote_code is never hard-wired to True."""
    seen_torch_load = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source, str(path))
        # every textual torch.load is one of the calls checked below (no alias, no `from torch import load`)
        assert len(re.findall(r"\btorch\.load\b", source)) == sum(
            1 for name, _, _ in _calls(tree) if name == "torch.load"
        ), f"{path}: torch.load used other than as a direct call"
        assert not re.search(r"from torch(\.serialization)? import .*\bload\b", source), path
        for name, kwargs, node in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name == "torch.load":
                seen_torch_load += 1
                value = kwargs.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, (
                    f"{where}: torch.load without weights_only=True"
                )
            assert name not in (
                "pickle.load",
                "pickle.loads",
                "joblib.load",
                "dill.load",
                "torch.jit.load",
            ), where
            if name in ("np.load", "numpy.load"):
                value = kwargs.get("allow_pickle")
                assert value is None or (isinstance(value, ast.Constant) and value.value is False), where
            value = kwargs.get("trust_remote_code")
            assert not (isinstance(value, ast.Constant) and value.value is True), (
                f"{where}: trust_remote_code=True"
            )
        assert "import pickle" not in source and "from pickle" not in source, path
    assert seen_torch_load >= 1  # the scan did see the calls it checks


def test_resume_does_not_unpickle_code(train_reference, zygote, tmp_path):
    """A checkpoint whose optimizer.bin is a pickle that would run code is refused, the code never runs."""
    cfg, ref = train_reference
    run = tmp_path / "run"
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns("final", "step-00000009-end"))
    sentinel = tmp_path / "PICKLE_CODE_RAN"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    payload = pickle.dumps(Payload(), protocol=2)
    pickle.loads(payload).close()  # the payload is live: plain unpickling runs it
    assert sentinel.exists()
    sentinel.unlink()
    (run / "checkpoints" / "step-00000008" / "optimizer.bin").write_bytes(payload)
    res = zygote.run("train", write_config(tmp_path / "cfg.yaml", {**cfg, "output_dir": str(run)}))
    assert res.rc not in (0, -9), str(res)
    assert "Weights only load failed" in res.err, str(res)
    assert not sentinel.exists(), "resume unpickled code from a checkpoint"


# ---------------------------------------------------------------------------------------------
# A whole run with a Hub token in the environment and wandb offline


@pytest.fixture(scope="module")
def token_run(rel_models, rel_corpus, tmp_path_factory):
    """`python -m stella_distill run` (precompute, 3 stages, export, STS evaluation, wandb offline)."""
    root = tmp_path_factory.mktemp("token-run")
    sts = root / "sts.tsv"
    rows = [
        ("main", "x", "2012", f"{i:04d}", f"{(i * 7) % 6:.1f}", a, b)
        for i, (a, b) in enumerate(
            [("a dog runs", "a dog walks"), ("the sea", "the king"), ("red car", "blue car"),
             ("the sun", "the moon"), ("fire in the night", "fire at night"), ("war", "peace"),
             ("a small house", "a large house"), ("birds fly", "fish swim")]
        )
    ]  # fmt: skip
    sts.write_text("".join("\t".join(r) + "\n" for r in rows))
    cfg = experiment(root, rel_models, rel_corpus)
    cfg["logging"]["wandb"] = {"mode": "offline", "project": "reliability"}
    cfg["evaluate"] = {"sts": [str(sts)], "baseline": True}
    cfg["export"] = {"prompts": {"query": "query: "}}
    cfg["student"]["target_dim"] = 32  # pipeline.baseline_scores needs it with MRL dims (xfail in bad_input)
    path = write_config(root / "cfg.yaml", cfg)
    home = root / "home"
    env = base_env(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        WANDB_DIR=str(root / "wandb-dir"),
        WANDB_CACHE_DIR=str(home / "wandb-cache"),
        WANDB_CONFIG_DIR=str(home / "wandb-config"),
        WANDB_DATA_DIR=str(home / "wandb-data"),
        WANDB_SILENT="true",
    )
    res = python_m("run", path, env=env, timeout=600)
    assert res.rc == 0, str(res)
    return root, cfg, res


def test_run_writes_a_model_card_wandb_files_and_no_pickles(token_run):
    root, cfg, _ = token_run
    run = Path(cfg["output_dir"])
    export = run / "export"
    assert (export / "README.md").is_file() and (export / "modules.json").is_file()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "wandb wrote no offline run (the token scan would miss its config)"
    (log,) = [p for p in offline[0].iterdir() if p.suffix == ".wandb"]
    assert cfg["data"]["train"][0]["path"].encode() in log.read_bytes()  # the run config is in it
    pickles = [p for p in export.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not pickles, pickles
    pickles = [p for p in (run / "final").rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not pickles, pickles
    for ckpt in (run / "checkpoints").iterdir():
        found = {p.name for p in ckpt.rglob("*") if p.suffix in PICKLE_SUFFIXES}
        assert found == ACCELERATE_PICKLES, (ckpt, found)
        assert not [p for p in (ckpt / "student").rglob("*") if p.suffix in PICKLE_SUFFIXES]


def test_the_hub_token_appears_in_nothing_the_run_wrote(token_run):
    root, cfg, res = token_run
    needles = [TOKEN.encode(), TOKEN[3:].encode(), TOKEN.encode("utf-16-le")]
    assert TOKEN not in res.out and TOKEN not in res.err
    scanned, hits = 0, []
    for base in {root, Path(cfg["output_dir"]), Path(cfg["cache_dir"])}:
        for p in base.rglob("*"):
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                scanned += 1
                if any(n in data for n in needles):
                    hits.append(p)
    assert not hits, hits
    assert scanned > 50, scanned  # configs, metrics.jsonl, checkpoints, export, model card, wandb files
