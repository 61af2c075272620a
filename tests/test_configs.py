"""Every shipped config loads; bad configs stop in one line; accelerate configs launch as intended.

- Every experiment YAML under configs/ (found by glob, so new ones are covered) validates with
  `load_config`, opens with a comment giving its command, and names only local files that exist.
- The full-scale recipes carry the paper's hyperparameters.
- Bad configs through the real CLI (`python -m stella_distill check`): exit 2, one stderr line
  naming the field, no traceback.
- configs/accelerate/*.yaml go through accelerate's own config loader and launcher argument
  handling; cpu_ddp.yaml really starts 2 gloo-connected processes.
- The shipped corpus holds no STS-B dev sentence.
- docs/config.md is what the field docs say now; every field has a one-line doc.

This module does not import torch; the accelerate checks run in subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from stella_distill.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
EXPERIMENT_CONFIGS = sorted(
    p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.relative_to(CONFIGS).parts
)
ACCELERATE_CONFIGS = sorted((CONFIGS / "accelerate").glob("*.yaml"))
RECIPES = ["stella_en_400M.yaml", "stella_en_1.5B.yaml", "jasper_text.yaml"]
VERBS = "precompute|train|run|export|evaluate|check"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# ---------------------------------------------------------------------------------------------
# Shipped experiment configs


def test_configs_exist():
    names = {p.name for p in EXPERIMENT_CONFIGS}
    assert set(RECIPES) <= names, f"missing recipes: {set(RECIPES) - names}"
    assert len(ACCELERATE_CONFIGS) >= 6


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=_rel)
def test_config_loads_and_validates(path, tmp_path):
    cfg = load_config(path)
    assert cfg.name.strip() and cfg.teachers and cfg.student is not None and cfg.stages
    # The resolved config must round-trip: the trainer writes it next to every checkpoint.
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    assert load_config(resolved).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=_rel)
def test_config_header_gives_its_command(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    first = lines[0]
    assert first.startswith("#"), f"{_rel(path)}: first line must be a comment with the command to run"
    assert re.search(rf"\b(stella-distill|stella_distill)\s+({VERBS})\b", first), first
    header = "\n".join(
        line for line in lines[: next(i for i, s in enumerate(lines) if not s.startswith("#"))]
    )
    assert _rel(path) in header, f"{_rel(path)}: the header comment should name the file it runs"


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=_rel)
def test_config_local_files_exist(path):
    """Local corpus and evaluation files named by a config ship with the repo (paths from its root)."""
    cfg = load_config(path)
    for i, src in enumerate(cfg.data.train):
        if not (REPO / src.path).exists():
            assert HUB_ID.match(src.path), f"data.train.{i}.path: {src.path} is neither a file nor a Hub id"
    for f in cfg.evaluate.sts:
        assert (REPO / f).is_file(), f"evaluate.sts: {f} does not exist"


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_carry_the_paper_hyperparameters(name):
    cfg = load_config(CONFIGS / name)
    assert [s.trainable for s in cfg.stages] == ["head", "last_layers", "all"]
    assert cfg.stages[1].last_layers == 3
    assert [s.lr for s in cfg.stages] == [1e-4, 8e-5, 7e-5]
    assert [s.steps for s in cfg.stages] == [4000, 7000, 2200]
    assert [s.mrl for s in cfg.stages] == [False, False, True]
    for s in cfg.stages:
        assert s.batch_size * s.grad_accumulation * 8 == 128  # per device x 8 GPUs = the paper's 128
        assert (s.loss_weights.cosine, s.loss_weights.similarity, s.loss_weights.relative_similarity) == (
            10.0,
            200.0,
            20.0,
        )
        assert s.margin == 0.015 and s.mixed_precision == "bf16"
    assert cfg.data.max_length == 512 and cfg.train.gather_across_devices
    assert cfg.export.default_dim == 1024
    assert cfg.export.prompts == {
        "s2p_query": "Instruct: Given a web search query, retrieve relevant passages that answer the query.\nQuery: ",
        "s2s_query": "Instruct: Retrieve semantically similar text.\nQuery: ",
    }
    assert all(t.prompt == "" for t in cfg.teachers)  # documents carry no instruction
    if name.startswith("stella"):
        teachers = {t.model: t.pooling for t in cfg.teachers}
        assert teachers == {
            "Alibaba-NLP/gte-large-en-v1.5": "cls",
            "Alibaba-NLP/gte-Qwen2-1.5B-instruct": "last_token",
        }
        assert cfg.student.target_dim == 1024 + 1536
    else:
        assert [t.model for t in cfg.teachers] == ["nvidia/NV-Embed-v2", "NovaSearch/stella_en_1.5B_v5"]
        assert cfg.student.mrl.dims == [1024, 512, 256]


def test_config_reference_is_current():
    from stella_distill.config_reference import REFERENCE, render

    assert REFERENCE == REPO / "docs" / "config.md"
    assert REFERENCE.read_text(encoding="utf-8") == render(), (
        "docs/config.md is not current: run python -m stella_distill.config_reference"
    )


def test_every_config_field_has_a_one_line_doc():
    import dataclasses
    import typing

    from stella_distill.config import ExperimentConfig

    seen, todo = set(), [ExperimentConfig]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            assert doc.strip() and "\n" not in doc, f"{cls.__name__}.{f.name}: no one-line doc"
            for tp in (hints[f.name], *typing.get_args(hints[f.name])):
                if dataclasses.is_dataclass(tp) and tp not in seen:
                    todo.append(tp)
    assert len(seen) >= 12  # every section was walked


# ---------------------------------------------------------------------------------------------
# Bad configs through the real CLI

BASE = {
    "name": "bad-config-probe",
    "output_dir": "runs/probe",
    "cache_dir": "cache/probe",
    "data": {"train": [{"path": "data/corpus/wordnet_examples.txt"}], "limit": 100},
    "teachers": [
        {"name": "a", "model": "sentence-transformers/all-mpnet-base-v2", "pooling": "mean"},
        {"name": "b", "model": "sentence-transformers/all-MiniLM-L6-v2", "pooling": "mean"},
    ],
    "student": {"model": "sentence-transformers/all-MiniLM-L6-v2", "mrl": {"dims": [128, 64]}},
    "stages": [
        {"name": "s1", "trainable": "head", "steps": 2, "batch_size": 16},
        {"name": "s2", "trainable": "last_layers", "steps": 2, "batch_size": 16},
        {"name": "s3", "trainable": "all", "steps": 2, "batch_size": 16, "mrl": True},
    ],
}


def _check(tmp_path: Path, data: dict | str, *overrides: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "stella_distill", "check", str(cfg), *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def _with(**changes) -> dict:
    data = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def test_base_probe_config_is_valid(tmp_path):
    done = _check(tmp_path, BASE, "stages.0.lr=2e-4")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["stages"][0]["lr"] == 2e-4


BAD_CASES = {
    "unknown-top-level-key": (_with(epochs=3), (), "epochs: unknown key"),
    "unknown-nested-key": (_with(teachers__0__poolng="mean"), (), "teachers.0.poolng: unknown key"),
    "wrong-type": (_with(seed="forty-two"), (), "seed: expected an integer; got 'forty-two'"),
    "bad-enum": (
        _with(teachers__1__pooling="max"),
        (),
        "teachers.1.pooling: expected one of cls, mean, last_token; got 'max'",
    ),
    "empty-teachers": (_with(teachers=[]), (), "teachers: at least one teacher is required"),
    "duplicate-teacher-names": (
        _with(teachers__1__name="a"),
        (),
        "teachers.1.name: duplicate teacher name 'a'",
    ),
    "bad-override-index": (BASE, ("stages.5.lr=1",), "stages.5: no such list element (list has 3 items)"),
    "negative-lr": (BASE, ("stages.0.lr=-1e-4",), "stages.0.lr: must be > 0"),
    "negative-lr-in-file": (_with(stages__2__lr=-0.5), (), "stages.2.lr: must be > 0; got -0.5"),
    "unknown-eval-prompt": (
        BASE,
        ("evaluate.query_prompt_name=s2p_query",),
        "evaluate.query_prompt_name: 's2p_query' is not one of export.prompts (none defined)",
    ),
    "bad-quoting": (
        _with(data__train__0__quoting="double"),
        (),
        "data.train.0.quoting: expected one of auto, csv, none; got 'double'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_config_exits_2_with_one_line_naming_the_field(tmp_path, case):
    data, overrides, expected = BAD_CASES[case]
    done = _check(tmp_path, data, *overrides)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    text = "name: probe\noutput_dir: runs/x\ncache_dir: cache/x\nseed: 1: 2\nteachers: []\n"
    done = _check(tmp_path, text)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert re.search(r"cfg\.yaml:4:\d+: YAML syntax error: mapping values are not allowed here", lines[0]), (
        lines[0]
    )


# ---------------------------------------------------------------------------------------------
# accelerate configs, through accelerate's own loader and launcher argument handling

_ACCELERATE_PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import constants
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env,
    )

    out = {}
    for path in sys.argv[1:]:
        cfg = load_config_from_file(path)
        args = launch_command_parser().parse_args(["--config_file", path, "-m", "stella_distill", "train", "x.yaml"])
        args, defaults, mp_from_config = _validate_launch_command(args)
        if args.use_deepspeed:
            launcher = "deepspeed"
            fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            _, env = prepare_deepspeed_cmd_env(args)
        elif args.multi_gpu or args.use_fsdp:
            launcher = "multi_gpu"
            env = prepare_multi_gpu_env(args)
        else:
            launcher = "simple"
            _, env = prepare_simple_launcher_cmd_env(args)
        out[path] = {
            "class": type(cfg).__name__,
            "distributed_type": cfg.distributed_type.value,
            "num_processes": args.num_processes,
            "mixed_precision": cfg.mixed_precision,
            "launcher": launcher,
            "env": {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))},
        }
    out["constants"] = {
        "sharding": constants.FSDP_SHARDING_STRATEGY,
        "state_dict": constants.FSDP_STATE_DICT_TYPE,
        "wrap": constants.FSDP_AUTO_WRAP_POLICY,
        "prefetch": constants.FSDP_BACKWARD_PREFETCH,
    }
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def accelerate_view() -> dict:
    """What accelerate makes of each configs/accelerate/*.yaml (one subprocess for all of them)."""
    done = subprocess.run(
        [sys.executable, "-c", _ACCELERATE_PROBE, *map(str, ACCELERATE_CONFIGS)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


EXPECTED_ACCELERATE = {
    "single_gpu.yaml": {"distributed_type": "NO", "num_processes": 1, "launcher": "simple"},
    "multi_gpu.yaml": {"distributed_type": "MULTI_GPU", "num_processes": 8, "launcher": "multi_gpu"},
    "deepspeed_zero2.yaml": {"distributed_type": "DEEPSPEED", "num_processes": 8, "launcher": "deepspeed"},
    "deepspeed_zero3.yaml": {"distributed_type": "DEEPSPEED", "num_processes": 8, "launcher": "deepspeed"},
    "fsdp.yaml": {"distributed_type": "FSDP", "num_processes": 8, "launcher": "multi_gpu"},
    "cpu_ddp.yaml": {"distributed_type": "MULTI_GPU", "num_processes": 2, "launcher": "multi_gpu"},
}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=_rel)
def test_accelerate_config_parses(path, accelerate_view):
    view = accelerate_view[str(path)]
    assert view["class"] == "ClusterConfig"
    assert path.read_text(encoding="utf-8").startswith("# "), "say in a comment how to launch with it"
    if path.name in EXPECTED_ACCELERATE:
        assert {k: view[k] for k in EXPECTED_ACCELERATE[path.name]} == EXPECTED_ACCELERATE[path.name]
    # DDP launchers leave precision to each stage; DeepSpeed and FSDP hold it engine-wide
    sharded = view["distributed_type"] in ("DEEPSPEED", "FSDP")
    assert view["env"]["ACCELERATE_MIXED_PRECISION"] == ("bf16" if sharded else "no")


def test_deepspeed_configs(accelerate_view):
    z2 = accelerate_view[str(CONFIGS / "accelerate" / "deepspeed_zero2.yaml")]["env"]
    z3 = accelerate_view[str(CONFIGS / "accelerate" / "deepspeed_zero3.yaml")]["env"]
    assert z2["ACCELERATE_USE_DEEPSPEED"] == "true" and z2["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert z3["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert z3["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    for env in (z2, z3):
        # A value here would override every stage's grad_accumulation through the environment.
        assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
        assert "ACCELERATE_GRADIENT_CLIPPING" not in env


def test_fsdp_config_values_are_known_to_accelerate(accelerate_view):
    env = accelerate_view[str(CONFIGS / "accelerate" / "fsdp.yaml")]["env"]
    known = accelerate_view["constants"]
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_STATE_DICT_TYPE"] in known["state_dict"]
    assert env["FSDP_AUTO_WRAP_POLICY"] in known["wrap"]
    assert env["FSDP_BACKWARD_PREFETCH"] in known["prefetch"]
    assert env["FSDP_USE_ORIG_PARAMS"] == "true"  # stages 1-2 freeze part of the model


def test_cpu_ddp_config_starts_two_connected_processes(tmp_path):
    """The launcher + `Accelerator(cpu=True)` gives real 2-process DDP on a CPU machine."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """
            import json, sys, torch
            from accelerate import Accelerator
            acc = Accelerator(cpu=not torch.cuda.is_available())
            total = acc.reduce(torch.tensor([acc.process_index + 1.0]), reduction="sum").item()
            row = [acc.process_index, acc.num_processes, acc.distributed_type.value, total]
            with open(f"{sys.argv[1]}/rank{acc.process_index}.json", "w") as f:
                json.dump(row, f)
            # leave together: a rank that exits while the other is still in gloo makes it abort
            acc.wait_for_everyone()
            torch.distributed.destroy_process_group()
            """
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / "accelerate" / "cpu_ddp.yaml"),
            str(probe),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    # both ranks see world size 2 and the all-reduced sum 1 + 2 = 3
    assert rows == [[0, 2, "MULTI_CPU", 3.0], [1, 2, "MULTI_CPU", 3.0]], done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The data the configs point at


def _sts_dev_sentences() -> set[str]:
    out = set()
    for line in (REPO / "data" / "stsbenchmark" / "sts-dev.csv").read_text(encoding="utf-8").split("\n"):
        cols = line.split("\t")
        if len(cols) >= 7:
            out.update((cols[5].strip(), cols[6].strip()))
    return out


def test_shipped_corpus_has_no_sts_dev_sentence():
    dev = _sts_dev_sentences()
    assert len(dev) > 2800  # 1500 pairs, a few repeated sentences
    files = sorted((REPO / "data" / "corpus").glob("*.txt"))
    assert {f.name for f in files} >= {"stsb_train_sentences.txt", "wordnet_examples.txt", "fortunes.txt"}
    total = 0
    for f in files:
        lines = f.read_text(encoding="utf-8").split("\n")
        assert lines[-1] == "" and all(s.strip() == s and s for s in lines[:-1]), f"{f.name}: unclean lines"
        leaked = dev.intersection(lines)
        assert not leaked, f"{f.name} holds STS-B dev sentences, e.g. {sorted(leaked)[:3]}"
        total += len(lines) - 1
    assert total > 50_000


def test_shipped_data_has_licences_and_readme_counts():
    data = REPO / "data"
    for name in ("COPYRIGHT.wordnet", "COPYRIGHT.fortunes", "LICENSE.stsbenchmark"):
        assert (data / "corpus" / name).is_file(), name
    assert (data / "stsbenchmark" / "LICENSE.txt").is_file()
    readme = (data / "README.md").read_text(encoding="utf-8")
    for f in sorted((data / "corpus").glob("*.txt")) + [data / "stsbenchmark" / "sts-dev.csv"]:
        count = sum(1 for line in f.read_text(encoding="utf-8").split("\n") if line)
        assert f"| `{f.relative_to(data).as_posix()}` | {count:,} |" in readme, f"README count for {f.name}"


def test_jasper_targets_the_papers_12288_dims():
    """4096 (NV-Embed-v2) + 8192 (stella_en_1.5B_v5 through its released 2_Dense_8192 head)."""
    cfg = load_config(CONFIGS / "jasper_text.yaml")
    nv, stella = cfg.teachers
    assert (nv.model, nv.dense) == ("nvidia/NV-Embed-v2", None)
    assert (stella.model, stella.dense, stella.pooling) == (
        "NovaSearch/stella_en_1.5B_v5",
        "2_Dense_8192",
        "mean",
    )
    assert cfg.student.target_dim is None  # the sum of what the teachers produce: 12288
    assert cfg.student.mrl.mode == "heads" and cfg.student.mrl.dims == [1024, 512, 256]
