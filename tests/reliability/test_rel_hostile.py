"""Hostile inputs, second round: what a NaN, a foreign folder, a torn file or a stale input must not do.

The issue's reproductions first (a NaN model shipped as a success, a stale export kept, a user's folder
deleted, a stale teacher cache accepted, rows merged silently, tracebacks for numbers and paths,
unbounded YAML, two runs in one folder), then further inputs nobody listed. Every case ends in one
line and exit 2 (or, where nothing is wrong, in the right result), with nothing of the user's lost.
docs/reliability.md lists them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rel_harness import (
    assert_user_error,
    base_env,
    corpus_lines,
    experiment,
    python_m,
    write_config,
    write_lines,
)
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def base_cfg(rel_models, rel_corpus, tmp_path_factory) -> dict:
    return experiment(tmp_path_factory.mktemp("hostile"), rel_models, rel_corpus)


@pytest.fixture
def built(train_reference, tmp_path) -> tuple[dict, Path]:
    """A private copy of the reference experiment: cache and run folder, final/ included."""
    cfg, ref = train_reference
    cfg = copy.deepcopy(cfg)
    shutil.copytree(cfg["cache_dir"], tmp_path / "cache")
    shutil.copytree(ref, tmp_path / "run")
    cfg["cache_dir"], cfg["output_dir"] = str(tmp_path / "cache"), str(tmp_path / "run")
    return cfg, tmp_path


def check(cfg: dict | None, tmp: Path, *overrides: str, text: str | None = None):
    path = tmp / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    else:
        write_config(path, cfg)
    return python_m("check", path, *overrides)


def poison(safetensors_file: Path) -> None:
    """Write NaN into the first tensor of a safetensors file (what a diverged step leaves)."""
    tensors = load_file(str(safetensors_file))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(safetensors_file))


# ---------------------------------------------------------------------------------------------
# Numbers and names in the config (the list)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["stages.1.lr=inf"], "stages.1.lr: must be a finite number; got 'inf'"),
        (["stages.1.lr=.nan"], "stages.1.lr: must be a finite number; got nan"),
        (["stages.0.steps=null", "stages.0.epochs=.inf"], "stages.0.epochs: must be a finite number; got inf"),
        (["data.eval_fraction=.nan"], "data.eval_fraction: must be a finite number; got nan"),
        (["seed=-1"], "seed: must be in [0, 4294967295]; got -1"),
        (["seed=12345678901234567890"], "seed: 12345678901234567890 is out of range"),
        (["seed=1.5"], "seed: expected an integer; got 1.5"),
        (["data.max_length=4096"], "data.max_length: 4096 tokens is more than the student's 128 positions"),
        (["output_dir=''"], "output_dir: must not be empty"),
        (["cache_dir=" + "x" * 300], "cache_dir: the name 'xxxx"),
        (['teachers.0.name="t\\0x"'], "teachers.0.name: contains a NUL character"),
        (['teachers.0.name="two\\nlines"'], "teachers.0.name: must be a folder name without '/' or control"),
        (["stages.0.loss_weights={cosine: 0, similarity: 0, relative_similarity: 0}"], "stages.0.loss_weights: every loss weight is 0"),
    ],
)  # fmt: skip
def test_numbers_and_names_are_checked_at_load(base_cfg, tmp_path, overrides, needle):
    line = assert_user_error(check(base_cfg, tmp_path, *overrides), needle)
    assert len(line) < 600, line


def test_output_dir_equal_to_cache_dir(base_cfg, tmp_path):
    cfg = {
        **copy.deepcopy(base_cfg),
        "output_dir": str(tmp_path / "same"),
        "cache_dir": str(tmp_path / "same"),
    }
    assert_user_error(check(cfg, tmp_path), "cache_dir: is output_dir")
    cfg["output_dir"] = str(tmp_path / "same" / "t1" / "run")  # inside the teacher's cache
    assert_user_error(check(cfg, tmp_path), "output_dir:", "lies inside the cache of teachers.0")


def test_duplicate_yaml_keys_are_refused(base_cfg, tmp_path):
    text = write_config(tmp_path / "base.yaml", base_cfg).read_text()
    stage = text.index("  lr: ")
    doubled = text[:stage] + "  lr: 0.5\n" + text[stage:]  # a second lr in stage 0
    line_no = doubled[:stage].count("\n") + 1
    assert_user_error(check(None, tmp_path, text=doubled), f"duplicate key 'lr' (first at line {line_no})")
    again = text + "stages: []\n"  # a second stages: block at the end
    assert_user_error(check(None, tmp_path, text=again), "duplicate key 'stages'")


def test_yaml_alias_bomb_and_deep_nesting_are_bounded(base_cfg, tmp_path):
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = "\n".join(bomb) + "\nname: *a8\n"
    started = time.monotonic()
    line = assert_user_error(
        check(None, tmp_path, text=text), "more than 100000 values once YAML aliases are expanded"
    )
    assert len(line) < 600 and time.monotonic() - started < 60
    line = assert_user_error(check(None, tmp_path, text="name: " + "[" * 20000), "nested too deeply")
    assert len(line) < 600


# ---------------------------------------------------------------------------------------------
# A NaN model never ships


def test_a_nan_student_is_not_exported_and_a_nan_export_not_evaluated(built, zygote, tmp_path):
    cfg, tmp = built
    run = Path(cfg["output_dir"])
    good = tmp / "good"
    assert (res := zygote.run("export", run, "--out", good)).rc == 0, str(res)
    poison(run / "final" / "student" / "heads.safetensors")
    res = zygote.run("export", run, "--out", tmp / "bad")
    assert_user_error(res, "the student's weights hold NaN/inf", "is not exported")
    assert not (tmp / "bad").exists()
    poison(good / "model.safetensors")  # the backbone every dim shares
    sts = write_lines(
        tmp / "sts.tsv", [f"main\tx\t2012\t{i}\t{i % 5}.0\ta dog\tthe sea {i}" for i in range(6)]
    )
    res = zygote.run("evaluate", good, "--sts", sts)
    assert_user_error(res, "hold NaN/inf", "nothing to evaluate")
    assert not (good / "eval.json").exists()


def test_export_verification_fails_on_nan(built, zygote):
    """A NaN comparison is a failure: ``worst < min_cosine`` would have let NaN through."""
    from stella_distill import export

    cfg, tmp = built
    out = tmp / "export"
    assert (res := zygote.run("export", cfg["output_dir"], "--out", out)).rc == 0, str(res)

    class NanStudent:
        prompt = ""

        def encode(self, texts, dim=None):
            return torch.full((len(texts), dim), float("nan"))

    with pytest.raises(RuntimeError, match=r"does not reproduce the student at dim \d+ .*min cosine nan"):
        export.verify_export(out, NanStudent())


# ---------------------------------------------------------------------------------------------
# Nothing that is not ours is deleted


def test_export_refuses_a_foreign_folder_and_leaves_neighbours_alone(built, zygote, tmp_path):
    cfg, tmp = built
    run = Path(cfg["output_dir"])
    theirs = tmp / "downloaded-model"
    theirs.mkdir()
    (theirs / "modules.json").write_text("[]")
    (theirs / "my-notes.txt").write_text("notes I care about")
    res = zygote.run("export", run, "--out", theirs)
    assert_user_error(
        res, f"{theirs}: the folder holds files stella-distill did not write (modules.json, my-notes.txt)"
    )
    assert (theirs / "my-notes.txt").read_text() == "notes I care about"
    neighbour = tmp / "export.tmp"  # the user's own folder that an older export would have wiped
    neighbour.mkdir()
    (neighbour / "keep.txt").write_text("mine")
    out = tmp / "export"
    assert (res := zygote.run("export", run, "--out", out)).rc == 0, str(res)
    assert (neighbour / "keep.txt").read_text() == "mine"
    info = json.loads((out / "stella_distill.json").read_text())
    assert "modules.json" in info["files"] and "README.md" in info["files"]
    assert (res := zygote.run("export", run, "--out", out, "--dim", "16")).rc == 0, str(res)  # ours: replaced
    assert json.loads((out / "stella_distill.json").read_text())["default_dim"] == 16
    (out / "my-notes.txt").write_text("added by the user")
    res = zygote.run("export", run, "--out", out)
    assert_user_error(res, "did not write (my-notes.txt)")
    assert (out / "my-notes.txt").is_file()
    for target in (run, Path(cfg["cache_dir"])):  # the run folder itself, the caches
        files = sorted(p for p in target.rglob("*"))
        assert_user_error(zygote.run("export", run, "--out", target), "did not write")
        assert sorted(p for p in target.rglob("*")) == files


def test_a_replacement_interrupted_between_its_renames_is_restored(built, zygote, tmp_path):
    """Where the kernel cannot swap two folders atomically, the old export is renamed aside first; a
    crash right then leaves it whole beside --out, and the next export puts it back before replacing."""
    cfg, tmp = built
    run = Path(cfg["output_dir"])
    out = tmp / "export"
    assert (res := zygote.run("export", run, "--out", out)).rc == 0, str(res)
    before = (out / "stella_distill.json").read_text()
    aside = tmp / ".export.4242-abc.stella-distill-old"
    os.replace(out, aside)  # the state a crash between the two renames leaves
    from stella_distill.export import _check_out

    _check_out(out)
    assert (out / "stella_distill.json").read_text() == before and not aside.exists()


def test_replace_folder_without_an_atomic_exchange(tmp_path, monkeypatch):
    from stella_distill import files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    new, target, old = tmp_path / "new", tmp_path / "target", tmp_path / "old"
    for folder, text in ((new, "new"), (target, "old")):
        folder.mkdir()
        (folder / "f").write_text(text)
    files.replace_folder(new, target, old)
    assert (target / "f").read_text() == "new" and (old / "f").read_text() == "old" and not new.exists()


def test_replace_folder_exchanges_atomically_where_the_kernel_can(tmp_path):
    from stella_distill import files

    new, target = tmp_path / "new", tmp_path / "target"
    for folder, text in ((new, "new"), (target, "old")):
        folder.mkdir()
        (folder / "f").write_text(text)
    if not files._exchange(new, target):
        pytest.skip("no renameat2 exchange on this kernel / file system")
    assert (target / "f").read_text() == "new" and (new / "f").read_text() == "old"


# ---------------------------------------------------------------------------------------------
# Stale inputs are never trusted


def test_a_changed_tokenizer_invalidates_the_teacher_cache(base_cfg, rel_models, zygote, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(rel_models["teacher"], teacher)
    cfg = copy.deepcopy(base_cfg)
    cfg["teachers"][0]["model"] = str(teacher)
    cfg["cache_dir"] = str(tmp_path / "cache")
    path = write_config(tmp_path / "cfg.yaml", cfg)
    assert (res := zygote.run("precompute", path)).rc == 0, str(res)
    assert "complete and matches" in zygote.run("precompute", path).out
    original = (teacher / "tokenizer.json").read_bytes()
    tok = json.loads(original)
    tok["normalizer"]["lowercase"] = not tok["normalizer"]["lowercase"]
    (teacher / "tokenizer.json").write_text(json.dumps(tok))
    res = zygote.run("precompute", path)
    assert_user_error(
        res, "cache/t1: built for revision 'sha256:", "teachers.0.revision / the weights of teachers.0.model"
    )
    (teacher / "README.md").write_text("a model card edit changes no vector")
    (teacher / "tokenizer.json").write_bytes(original)
    assert "complete and matches" in zygote.run("precompute", path).out


def test_run_redoes_the_export_and_evaluation_when_their_inputs_change(built, zygote, tmp_path):
    cfg, tmp = built
    sts = write_lines(
        tmp / "sts.tsv", [f"main\tx\t2012\t{i}\t{i % 5}.0\ta dog runs\tthe sea {i}" for i in range(8)]
    )
    cfg["evaluate"] = {"sts": [str(sts)], "baseline": False}
    path = write_config(tmp / "cfg.yaml", cfg)
    assert (res := zygote.run("run", path)).rc == 0, str(res)
    export = Path(cfg["output_dir"]) / "export"
    assert json.loads((export / "stella_distill.json").read_text())["default_dim"] == 32
    assert "already complete and current" in zygote.run("run", path).out
    cfg["export"] = {"default_dim": 16}
    path = write_config(tmp / "cfg.yaml", cfg)
    res = zygote.run("run", path)
    assert res.rc == 0 and "export and evaluation already complete" not in res.out, str(res)
    assert "export: wrote" in res.out
    assert json.loads((export / "stella_distill.json").read_text())["default_dim"] == 16
    sts.write_text(sts.read_text().replace("a dog runs", "a cat sleeps"))  # same name, new content
    res = zygote.run("run", path)
    assert res.rc == 0 and "export and evaluation already complete" not in res.out, str(res)
    assert "export: wrote" not in res.out and "evaluate: wrote" in res.out  # the export was current
    evaluated = json.loads((Path(cfg["output_dir"]) / "eval.json").read_text())
    assert evaluated["default_dim"] == 16


def test_resume_from_final_and_malformed_checkpoint_states(built, zygote):
    cfg, tmp = built
    run = Path(cfg["output_dir"])
    cfg["train"]["resume"] = str(run / "final")
    res = zygote.run("train", write_config(tmp / "c.yaml", cfg))
    assert_user_error(res, "is the finished student of a run, not a checkpoint")
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    (ckpt / "trainer_state.json").write_text("[1, 2]")
    cfg["train"]["resume"] = str(ckpt)
    res = zygote.run("train", write_config(tmp / "c.yaml", cfg))
    assert_user_error(res, "not the state of a stella-distill checkpoint")


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("shard_size", 0, "field 'shard_size' is 0, not a whole number >= 1"),
        ("rows", "96", "field 'rows' is '96'"),
        ("invalid_rows", [5000], "'invalid_rows' holds values that are not row numbers"),
    ],
)
def test_a_hand_edited_manifest_with_a_valid_checksum(built, zygote, field, value, needle):
    from stella_distill.cache import manifest_digest

    cfg, tmp = built
    manifest = Path(cfg["cache_dir"]) / "t1" / "manifest.json"
    m = json.loads(manifest.read_text())
    m[field] = value
    m["manifest_sha256"] = manifest_digest(m)
    manifest.write_text(json.dumps(m))
    assert_user_error(zygote.run("train", write_config(tmp / "c.yaml", cfg)), needle)


# ---------------------------------------------------------------------------------------------
# Readers never merge rows


def test_an_unclosed_csv_quote_is_an_error_not_one_long_text(base_cfg, zygote, tmp_path):
    lines = corpus_lines(41, seed=9)
    corpus = tmp_path / "rows.csv"
    corpus.write_text("text\n" + '"' + lines[0] + "\n" + "\n".join(lines[1:]) + "\n")
    cfg = copy.deepcopy(base_cfg)
    cfg["data"]["train"] = [{"path": str(corpus)}]
    cfg["cache_dir"] = str(tmp_path / "cache")
    res = zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg))
    assert_user_error(res, f"{corpus}:2: a quoted field starts here and is never closed")
    # two stray quotes 1,200 lines apart would merge everything between them
    many = corpus_lines(1300, seed=10)
    corpus.write_text(
        "text\n" + '"' + many[0] + "\n" + "\n".join(many[1:1200]) + '"\n' + "\n".join(many[1200:]) + "\n"
    )
    res = zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg))
    assert_user_error(res, f"{corpus}:2: a quoted field runs from here to line 1201")


def test_a_50_mb_line_keeps_memory_bounded(base_cfg, tmp_path):
    """Texts are cut by characters before tokenizing, far above what max_length tokens use."""
    lines = corpus_lines(20, seed=11)
    corpus = tmp_path / "corpus.txt"
    with corpus.open("w") as f:
        f.write("\n".join(lines[:10]) + "\n")
        f.write("the king and the queen of the sea " * 1_500_000 + "\n")  # 51 MB
        f.write("\n".join(lines[10:]) + "\n")
    cfg = copy.deepcopy(base_cfg)
    cfg["data"]["train"] = [{"path": str(corpus)}]
    cfg["cache_dir"] = str(tmp_path / "cache")
    path = write_config(tmp_path / "cfg.yaml", cfg)
    probe = (
        "import resource, runpy, sys\n"
        "sys.argv = ['stella_distill', 'precompute', sys.argv[1]]\n"
        "try:\n    runpy.run_module('stella_distill', run_name='__main__')\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'code', code)\n"
    )
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", probe, str(path)], env=base_env(), capture_output=True, text=True, timeout=600
    )
    tail = proc.stdout.strip().splitlines()[-1].split()
    assert tail[0] == "peak_kib" and tail[3] == "0", proc.stdout[-2000:] + proc.stderr[-2000:]
    peak_mb = int(tail[1]) / 1024
    # torch + transformers + the 51 MB text read once: well under 2 GB; tokenizing the whole line took 8 GB
    assert peak_mb < 2000, peak_mb
    assert "truncated at 32 tokens" in proc.stdout


# ---------------------------------------------------------------------------------------------
# One process per run folder; no step logged twice


def test_two_trains_in_one_output_dir(built, zygote, tmp_path):
    cfg, tmp = built
    shutil.rmtree(Path(cfg["output_dir"]))
    path = write_config(tmp / "c.yaml", cfg)
    # the first run writes slowly (each checkpoint save waits) so it is still running when the second starts
    first = zygote.start(["train", path], fault={"kind": "torch_save_pause", "after": 0, "seconds": 3.0})
    lock = Path(cfg["output_dir"]) / ".stella-distill.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = python_m("train", path)
    first.kill()
    first.wait()
    assert_user_error(second, f"{Path(cfg['output_dir']).resolve()}: in use by stella-distill train (pid")
    res = zygote.run("train", path)  # the killed run left no stale lock
    assert res.rc == 0, str(res)


def test_metrics_never_hold_a_step_twice_after_a_resume(built, zygote):
    cfg, tmp = built
    run = Path(cfg["output_dir"])
    shutil.rmtree(run / "final")
    for ckpt in sorted((run / "checkpoints").iterdir())[-1:]:
        shutil.rmtree(ckpt)  # resume from the one before: its later steps are in metrics.jsonl already
    res = zygote.run("train", write_config(tmp / "c.yaml", cfg))
    assert res.rc == 0, str(res)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert len(train_steps) == len(set(train_steps)) == 9, train_steps
    assert train_steps == sorted(train_steps)


# ---------------------------------------------------------------------------------------------
# The Hub unreachable while pushing


def test_a_lost_hub_connection_while_pushing_keeps_the_export(built, monkeypatch, capsys):
    import httpx
    from huggingface_hub import HfApi

    from stella_distill.cli import main

    cfg, tmp = built

    def unreachable(*a, **k):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    out = tmp / "export"
    code = main(["export", cfg["output_dir"], "--out", str(out), "--push-to-hub", "someone/model"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = [x for x in err.splitlines() if ": error: " in x]
    assert len(line) == 1 and "Temporary failure in name resolution" in line[0], err
    assert f"the export at {out} is complete and unchanged" in line[0]
    assert (out / "modules.json").is_file()


# ---------------------------------------------------------------------------------------------
# Further inputs nobody listed


def test_further_hostile_config_and_cli_inputs(base_cfg, zygote, tmp_path):
    folder_cfg = tmp_path / "cfg-folder.yaml"
    folder_cfg.mkdir()
    assert_user_error(python_m("check", folder_cfg), f"{folder_cfg}: cannot read config")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0" * 10)
    cfg = copy.deepcopy(base_cfg)
    cfg["teachers"][0]["model"] = str(a_file)
    cfg["cache_dir"] = str(tmp_path / "cache")
    assert_user_error(zygote.run("precompute", write_config(tmp_path / "c.yaml", cfg)), "teachers.0.model")


@pytest.mark.parametrize(
    "name, data, needle",
    [
        ("utf16.txt", "a dog\nthe sea\n".encode("utf-16"), "{corpus}:1: not UTF-8 text"),
        ("wrong.txt.gz", __import__("bz2").compress(b"a dog\n"), "{corpus}: cannot decompress"),
        ("object.json", b'{\n  "text": "a dog"\n}\n', "{corpus}:1: invalid JSON"),
        ("ints.jsonl", b'{"text": 1}\n{"text": [2]}\n', "the corpus is empty after reading 2 rows (0 empty or whitespace-only, 2 non-string)"),
        ("quote.csv", b'text\n"a dog" and more\nthe sea\n', "{corpus}:2: cannot parse the line (',' expected after '\"')"),
    ],
)  # fmt: skip
def test_further_hostile_corpora(base_cfg, zygote, tmp_path, name, data, needle):
    corpus = tmp_path / name
    corpus.write_bytes(data)
    cfg = copy.deepcopy(base_cfg)
    cfg["data"]["train"] = [{"path": str(corpus)}]
    cfg["cache_dir"] = str(tmp_path / "cache")
    res = zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg))
    assert_user_error(res, needle.replace("{corpus}", str(corpus)))


def test_a_symlink_loop_as_corpus(base_cfg, zygote, tmp_path):
    loop = tmp_path / "loop.txt"
    os.symlink(loop, loop)
    cfg = copy.deepcopy(base_cfg)
    cfg["data"]["train"] = [{"path": str(loop)}]
    cfg["cache_dir"] = str(tmp_path / "cache")
    line = assert_user_error(zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg)), str(loop))
    assert "Too many levels of symbolic links" in line or "not found" in line, line


def test_further_hostile_export_and_evaluate_inputs(built, zygote, tmp_path):
    cfg, tmp = built
    run = Path(cfg["output_dir"])
    out = tmp / "export"
    assert_user_error(zygote.run("export", run, "--out", out, "--dim", "-5"), "dim -5 is not offered")
    assert (res := zygote.run("export", run, "--out", out)).rc == 0, str(res)
    nan_sts = write_lines(tmp / "nan.tsv", ["main\tx\t2012\t1\tnan\ta\tb", "main\tx\t2012\t2\t1.0\tc\td"])
    assert_user_error(
        zygote.run("evaluate", out, "--sts", nan_sts), f"{nan_sts}:1: the score column (5th) is not finite"
    )
    assert_user_error(
        zygote.run("evaluate", out, "--sts", tmp), f"{tmp}: STS file is a folder, expected a file"
    )
    assert_user_error(zygote.run("evaluate", out, "--dims", "7"), "--dims: 7 is not offered")
    beir = tmp / "beir"
    write_lines(beir / "corpus.jsonl", ['{"_id": "d1", "text": "a dog"}'])
    write_lines(beir / "queries.jsonl", ['{"_id": "q1", "text": "dog"}'])
    write_lines(beir / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\thigh"])
    assert_user_error(
        zygote.run("evaluate", out, "--retrieval", beir), "test.tsv:2: score 'high' is not a number"
    )
    (run / "metrics.jsonl").open("a").write('{"step": 99, "loss": 0.1\n')  # a torn last line
    assert (res := zygote.run("export", run, "--out", out)).rc == 0, str(res)
    assert "training loss" in (out / "README.md").read_text()


def test_a_checkpoint_state_that_is_valid_json_of_the_wrong_shape(built, zygote):
    cfg, tmp = built
    run = Path(cfg["output_dir"])
    shutil.rmtree(run / "final")
    newest = sorted((run / "checkpoints").iterdir())[-1]
    state = json.loads((newest / "trainer_state.json").read_text())
    (newest / "trainer_state.json").write_text(json.dumps({**state, "stage_index": "2"}))
    assert_user_error(zygote.run("train", write_config(tmp / "c.yaml", cfg)), "missing or wrong: stage_index")


def test_interrupt_keeps_finished_work(built, zygote):
    """SIGINT in the middle of training: one line, exit 130, the checkpoints so far kept."""
    cfg, tmp = built
    run = Path(cfg["output_dir"])
    shutil.rmtree(run)
    job = zygote.start(
        ["train", write_config(tmp / "c.yaml", cfg)],
        fault={"kind": "torch_save_pause", "after": 1, "seconds": 1.0},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "checkpoints").is_dir():
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(job.pid, signal.SIGINT)
    res = job.wait()
    assert res.rc == 130 and "interrupted; finished work is kept" in res.err, str(res)
    assert np.all(
        [
            (p / "trainer_state.json").is_file()
            for p in (run / "checkpoints").iterdir()
            if not p.name.endswith(".tmp")
        ]
    )


# ---------------------------------------------------------------------------------------------
# Found in review: work kept, settings honoured


def test_a_fresh_start_over_an_earlier_runs_checkpoints_is_refused(built, zygote):
    """train.resume: null next to an earlier run's checkpoints would mix the two (and pruning kept theirs)."""
    cfg, tmp = built
    run = Path(cfg["output_dir"])
    shutil.rmtree(run / "final")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    cfg["train"]["resume"] = None
    res = zygote.run("train", write_config(tmp / "c.yaml", cfg))
    assert_user_error(res, "train.resume: null, but", "holds checkpoints of an earlier run")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    from stella_distill import run

    root = tmp_path / "checkpoints"
    for step in (8, 10, 2):
        folder = root / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / run.STATE_FILE).write_text(json.dumps({"global_step": step}))
    run.prune_checkpoints(tmp_path, keep=2, current=root / "step-00000002")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000008", "step-00000010"]


def test_a_mid_stage_checkpoint_resumes_only_with_its_process_count(built):
    from stella_distill import run
    from stella_distill.config import from_dict
    from stella_distill.errors import UserError

    cfg, tmp = built
    folder = Path(cfg["output_dir"])
    newest = run.list_checkpoints(folder)[-1]
    state = json.loads((newest / run.STATE_FILE).read_text())
    (newest / run.STATE_FILE).write_text(json.dumps({**state, "stage_complete": False, "world_size": 2}))
    config = from_dict(cfg)
    with pytest.raises(UserError, match=r"saved in the middle of stage 2 by 2 process\(es\); this job has 1"):
        run.resume_point(config, folder, world_size=1)
    assert run.resume_point(config, folder, world_size=2)[0] == newest


def test_run_only_knobs_do_not_make_a_finished_run_stale(built):
    from stella_distill import run
    from stella_distill.config import from_dict

    cfg, _ = built
    assert run.training_complete(from_dict(cfg), Path(cfg["output_dir"]))
    changed = copy.deepcopy(cfg)
    changed["teachers"][0].update(batch_tokens=512, max_batch_size=7, shard_size=16)
    changed["data"]["train"][0]["streaming"] = True
    assert run.training_complete(from_dict(changed), Path(cfg["output_dir"]))
    changed["teachers"][0]["prompt"] = "query: "  # this one changes the vectors
    assert not run.training_complete(from_dict(changed), Path(cfg["output_dir"]))


def test_run_re_exports_with_the_settings_it_was_given(built, zygote):
    cfg, tmp = built
    cfg["evaluate"] = {"baseline": False}
    cfg["export"] = {"prompts": {"q": "old: "}}
    assert (res := zygote.run("run", write_config(tmp / "c.yaml", cfg))).rc == 0, str(res)
    cfg["export"] = {"prompts": {"q": "NEW: "}}
    assert (res := zygote.run("run", write_config(tmp / "c.yaml", cfg))).rc == 0, str(res)
    export = Path(cfg["output_dir"]) / "export"
    assert json.loads((export / "config_sentence_transformers.json").read_text())["prompts"]["q"] == "NEW: "


def test_evaluate_writes_into_a_folder_it_did_not_make_only_with_out(built, zygote, tmp_path):
    cfg, tmp = built
    out = tmp / "export"
    assert (res := zygote.run("export", cfg["output_dir"], "--out", out)).rc == 0, str(res)
    theirs = tmp / "theirs"
    shutil.copytree(out / "dims" / "16", theirs)  # a plain sentence-transformers folder
    (theirs / "eval.json").write_text('{"mine": true}')
    sts = write_lines(
        tmp / "sts.tsv", [f"main\tx\t2012\t{i}\t{i % 5}.0\ta dog\tthe sea {i}" for i in range(6)]
    )
    assert_user_error(
        zygote.run("evaluate", theirs, "--sts", sts), "--out:", "is not an export of stella-distill"
    )
    assert json.loads((theirs / "eval.json").read_text()) == {"mine": True}
    res = zygote.run("evaluate", theirs, "--sts", sts, "--out", tmp / "scores")
    assert res.rc == 0 and (tmp / "scores" / "eval.json").is_file(), str(res)


def test_a_cache_being_built_by_another_job_is_left_alone(base_cfg, zygote, tmp_path):
    import subprocess

    cfg = copy.deepcopy(base_cfg)
    cfg["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    lock = tmp_path / "cache" / ".t1.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); f.write('other job');"
         " f.flush(); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        res = zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg))
        assert_user_error(res, "cache/t1: other job is building this cache now; wait for it to finish")
        assert not (tmp_path / "cache" / "t1").exists()
    finally:
        holder.kill()
        holder.wait()
    assert zygote.run("precompute", write_config(tmp_path / "cfg.yaml", cfg)).rc == 0


def test_a_remote_code_student_keeps_its_trust_through_save_and_export(tmp_path, rel_models):
    from stella_distill import export
    from stella_distill.config import MRLConfig, StudentConfig
    from stella_distill.layout import read_layout
    from stella_distill.student import StudentModel

    cfg = StudentConfig(model=str(rel_models["student"]), trust_remote_code=True, mrl=MRLConfig(dims=[16]))
    student = StudentModel.from_config(cfg, target_dim=32, max_length=32)
    student.save_pretrained(tmp_path / "student")
    assert json.loads((tmp_path / "student" / "student.json").read_text())["trust_remote_code"] is True
    assert StudentModel.from_pretrained(tmp_path / "student").trusts_remote_code
    out = export.export_student(student, tmp_path / "export")
    assert read_layout(out).trust_remote_code and read_layout(out / "dims" / "16").trust_remote_code
    card = export.write_card(out).read_text()
    assert 'SentenceTransformer("' in card and "trust_remote_code=True" in card
