"""The model card: its Hub metadata (ModelCardData, model-index), the right call for every dim, results
put in by `evaluate`, and `push` (root and one branch per dim) with only HfApi's network calls stubbed."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from exports import BASELINE, PROBE, files_of, make_runs
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from tiny import TEXTS

from stella_distill import evaluate, export
from stella_distill.cli import main
from stella_distill.config import from_dict
from stella_distill.errors import UserError


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, tiny_qwen2, tiny_bert4):
    return make_runs(tmp_path_factory, tiny_bert, tiny_qwen2, tiny_bert4)


def header_of(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def write_sts(path: Path, shift: int = 3) -> None:
    rng = np.random.default_rng(shift)
    rows = [f"{TEXTS[i]}\t{TEXTS[(i * 7 + shift) % 20]}\t{rng.uniform(0, 5):.2f}" for i in range(20)]
    path.write_text("sentence1\tsentence2\tscore\n" + "\n".join(rows) + "\n")


def test_card_at_export(runs):
    folder = runs["heads"]["dir"]
    card = (folder / "README.md").read_text()
    header = header_of(card)
    assert (
        header["library_name"] == "sentence-transformers" and header["pipeline_tag"] == "sentence-similarity"
    )
    assert header["license"] == "apache-2.0" and header["language"] == ["en"]  # export.license / language
    assert header["datasets"] == ["HuggingFaceFW/fineweb-edu"]  # the Hub ids among data.train
    assert "base_model" not in header  # the student backbone is a local folder, not a Hub id
    assert "model-index" not in header  # nothing evaluated this folder yet
    for needle in (
        "`data/notes.jsonl` (local file; split train",  # a local corpus file is named, not dropped
        "`HuggingFaceFW/fineweb-edu` (Hub dataset; split train, field `text`, first 1000)",
        "0.8765",  # last eval row of metrics.jsonl
        "eval/similarity_mse@8",
        "| head | head | 3 | 0.001 | 4 x 2 proc = 8 | 10 / 200 / 20 | - |",
        "| all | all | 2 | 0.0005 | 4 x 2 proc = 8 | 10 / 200 / 20 | 200 / 20 |",
        "| big |",
        "`Query: `",
        "| metric | student before training | teacher big | teachers' target (ceiling) |",
        "| sts/sts-dev | 61.50 | 80.25 | 82.75 |",  # baseline.json
        'prompt_name="s2p_query"',
        "**Do not ask for a smaller dim with `truncate_dim`**",
        f'| 8 | `SentenceTransformer("{folder}/dims/8")` |',
        f'| 16 (default) | `SentenceTransformer("{folder}")` |',
        f'stella_distill.load("{folder}", dim=24)',
        "![training loss](loss_curve.png)",
        "eprint        = {2412.19048}",
    ):
        assert needle in card, needle
    assert "71.23" not in card  # the run folder's eval.json scored whatever the run exported before
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dim_card = (folder / "dims" / "8" / "README.md").read_text()
    assert f'model = SentenceTransformer("{folder}/dims/8")' in dim_card and "Dense(8)" in dim_card
    truncate = (runs["truncate"]["dir"] / "README.md").read_text()
    assert header_of(truncate)["datasets"] == ["org/extra"]  # export.datasets wins
    assert "truncate_dim=d)` for any d up to 24" in truncate and "Do not ask" not in truncate
    assert "embeddings = embeddings[:, :16]" in truncate  # the default dim is a prefix of the Dense


def test_evaluate_puts_its_results_into_the_card_and_model_index(runs, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(runs["heads"]["dir"], folder)
    (folder / "eval.json").unlink(missing_ok=True)
    write_sts(tmp_path / "sts-a.tsv")
    first = evaluate.evaluate_model(folder, sts=[str(tmp_path / "sts-a.tsv")])
    card = ModelCard.load(folder / "README.md")
    got = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    want = {
        (f"sts-a dim {d}", "spearman_cosine"): round(first["dims"][str(d)]["sts/sts-a"], 4)
        for d in (24, 16, 8)
    }
    assert got == want and len(set(want.values())) == 3  # every dim, each its own score
    assert {r.task_type for r in card.data.eval_results} == {"semantic-similarity"}
    assert card.data.license == "apache-2.0" and card.data.model_name == runs["heads"]["raw"]["name"]
    assert f"{first['dims']['8']['sts/sts-a']:.2f}" in card.text
    assert (folder / "metrics_by_dim.png").read_bytes()[:4] == b"\x89PNG"
    dim_results = ModelCard.load(folder / "dims" / "8" / "README.md").data.eval_results
    assert [(r.dataset_name, r.metric_value) for r in dim_results] == [
        ("sts-a dim 8", want[("sts-a dim 8", "spearman_cosine")])
    ]

    # a second evaluation elsewhere (--out) adds to the folder's results and card, never loses the first
    write_sts(tmp_path / "sts-b.tsv", shift=5)
    second = evaluate.evaluate_model(
        folder, dims=[8], sts=[str(tmp_path / "sts-b.tsv")], out_dir=tmp_path / "o"
    )
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["dims"] == second["dims"]
    kept = json.loads((folder / "eval.json").read_text())
    assert (
        kept["dims"]["8"] == {**first["dims"]["8"], **second["dims"]["8"]}
        and "sts/sts-a" in kept["dims"]["24"]
    )
    names = {r.dataset_name for r in ModelCard.load(folder / "README.md").data.eval_results}
    assert names == {"sts-a dim 24", "sts-a dim 16", "sts-a dim 8", "sts-b dim 8"}
    assert kept["inputs"]["sts"] == [str(tmp_path / "sts-a.tsv"), str(tmp_path / "sts-b.tsv")]


def test_evaluate_leaves_folders_of_others_alone(tmp_path, tiny_bert):
    from sentence_transformers import SentenceTransformer, models

    folder = tmp_path / "theirs"
    SentenceTransformer(modules=[models.Transformer(str(tiny_bert)), models.Pooling(32)]).save(str(folder))
    (folder / "README.md").write_text("their card")
    write_sts(tmp_path / "sts.tsv")
    evaluate.evaluate_model(folder, sts=[str(tmp_path / "sts.tsv")], out_dir=tmp_path / "out")
    assert (folder / "README.md").read_text() == "their card" and not (folder / "eval.json").exists()


CARD_CALLS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from sentence_transformers import SentenceTransformer

    calls, texts, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    np.savez(out, **{dim: eval(call).encode(texts) for dim, call in calls.items()})
    assert "stella_distill" not in sys.modules
    """
)


@pytest.mark.parametrize("key", ["heads", "truncate"])
def test_the_cards_call_for_every_dim_works_in_a_clean_process(runs, key, tmp_path):
    """Every `SentenceTransformer(...)` call the card lists, run as written with sentence-transformers alone."""
    run = runs[key]
    card = (run["dir"] / "README.md").read_text()
    calls = dict(re.findall(r"^\| (\d+)(?: \(default\))? \| `(SentenceTransformer\(.*?\))` \|$", card, re.M))
    assert sorted(map(int, calls)) == [8, 16, 24]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CARD_CALLS, json.dumps(calls), json.dumps(PROBE), str(tmp_path / "v.npz")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "v.npz")
    for dim in (24, 16, 8):
        vec = torch.from_numpy(got[str(dim)])
        want = run["student"].encode(PROBE, dim=dim)
        assert vec.shape == want.shape
        assert torch.nn.functional.cosine_similarity(vec, want).min() >= 0.9999, (key, dim)


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


@pytest.fixture
def hub(monkeypatch):
    """HfApi's network calls replaced by recorders; each upload lists the files huggingface_hub would send."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", self.token, repo_id, kw))

    def create_branch(self, repo_id, *, branch, **kw):
        calls.append(("create_branch", repo_id, branch, kw))

    def upload_folder(self, *, folder_path, repo_id, **kw):
        sent = sorted(
            filter_repo_objects(files_of(Path(folder_path)), ignore_patterns=kw.get("ignore_patterns"))
        )
        card = (Path(folder_path) / "README.md").read_text()
        calls.append(("upload_folder", repo_id, Path(folder_path), sent, card, kw))
        pr = f"https://huggingface.co/{repo_id}/discussions/1" if kw.get("create_pr") else ""
        return type(
            "CommitInfo",
            (),
            {"commit_url": f"https://huggingface.co/{repo_id}/commit/0", "pr_url": pr or None},
        )()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_SENTINEL_never_written")
    return calls


ROOT_FILES = [
    "1_Pooling/config.json", "2_Dense_16/config.json", "2_Dense_16/model.safetensors", "2_Dense_24/config.json",
    "2_Dense_24/model.safetensors", "2_Dense_8/config.json", "2_Dense_8/model.safetensors", "README.md",
    "config.json", "config_sentence_transformers.json", "loss_curve.png", "model.safetensors", "modules.json",
    "sentence_bert_config.json", "stella_distill.json", "tokenizer.json", "tokenizer_config.json",
]  # fmt: skip


def test_export_push_sends_the_root_and_one_branch_per_dim(runs, tmp_path, hub):
    run = runs["heads"]
    out = export.export_run(
        run["run"], tmp_path / "pushed", repo_id="someone/tiny-heads", private=True, verify=False
    )
    assert [c[0] for c in hub] == ["create_repo", "upload_folder"] + ["create_branch", "upload_folder"] * 3
    assert hub[0][1:] == (
        None,
        "someone/tiny-heads",
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    _, repo, folder, sent, card, kw = hub[1]
    assert (repo, folder, sent) == ("someone/tiny-heads", out, ROOT_FILES)  # dims/ stays off the main branch
    assert kw["revision"] is None and kw["create_pr"] is False and kw["delete_patterns"] == ["*"]
    assert kw["commit_message"] == f"stella-distill export of run {run['raw']['name']} (final (step 5))"
    assert 'SentenceTransformer("someone/tiny-heads", revision="dim-8")' in card
    for (_, _, branch, kw_branch), (_, _, folder, sent, card, kw), d in zip(
        hub[2::2], hub[3::2], (24, 16, 8)
    ):
        assert (branch, folder, kw["revision"]) == (f"dim-{d}", out / "dims" / str(d), f"dim-{d}")
        assert kw_branch == {"repo_type": "model", "exist_ok": True}
        assert sent == sorted(
            [f"2_Dense_{d}/config.json", f"2_Dense_{d}/model.safetensors"]
            + [f for f in ROOT_FILES if not f.startswith("2_Dense") and f != "loss_curve.png"]
        )
        assert f'SentenceTransformer("someone/tiny-heads", revision="dim-{d}")' in card
    for f in files_of(out):
        assert b"hf_SENTINEL" not in (out / f).read_bytes()
    hub.clear()
    export.export_run(
        run["run"], tmp_path / "not-pushed", repo_id="someone/tiny-heads", push=False, verify=False
    )
    assert hub == []
    with pytest.raises(UserError, match="--push-to-hub: 'not a repo' is not a Hub repo id"):
        export.export_run(run["run"], tmp_path / "x", repo_id="not a repo", verify=False)


def test_push_verb_revision_and_pull_requests(runs, tmp_path, hub, capsys):
    folder = tmp_path / "model"
    shutil.copytree(runs["truncate"]["dir"], folder)
    assert main(["push", str(folder), "--repo", "org/tiny", "--revision", "v2", "--create-pr"]) == 0
    branches = [c[2] for c in hub if c[0] == "create_branch"]
    uploads = [(c[2], c[5]["revision"], c[5]["create_pr"]) for c in hub if c[0] == "upload_folder"]
    assert branches == ["v2", "v2-dim-24", "v2-dim-16", "v2-dim-8"]
    assert uploads == [(folder, "v2", True)] + [
        (folder / "dims" / str(d), f"v2-dim-{d}", True) for d in (24, 16, 8)
    ]
    card = (folder / "README.md").read_text()  # the folder's own card now names where it lives
    assert 'SentenceTransformer("org/tiny", revision="v2")' in card
    assert 'SentenceTransformer("org/tiny", revision="v2-dim-8")' in card
    assert "https://huggingface.co/org/tiny/discussions/1" in capsys.readouterr().out
    for bad, message in (
        (["--repo", "nope"], "--repo: 'nope' is not a Hub repo id"),
        (["--repo", "org/x", "--revision", "a b"], "--revision: 'a b' is not a branch name"),
    ):
        assert main(["push", str(folder), *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["push", str(tmp_path), "--repo", "org/x"]) == 2
    assert "not an export folder (no modules.json)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("license", "Apache 2.0", "export.license: expected a license id"),
        ("language", ["english"], "export.language.0: expected a language code"),
        ("datasets", ["../corpus"], "export.datasets.0: expected a Hub dataset id"),
        ("layout", "folders", "export.layout: expected one of per-dim, single"),
    ],
)
def test_card_fields_are_checked_at_load(runs, field, value, message):
    raw = json.loads(json.dumps(runs["heads"]["raw"]))
    raw["export"][field] = value
    with pytest.raises(UserError, match=re.escape(message)):
        from_dict(raw, resolve_models=False)


def test_metrics_plot_draws_the_ceiling_and_the_start(tmp_path, monkeypatch):
    import matplotlib.axes

    from stella_distill.plots import plot_metrics_by_dim

    drawn = []
    original = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "axhline",
        lambda self, y, **kw: drawn.append((self.get_title(), y, kw["label"])) or original(self, y, **kw),
    )
    result = {"dims": {"24": {"sts/sts-dev": 70.0, "retrieval/b/ndcg@10": 40.0}, "8": {"sts/sts-dev": 66.0}}}
    assert plot_metrics_by_dim(result, tmp_path / "p.png", BASELINE) == tmp_path / "p.png"
    assert sorted(drawn) == [
        ("sts/sts-dev", 61.5, "student before training"),
        ("sts/sts-dev", 80.25, "teacher big"),
        ("sts/sts-dev", 82.75, "teachers' target (ceiling)"),
    ]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
