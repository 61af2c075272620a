"""Export: sentence-transformers folders that load without stella_distill and reproduce the student."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from exports import PROBE, S2P, S2S, build_student, files_of, make_runs, write_run
from safetensors.torch import load_file

from stella_distill import export
from stella_distill.config import from_dict
from stella_distill.errors import UserError
from stella_distill.pooling import with_prompt
from stella_distill.run import find_source


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, tiny_qwen2, tiny_bert4):
    return make_runs(tmp_path_factory, tiny_bert, tiny_qwen2, tiny_bert4)


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


def test_dim_folders_share_the_backbone_and_hold_one_head(runs):
    """dims/{d}: a plain sentence-transformers folder per dim; backbone files are hard links."""
    for key in ("heads", "truncate"):
        folder, student = runs[key]["dir"], runs[key]["student"]
        assert sorted(p.name for p in (folder / "dims").iterdir()) == ["16", "24", "8"]
        for d in (24, 16, 8):
            sub = folder / "dims" / str(d)
            assert json.loads((sub / "modules.json").read_text())[2]["path"] == f"2_Dense_{d}"
            assert [p.name for p in sub.glob("2_Dense_*")] == [f"2_Dense_{d}"]
            st = json.loads((sub / "config_sentence_transformers.json").read_text())
            assert "truncate_dim" not in st and st["prompts"] == {"s2p_query": S2P, "s2s_query": S2S}
            for name in ("model.safetensors", "tokenizer.json", "config.json", "1_Pooling/config.json"):
                assert (sub / name).stat().st_ino == (folder / name).stat().st_ino, (key, d, name)
            weights = load_file(str(sub / f"2_Dense_{d}" / "model.safetensors"))
            if key == "heads":  # the dim's own head
                linear = student.projection if d == 24 else student.mrl_heads[str(d)]
                want_w, want_b = linear.weight.detach(), linear.bias.detach()
            else:  # the first d rows of the full head: the Matryoshka prefix before normalisation
                want_w, want_b = student.projection.weight.detach()[:d], student.projection.bias.detach()[:d]
            torch.testing.assert_close(weights["linear.weight"], want_w, rtol=0, atol=0)
            torch.testing.assert_close(weights["linear.bias"], want_b, rtol=0, atol=0)
            info = json.loads((sub / "stella_distill.json").read_text())
            assert info["dims"] == [d] and info["dim_folder_of"]["dims"] == [24, 16, 8]
    assert sorted(p.name for p in (runs["qwen"]["dir"] / "dims").iterdir()) == ["16", "24", "8"]


def test_single_layout_and_one_dim_students_write_no_dim_folders(runs, tmp_path):
    out = export.export_run(runs["heads"]["run"], tmp_path / "single", layout="single", verify=False)
    assert not (out / "dims").exists() and (out / "2_Dense_8").is_dir()
    run_dir = tmp_path / "run-none"
    raw = copy.deepcopy(runs["heads"]["raw"]) | {"output_dir": str(run_dir)}
    raw["student"]["mrl"] = {"mode": "none"}
    raw["stages"][1]["mrl"] = False
    del raw["export"]["default_dim"]
    write_run(run_dir, raw, build_student(from_dict(raw, resolve_models=False), seed=4))
    out = export.export_run(run_dir, tmp_path / "none")
    assert not (out / "dims").exists()


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
        if mode == "folder":  # a dims/{d} folder: nothing to set, as any tool loads it
            model = SentenceTransformer(folder)
        elif mode == "truncate":
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
            for prompt_name in (None, "s2p_query"):
                name = f"{key}-folder-{dim}-{prompt_name}"
                jobs.append([name, str(run["dir"] / "dims" / str(dim)), dim, "folder", prompt_name])
                expected[name] = expected[f"{key}-{dim}-{prompt_name}"]
        jobs.append([f"{key}-default", str(run["dir"]), None, mode, None])
        default_dim = run["raw"]["export"].get("default_dim", 24)
        prompt = {"s2s_query": S2S}.get(default_prompt, "")
        expected[f"{key}-default"] = run["student"].encode(with_prompt(PROBE, prompt), dim=default_dim)
    jobs.append(["heads-cut-8", str(runs["heads"]["dir"]), 8, "truncate", None])
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
    # why dims/{d} exists: truncate_dim on a heads export silently gives another space than the dim's head
    want = runs["heads"]["student"].encode(PROBE, dim=8)
    cut = torch.from_numpy(got["heads-cut-8"])
    assert cut.shape == want.shape and torch.nn.functional.cosine_similarity(cut, want).min() < 0.9


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
