"""Smoke-test the full-scale recipes' architectures with tiny random-weight models of the same classes.

The real teachers and students cannot be downloaded here. Where transformers ships the architecture
(Qwen2 for gte-Qwen2-1.5B-instruct and stella_en_1.5B_v5, Mistral for NV-Embed-v2's decoder) the tiny
model has that class; gte-large-en-v1.5's "NewModel" is remote code, so a tiny BERT (its ancestor) stands
in. Everything else (pooling, prompts, stage list, MRL mode, gradient checkpointing, export) is the
recipe's own, with dims scaled down to the tiny target and one step per stage.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from tiny import WORDS, make_tiny_bert, make_tiny_qwen2

from stella_distill.cli import main

ROOT = Path(__file__).resolve().parents[1]


def make_tiny_mistral(path: Path, hidden: int = 32) -> Path:
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralModel

    make_tiny_qwen2(path, layers=1, hidden=hidden)  # borrow its byte-level BPE tokenizer
    tok = AutoTokenizer.from_pretrained(path)
    config = MistralConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=hidden * 2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(5)
    MistralModel(config).save_pretrained(path)
    for f in ("config.json",):
        data = json.loads((path / f).read_text())
        assert data["model_type"] == "mistral"
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-models")
    return {
        "bert": make_tiny_bert(root / "bert", layers=2, hidden=32, seed=21),
        "qwen2": make_tiny_qwen2(root / "qwen2", layers=4, hidden=48, seed=22),
        "mistral": make_tiny_mistral(root / "mistral", hidden=40),
    }


def stand_in(model_id: str, tiny: dict) -> str:
    if "Qwen2" in model_id or "stella_en_1.5B" in model_id:
        return str(tiny["qwen2"])
    if "NV-Embed" in model_id:
        return str(tiny["mistral"])
    return str(tiny["bert"])


def _with_dense(model: Path, into: Path, subfolder: str) -> tuple[str, int]:
    """A copy of ``model`` with a random sentence-transformers Dense head (2x its width) in ``subfolder``."""
    import shutil

    import torch
    from sentence_transformers.sentence_transformer.modules import Dense

    shutil.copytree(model, into)
    width = json.loads((model / "config.json").read_text())["hidden_size"]
    (into / subfolder).mkdir()
    torch.manual_seed(23)
    Dense(width, 2 * width, activation_function=torch.nn.Identity()).save(str(into / subfolder))
    return str(into), 2 * width


@pytest.mark.parametrize("recipe", ["stella_en_400M.yaml", "stella_en_1.5B.yaml", "jasper_text.yaml"])
def test_recipe_architecture_runs_tiny(recipe, tiny_models, tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / recipe).read_text())
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text(
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(48))
    )
    cfg["output_dir"], cfg["cache_dir"] = str(tmp_path / "run"), str(tmp_path / "cache")
    cfg["data"] = {"train": [{"path": str(corpus)}], "max_length": 32, "eval_limit": 4}
    dims = {"bert": 32, "qwen2": 48, "mistral": 40}
    real_target = cfg["student"].get("target_dim") or None
    tiny_target = 0
    for t in cfg["teachers"]:
        t["model"] = stand_in(t["model"], tiny_models)
        t.update(max_length=32, batch_tokens=None, max_batch_size=None, shard_size=16, dtype="float32")
        if t.get("dense"):  # the released Dense head (jasper: stella's 2_Dense_8192), scaled down
            t["model"], out = _with_dense(Path(t["model"]), tmp_path / f"{t['name']}-model", t["dense"])
            tiny_target += out
        else:
            tiny_target += dims[Path(t["model"]).name]
    scale = tiny_target / (real_target or sum(1 for _ in cfg["teachers"]) * 1024)
    mrl = cfg["student"]["mrl"]
    mrl["dims"] = sorted(
        {max(2, int(d * scale)) for d in mrl["dims"] if int(d * scale) < tiny_target}, reverse=True
    )
    cfg["student"].update(model=stand_in(cfg["student"]["model"], tiny_models), target_dim=None)
    if cfg["student"].get("keep_layers"):
        cfg["student"]["keep_layers"] = [0, 3]
    default_dim = cfg.get("export", {}).get("default_dim")
    if default_dim:
        cfg["export"]["default_dim"] = mrl["dims"][0] if mrl["dims"] else None
    for s in cfg["stages"]:
        s.update(steps=1, epochs=None, batch_size=8, grad_accumulation=1, mixed_precision="no")
        if s.get("trainable") == "last_layers":
            s["last_layers"] = 2
    cfg["train"] = {**cfg.get("train", {}), "checkpoint_every": 0, "embedding_chunk_size": None}
    cfg["logging"] = {"wandb": {"mode": "disabled"}, "progress": False}
    cfg["evaluate"] = {"sts": [], "retrieval": []}
    path = tmp_path / recipe
    path.write_text(yaml.safe_dump(cfg))

    assert main(["precompute", str(path)]) == 0
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["stage"] for r in rows] == [s["name"] for s in cfg["stages"]]
    student = json.loads((run / "final" / "student" / "student.json").read_text())
    assert student["pooling"] == cfg["student"]["pooling"]
    assert student["target_dim"] == tiny_target and student["mrl_dims"] == mrl["dims"]
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    st_config = json.loads((tmp_path / "export" / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {**cfg["export"]["prompts"], **st_config["prompts"]}
