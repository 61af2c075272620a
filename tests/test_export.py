"""Export: sentence-transformers folders that load without stella_distill and reproduce the student."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from stella_distill import export
from stella_distill.config import from_dict
from stella_distill.errors import UserError
from stella_distill.pooling import with_prompt
from stella_distill.run import find_source
from stella_distill.student import StudentModel

S2P = "Instruct: Given a web search query, retrieve relevant passages that answer the query.\nQuery: "
S2S = "Instruct: Retrieve semantically similar text.\nQuery: "
PROBE = [
    "the cat sat on the house",
    "a small red car on the road and a dog runs in the city at night",
    "war",
    "birds fly over the green tree",
]
EVAL_JSON = {
    "dims": {"24": {"sts/sts-dev": 71.234, "fidelity/cosine": 0.8123}, "16": {"sts/sts-dev": 69.876}}
}


def config_dict(run_dir: Path, model: Path, teacher: Path, pooling: str, mode: str, **export_cfg) -> dict:
    return {
        "name": f"tiny-{mode}-{pooling}",
        "output_dir": str(run_dir),
        "cache_dir": str(run_dir / "cache"),
        "data": {"train": [{"path": "HuggingFaceFW/fineweb-edu", "limit": 1000}], "max_length": 64},
        "teachers": [
            {"name": "big", "model": str(teacher), "pooling": "cls"},
            {"name": "other", "model": str(teacher), "pooling": "last_token", "prompt": "Query: "},
        ],
        "student": {
            "model": str(model),
            "pooling": pooling,
            "target_dim": 24,
            "mrl": {"mode": mode, "dims": [16, 8]},
        },
        "stages": [
            {"name": "head", "trainable": "head", "steps": 3, "batch_size": 4, "lr": 1e-3},
            {"name": "all", "trainable": "all", "steps": 2, "batch_size": 4, "lr": 5e-4, "mrl": True},
        ],
        "export": {"prompts": {"s2p_query": S2P, "s2s_query": S2S}, **export_cfg},
    }


def build_student(cfg, seed: int) -> StudentModel:
    """A student whose heads are random and whose backbone moved away from the pristine weights.

    ``cfg`` is read with ``resolve_models=False``: its teachers are placeholders (no cache is built), so
    its target_dim is not the teachers' dims."""
    torch.manual_seed(seed)
    student = StudentModel.from_config(cfg.student, target_dim=24, max_length=cfg.data.max_length)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student.eval()


def write_run(run_dir: Path, raw: dict, student: StudentModel | None, *, final: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    rows = [
        {"stage": "head", "stage_index": 0, "step": s, "loss": 5.0 / s, "lr": 1e-3, "world_size": 2}
        for s in (1, 2, 3)
    ]
    rows.append({"stage": "head", "stage_index": 0, "step": 3, "eval/cosine": 0.5, "world_size": 2})
    rows += [{"stage": "all", "stage_index": 1, "step": s, "loss": 4.0 / s, "world_size": 2} for s in (4, 5)]
    rows.append(
        {"stage": "all", "stage_index": 1, "step": 5, "eval/cosine": 0.8765, "eval/similarity_mse@8": 0.0123}
    )
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    (run_dir / "eval.json").write_text(json.dumps(EVAL_JSON))
    if final:
        student.save_pretrained(run_dir / "final" / "student")
        (run_dir / "final" / "trainer_state.json").write_text(json.dumps({"global_step": 5}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, tiny_qwen2, tiny_bert4):
    """Three exported runs: BERT heads (mean), BERT truncate (cls), Qwen2 heads (last token, left padding)."""
    root = tmp_path_factory.mktemp("export")
    specs = {
        "heads": (tiny_bert, "mean", "heads", {"default_dim": 16}),
        "truncate": (tiny_bert, "cls", "truncate", {"default_dim": 16}),
        "qwen": (tiny_qwen2, "last_token", "heads", {"default_prompt_name": "s2s_query"}),
    }
    out = {}
    for i, (key, (model, pooling, mode, extra)) in enumerate(specs.items()):
        run_dir = root / f"run-{key}"
        raw = config_dict(run_dir, model, tiny_bert4, pooling, mode, **extra)
        student = build_student(from_dict(raw, resolve_models=False), seed=i)
        write_run(run_dir, raw, student)
        folder = export.export_run(run_dir, root / f"export-{key}")
        out[key] = {"run": run_dir, "dir": folder, "student": student, "raw": raw}
    return out


def files_of(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_heads_folder_layout(runs):
    folder = runs["heads"]["dir"]
    modules = json.loads((folder / "modules.json").read_text())
    assert [(m["path"], m["type"]) for m in modules] == [
        ("", "sentence_transformers.models.Transformer"),
        ("1_Pooling", "sentence_transformers.models.Pooling"),
        ("2_Dense_16", "sentence_transformers.models.Dense"),  # export.default_dim
        ("3_Normalize", "sentence_transformers.models.Normalize"),
    ]
    for d in (24, 16, 8):
        assert json.loads((folder / f"2_Dense_{d}" / "config.json").read_text()) == {
            "in_features": 32,
            "out_features": d,
            "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity",
        }
        weights = load_file(str(folder / f"2_Dense_{d}" / "model.safetensors"))
        linear = (
            runs["heads"]["student"].projection if d == 24 else runs["heads"]["student"].mrl_heads[str(d)]
        )
        torch.testing.assert_close(weights["linear.weight"], linear.weight.detach(), rtol=0, atol=0)
        torch.testing.assert_close(weights["linear.bias"], linear.bias.detach(), rtol=0, atol=0)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 32 and pooling["pooling_mode_mean_tokens"] is True
    assert not pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_lasttoken"]
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    st = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {"s2p_query": S2P, "s2s_query": S2S}
    assert st["default_prompt_name"] is None and st["similarity_fn_name"] == "cosine"
    assert "truncate_dim" not in st
    assert not [f for f in files_of(folder) if f.endswith((".bin", ".pt", ".pth"))]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "loss_curve.png"} <= files_of(
        folder
    )
    assert not folder.with_name(folder.name + ".tmp").exists()


def test_truncate_and_qwen_layout(runs):
    folder = runs["truncate"]["dir"]
    modules = json.loads((folder / "modules.json").read_text())
    assert modules[2]["path"] == "2_Dense_24"
    assert sorted(p.name for p in folder.glob("2_Dense_*")) == ["2_Dense_24"]
    st = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st["truncate_dim"] == 16  # ST 6.2 reads this key in SentenceTransformer._parse_model_config
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True

    qwen = runs["qwen"]["dir"]
    assert json.loads((qwen / "1_Pooling" / "config.json").read_text())["pooling_mode_lasttoken"] is True
    assert json.loads((qwen / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert (
        json.loads((qwen / "config_sentence_transformers.json").read_text())["default_prompt_name"]
        == "s2s_query"
    )
    assert json.loads((qwen / "modules.json").read_text())[2]["path"] == "2_Dense_24"  # no default_dim: full


SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense

    jobs, texts, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    result, sides = {}, {}
    for key, folder, dim, mode, prompt_name in jobs:
        if mode == "truncate":
            model = SentenceTransformer(folder, truncate_dim=dim)
        else:
            model = SentenceTransformer(folder)
            if dim is not None:
                model[2] = Dense.load(f"{folder}/2_Dense_{dim}")
        result[key] = model.encode(texts, prompt_name=prompt_name, convert_to_numpy=True)
        sides[folder] = model.tokenizer.padding_side
    assert "stella_distill" not in sys.modules, "the export must load without stella_distill"
    np.savez(out, **result)
    print(json.dumps(sides))
    """
)


def test_plain_sentence_transformers_reproduces_student(runs, tmp_path):
    """In a fresh process with no stella_distill import: every dim, with and without a prompt."""
    jobs, expected = [], {}
    for key, run in runs.items():
        mode = run["raw"]["student"]["mrl"]["mode"]
        default_prompt = run["raw"]["export"].get("default_prompt_name")
        for dim in (24, 16, 8):
            for prompt_name in (None, "s2p_query"):
                name = f"{key}-{dim}-{prompt_name}"
                jobs.append([name, str(run["dir"]), dim, mode, prompt_name])
                prompt = {"s2p_query": S2P, None: {"s2s_query": S2S}.get(default_prompt, "")}[prompt_name]
                expected[name] = run["student"].encode(with_prompt(PROBE, prompt), dim=dim)
        jobs.append([f"{key}-default", str(run["dir"]), None, mode, None])
        default_dim = run["raw"]["export"].get("default_dim", 24)
        prompt = {"s2s_query": S2S}.get(default_prompt, "")
        expected[f"{key}-default"] = run["student"].encode(with_prompt(PROBE, prompt), dim=default_dim)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, json.dumps(jobs), json.dumps(PROBE), str(tmp_path / "v.npz")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])[str(runs["qwen"]["dir"])] == "left"
    got = np.load(tmp_path / "v.npz")
    for name, want in expected.items():
        vec = torch.from_numpy(got[name])
        assert vec.shape == want.shape, name
        cos = torch.nn.functional.cosine_similarity(vec, want)
        assert cos.min() >= 0.9999, (name, cos)
    # a prompt changes the vectors, so the check above is not vacuous
    assert not np.allclose(got["heads-16-None"], got["heads-16-s2p_query"], atol=1e-3)


def test_load_helper_every_dim(runs):
    import stella_distill

    for key in ("heads", "truncate"):
        run = runs[key]
        for dim in (24, 16, 8):
            model = stella_distill.load(run["dir"], dim=dim)
            vec = model.encode(PROBE, convert_to_tensor=True)
            assert vec.shape == (len(PROBE), dim)
            cos = torch.nn.functional.cosine_similarity(vec, run["student"].encode(PROBE, dim=dim))
            assert cos.min() >= 0.9999
        with pytest.raises(UserError, match="offered dims: 24, 16, 8"):
            stella_distill.load(run["dir"], dim=30)
    with pytest.raises(UserError, match="offered dims: 24, 16, 8"):
        stella_distill.load(runs["heads"]["dir"], dim=12)
    # truncate mode: every prefix is an embedding
    model = stella_distill.load(runs["truncate"]["dir"], dim=12)
    want = runs["truncate"]["student"].encode(PROBE)[:, :12]
    cos = torch.nn.functional.cosine_similarity(model.encode(PROBE, convert_to_tensor=True), want)
    assert cos.min() >= 0.9999


def test_model_card(runs):
    folder = runs["heads"]["dir"]
    card = (folder / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "sentence-transformers"
    assert header["pipeline_tag"] == "sentence-similarity"
    assert header["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert "base_model" not in header  # the student backbone is a local folder, not a Hub id
    for needle in (
        "71.23",  # eval.json, dim 24
        "69.88",  # eval.json, dim 16
        "0.8123",
        "0.8765",  # last eval row of metrics.jsonl
        "eval/similarity_mse@8",
        "| head | head | 3 | 0.001 | 4 x 2 proc = 8 | 10 / 200 / 20 | - |",
        "| all | all | 2 | 0.0005 | 4 x 2 proc = 8 | 10 / 200 / 20 | 200 / 20 |",
        "| big |",
        "`Query: `",
        "HuggingFaceFW/fineweb-edu",
        'prompt_name="s2p_query"',
        "stella_distill.load(",
        "dim=24)",
        "![training loss](loss_curve.png)",
        "![metrics by output dim](metrics_by_dim.png)",
        "eprint        = {2412.19048}",
    ):
        assert needle in card, needle
    for png in ("loss_curve.png", "metrics_by_dim.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    truncate_card = (runs["truncate"]["dir"] / "README.md").read_text()
    assert "truncate_dim=24)" in truncate_card  # the other-dim snippet names a non-default dim
    assert "embeddings = embeddings[:, :16]" in truncate_card  # the default dim is a prefix of the Dense


@pytest.mark.parametrize("key", ["heads", "truncate", "qwen"])
def test_card_transformers_snippet_runs(runs, key):
    """The card's plain-transformers snippet (manual pooling + Dense weights) reproduces the default dim."""
    card = (runs[key]["dir"] / "README.md").read_text()
    block = re.search(r"### transformers only\n\n```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(
        block.replace(
            'texts = ["What is distillation?", "A small model imitates a large one."]', f"texts = {PROBE!r}"
        ),
        scope,
    )
    default_dim = runs[key]["raw"]["export"].get("default_dim", 24)
    want = runs[key]["student"].encode(PROBE, dim=default_dim)
    cos = torch.nn.functional.cosine_similarity(scope["embeddings"], want)
    assert cos.min() >= 0.9999


def test_push_uploads_exactly_the_folder(runs, tmp_path, monkeypatch):
    """Only the network boundary is stubbed: HfApi.create_repo and HfApi.upload_folder."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", self.token, repo_id, kw))

    def upload_folder(self, *, folder_path, repo_id, **kw):
        calls.append(
            ("upload_folder", self.token, repo_id, Path(folder_path), sorted(files_of(Path(folder_path))), kw)
        )
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_SENTINEL_never_written")
    run = runs["heads"]
    out = export.export_run(
        run["run"], tmp_path / "pushed", repo_id="someone/tiny-heads", private=True, verify=False
    )
    (_, token1, repo1, create_kw), (_, token2, repo2, folder, files, kw) = calls
    assert token1 is None and token2 is None  # left to huggingface_hub: HF_TOKEN or the login cache
    assert repo1 == repo2 == "someone/tiny-heads"
    assert create_kw == {"repo_type": "model", "private": True, "exist_ok": True}
    assert folder == out
    assert "allow_patterns" not in kw and "ignore_patterns" not in kw and kw["delete_patterns"] == ["*"]
    assert kw["repo_type"] == "model"
    assert kw["commit_message"] == f"stella-distill export of run {run['raw']['name']} (final (step 5))"
    assert files == sorted(
        [
            "1_Pooling/config.json",
            "2_Dense_16/config.json",
            "2_Dense_16/model.safetensors",
            "2_Dense_24/config.json",
            "2_Dense_24/model.safetensors",
            "2_Dense_8/config.json",
            "2_Dense_8/model.safetensors",
            "README.md",
            "config.json",
            "config_sentence_transformers.json",
            "loss_curve.png",
            "metrics_by_dim.png",
            "model.safetensors",
            "modules.json",
            "sentence_bert_config.json",
            "stella_distill.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    for f in files:
        assert b"hf_SENTINEL" not in (out / f).read_bytes()
    assert 'snapshot_download("someone/tiny-heads")' in (out / "README.md").read_text()
    calls.clear()
    export.export_run(
        run["run"], tmp_path / "not-pushed", repo_id="someone/tiny-heads", push=False, verify=False
    )
    assert calls == []
    with pytest.raises(UserError, match="org/name"):
        export.push_to_hub(out, "not a repo")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_fsdp_checkpoint_exports_same_weights(runs, tmp_path):
    """An FSDP SHARDED_STATE_DICT (torch.distributed.checkpoint) checkpoint with no student/ folder."""
    import torch.distributed.checkpoint as dcp

    raw = dict(runs["heads"]["raw"], output_dir=str(tmp_path / "run"))
    student = build_student(from_dict(raw, resolve_models=False), seed=7)
    run_dir = tmp_path / "run"
    write_run(run_dir, raw, None, final=False)
    ckpt = run_dir / "checkpoints" / "step-00000005-end"
    ckpt.mkdir(parents=True)
    # accelerate wraps the model state as {"model": ...}; the wrapper prefix must be stripped too
    state = {f"_fsdp_wrapped_module.{k}": v.clone() for k, v in student.state_dict().items()}
    dcp.save({"model": state}, checkpoint_id=str(ckpt / "pytorch_model_fsdp_0"))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    out = export.export_run(run_dir, tmp_path / "out")  # verify=True: ST output == rebuilt student
    backbone = load_file(str(out / "model.safetensors"))
    reference = {
        k[len("backbone.") :]: v for k, v in student.state_dict().items() if k.startswith("backbone.")
    }
    assert set(backbone) == set(reference)
    for k, v in backbone.items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
    for d, linear in ((24, student.projection), (16, student.mrl_heads["16"]), (8, student.mrl_heads["8"])):
        weights = load_file(str(out / f"2_Dense_{d}" / "model.safetensors"))
        torch.testing.assert_close(weights["linear.weight"], linear.weight.detach(), rtol=0, atol=0)
    vec = export.load(out, dim=8).encode(PROBE, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(vec, student.encode(PROBE, dim=8)).min() >= 0.9999


def test_newest_checkpoint_by_global_step(runs, tmp_path):
    raw = dict(runs["heads"]["raw"])
    run_dir = tmp_path / "run"
    write_run(run_dir, raw, None, final=False)
    students = {}
    for name, step in (("zz-early", 3), ("aa-late", 9)):  # names sort opposite to steps
        students[step] = build_student(from_dict(raw, resolve_models=False), seed=step)
        students[step].save_pretrained(run_dir / "checkpoints" / name / "student")
        (run_dir / "checkpoints" / name / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    source = find_source(run_dir)
    assert source.checkpoint.name == "aa-late" and source.step == 9
    inner = find_source(run_dir / "checkpoints" / "zz-early" / "student")  # keeps the run context
    assert inner.run_dir == run_dir and inner.step == 3 and inner.config is not None
    out = export.export_run(run_dir, tmp_path / "out", dim=8, verify=False)
    assert json.loads((out / "modules.json").read_text())[2]["path"] == "2_Dense_8"  # --dim wins
    weights = load_file(str(out / "2_Dense_24" / "model.safetensors"))
    torch.testing.assert_close(
        weights["linear.weight"], students[9].projection.weight.detach(), rtol=0, atol=0
    )
    # one checkpoint folder given directly
    out2 = export.export_run(run_dir / "checkpoints" / "zz-early", tmp_path / "out2", verify=False)
    weights = load_file(str(out2 / "2_Dense_24" / "model.safetensors"))
    torch.testing.assert_close(
        weights["linear.weight"], students[3].projection.weight.detach(), rtol=0, atol=0
    )
    assert "checkpoint zz-early (step 3)" in (out2 / "README.md").read_text()


def test_user_errors(runs, tmp_path):
    with pytest.raises(UserError, match="run folder not found"):
        export.export_run(tmp_path / "missing", tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files stella-distill did not write"):
        export.export_run(runs["heads"]["run"], busy, verify=False)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="offered dims: 24, 16, 8"):
        export.export_run(runs["heads"]["run"], tmp_path / "x", dim=12, verify=False)
    # a DeepSpeed checkpoint without deepspeed installed names what is missing
    ckpt = tmp_path / "ds" / "checkpoints" / "step-1"
    (ckpt / "pytorch_model").mkdir(parents=True)
    (ckpt / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    (tmp_path / "ds" / "config.yaml").write_text(yaml.safe_dump(runs["heads"]["raw"]))
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install deepspeed"):
            export.export_run(tmp_path / "ds", tmp_path / "ds-out", verify=False)
