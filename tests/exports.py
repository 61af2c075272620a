"""Exported runs shared by the export and card tests: three tiny students with heads or truncate MRL,
their run folders (config, metrics, baseline) and exports."""

import json
from pathlib import Path

import torch
import yaml

from stella_distill import export
from stella_distill.config import from_dict
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
BASELINE = {"sts/sts-dev": {"student_start": 61.5, "teacher:big": 80.25, "target": 82.75}}


def config_dict(run_dir: Path, model: Path, teacher: Path, pooling: str, mode: str, **export_cfg) -> dict:
    return {
        "name": f"tiny-{mode}-{pooling}",
        "output_dir": str(run_dir),
        "cache_dir": str(run_dir / "cache"),
        "data": {
            "train": [{"path": "HuggingFaceFW/fineweb-edu", "limit": 1000}, {"path": "data/notes.jsonl"}],
            "max_length": 64,
        },
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
    (run_dir / "eval.json").write_text(json.dumps(EVAL_JSON))  # the run's: not this export's results
    (run_dir / "baseline.json").write_text(json.dumps(BASELINE))
    if final:
        student.save_pretrained(run_dir / "final" / "student")
        (run_dir / "final" / "trainer_state.json").write_text(json.dumps({"global_step": 5}))


def make_runs(tmp_path_factory, tiny_bert, tiny_qwen2, tiny_bert4):
    """Three exported runs: BERT heads (mean), BERT truncate (cls), Qwen2 heads (last token, left padding)."""
    root = tmp_path_factory.mktemp("export")
    specs = {
        "heads": (
            tiny_bert,
            "mean",
            "heads",
            {"default_dim": 16, "license": "apache-2.0", "language": ["en"]},
        ),
        "truncate": (tiny_bert, "cls", "truncate", {"default_dim": 16, "datasets": ["org/extra"]}),
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
