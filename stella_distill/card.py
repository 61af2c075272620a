"""The model card of an export: its facts collected once into :class:`CardData`, rendered by short sections.

``collect`` gathers what the card says (what the folder offers, the run's config, its metrics and
evaluation); ``render`` joins the sections, each a small function of ``CardData`` returning markdown
lines; ``write_model_card`` also draws the plots the card shows (``loss_curve.png``,
``metrics_by_dim.png``). The folder format itself (what ``Layout`` describes) belongs to ``export``.

Uses run (metrics, evaluation record); never the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stella_distill.hub import is_hub_id
from stella_distill.run import find_eval, last_eval_row, read_metrics

if TYPE_CHECKING:
    from stella_distill.config import ExperimentConfig
    from stella_distill.export import Layout

CARD_FILE = "README.md"
LOSS_PLOT = "loss_curve.png"
DIM_PLOT = "metrics_by_dim.png"
TAGS = [
    "sentence-transformers",
    "sentence-similarity",
    "feature-extraction",
    "embeddings",
    "distillation",
    "matryoshka",
    "stella-distill",
]
PAPER_BIBTEX = """@misc{zhang2025jasperstelladistillationsota,
  title         = {Jasper and Stella: distillation of SOTA embedding models},
  author        = {Dun Zhang and Jiacheng Li and Ziyang Zeng and Fulong Wang},
  year          = {2025},
  eprint        = {2412.19048},
  archivePrefix = {arXiv},
  primaryClass  = {cs.IR},
  url           = {https://arxiv.org/abs/2412.19048},
}"""


@dataclass
class CardData:
    """Everything the card says, gathered once."""

    name: str  # the card's title: the Hub repo, else the run's name, else the folder's
    model_ref: str  # what users pass to SentenceTransformer(...): the Hub repo or the folder
    repo_id: str | None
    layout: Layout
    cfg: ExperimentConfig | None
    source: str | None  # where the weights came from (final, checkpoint ...)
    license: str | None
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl of the run
    eval_result: dict | None = None  # eval.json of the folder or the run
    plots: tuple[str, ...] = ()

    @property
    def other_dims(self) -> list[int]:
        return [d for d in self.layout.dims if d != self.layout.default_dim]

    @property
    def path_line(self) -> str:
        """The line of a snippet that sets ``path`` to the model's folder."""
        if self.repo_id:
            return f'path = snapshot_download("{self.repo_id}")'
        return f"path = {self.model_ref!r}"


def collect(
    folder: Path,
    layout: Layout,
    *,
    cfg: ExperimentConfig | None = None,
    run_dir: Path | None = None,
    repo_id: str | None = None,
    source: str | None = None,
    license: str | None = None,
    model_ref: str | None = None,
) -> CardData:
    """The card's facts: ``layout`` (what the folder offers), the run's config, metrics and evaluation.

    ``model_ref`` is what the card's snippets load: by default the Hub repo, else ``folder``.
    """
    ref = model_ref or repo_id or str(folder)
    return CardData(
        name=repo_id or (cfg.name if cfg is not None else Path(ref).name),
        model_ref=ref,
        repo_id=repo_id,
        layout=layout,
        cfg=cfg,
        source=source if source is not None else layout.source,
        license=license,
        rows=read_metrics(run_dir),
        eval_result=find_eval(folder, run_dir),
    )


def write_model_card(folder: str | Path, data: CardData) -> Path:
    """Draw the plots and write ``README.md`` into ``folder``; returns the card's path."""
    folder = Path(folder)
    plots = []
    if plot_loss_curve(data.rows, folder / LOSS_PLOT):
        plots.append(LOSS_PLOT)
    if data.eval_result and plot_metrics_by_dim(data.eval_result, folder / DIM_PLOT):
        plots.append(DIM_PLOT)
    data.plots = tuple(plots)
    (folder / CARD_FILE).write_text(render(data), encoding="utf-8")
    return folder / CARD_FILE


def render(data: CardData) -> str:
    """The card's markdown: every section in order."""
    sections = (
        _header,
        _summary,
        _facts,
        _teachers,
        _training_data,
        _stages,
        _results,
        _usage,
        _other_dims,
        _transformers_only,
        _citation,
    )
    return "\n".join(line for section in sections for line in section(data))


# ---------------------------------------------------------------------------------------------
# Sections


def _header(data: CardData) -> list[str]:
    import yaml

    meta: dict[str, Any] = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": list(TAGS),
    }
    cfg = data.cfg
    if cfg is not None and cfg.student is not None and is_hub_id(cfg.student.model):
        meta["base_model"] = cfg.student.model
    datasets = [s.path for s in cfg.data.train if is_hub_id(s.path)] if cfg is not None else []
    if datasets:
        meta["datasets"] = datasets
    if data.license:
        meta["license"] = data.license
    return ["---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n", f"# {data.name}", ""]


def _summary(data: CardData) -> list[str]:
    return [
        "A text-embedding model distilled with stella-distill, which implements the Jasper/Stella recipe "
        "([arXiv:2412.19048](https://arxiv.org/abs/2412.19048)): the student's pooled vectors are projected "
        "to the teachers' concatenated target space and trained with cosine, similarity and "
        "relative-similarity losses, stage by stage.",
        "",
    ]


def _facts(data: CardData) -> list[str]:
    cfg, layout = data.cfg, data.layout
    student = cfg.student if cfg is not None else None
    facts = [
        ("base model (student backbone)", f"`{student.model}`" if student is not None else "-"),
        ("pooling", layout.pooling),
        ("output dims", ", ".join(map(str, layout.dims)) + f" (default {layout.default_dim})"),
        ("Matryoshka mode", layout.mode),
        ("max sequence length", str(layout.max_length) if layout.max_length else "-"),
        ("similarity", "cosine"),
    ]
    if student is not None and student.keep_layers:
        facts.append(("kept backbone layers", ", ".join(map(str, student.keep_layers))))
    if data.source:
        facts.append(("exported from", data.source))
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts), ""]


def _teachers(data: CardData) -> list[str]:
    cfg = data.cfg
    if cfg is None:
        return []
    lines = ["## Teachers", "", "| name | model | pooling | prompt | max length |", "|---|---|---|---|---|"]
    for t in cfg.teachers:
        prompt = f"`{_md_escape(t.prompt)}`" if t.prompt else "(none)"
        revision = f" @ {t.revision}" if t.revision else ""
        dense = "".join(f" + `{d}`" for d in ([t.dense] if isinstance(t.dense, str) else t.dense or []))
        lines.append(
            f"| {t.name} | `{t.model}`{revision} | {t.pooling}{dense} | {prompt} | {cfg.teacher_max_length(t)} |"
        )
    return [*lines, "", "Target = concatenation of the L2-normalised teacher vectors, normalised again.", ""]


def _training_data(data: CardData) -> list[str]:
    cfg = data.cfg
    if cfg is None:
        return []
    lines = ["## Training data", ""]
    for s in cfg.data.train:
        extra = f" (split {s.split}{f', subset {s.subset}' if s.subset else ''}, field `{s.text_field}`"
        extra += f", first {s.limit})" if s.limit else ")"
        lines.append(f"- `{s.path}`{extra}")
    if cfg.data.limit:
        lines.append(f"- at most {cfg.data.limit} texts in all")
    return [*lines, ""]


def _stages(data: CardData) -> list[str]:
    cfg, rows = data.cfg, data.rows
    if cfg is None:
        return []
    world = next((r["world_size"] for r in reversed(rows) if isinstance(r.get("world_size"), int)), None)
    last_step: dict[int, int] = {}
    last_loss: dict[int, float] = {}
    for r in rows:
        i = r.get("stage_index")
        if isinstance(i, int) and isinstance(r.get("step"), int):
            last_step[i] = max(last_step.get(i, 0), r["step"])
            if isinstance(r.get("loss"), (int, float)):
                last_loss[i] = r["loss"]
    lines = [
        "## Training stages",
        "",
        "| stage | trainable | steps | lr | batch | loss weights (cos / sim / rel) | MRL heads (sim / rel) "
        "| last logged step | last loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(cfg.stages):
        trainable = f"last {s.last_layers} layers + head" if s.trainable == "last_layers" else s.trainable
        steps = str(s.steps) if s.steps is not None else f"{s.epochs} epochs"
        batch = f"{s.batch_size}" + (f" x {s.grad_accumulation} accum" if s.grad_accumulation > 1 else "")
        if world:
            batch += f" x {world} proc = {s.batch_size * s.grad_accumulation * world}"
        w, mw = s.loss_weights, s.mrl_loss_weights
        mrl = f"{mw.similarity:g} / {mw.relative_similarity:g}" if s.mrl else "-"
        lines.append(
            f"| {s.name} | {trainable} | {steps} | {s.lr:g} | {batch} | "
            f"{w.cosine:g} / {w.similarity:g} / {w.relative_similarity:g} | {mrl} | "
            f"{last_step.get(i, '')} | {_fmt(last_loss.get(i))} |"
        )
    return [*lines, ""]


def _results(data: CardData) -> list[str]:
    lines = ["## Results", ""]
    table = _eval_table(data.eval_result) if data.eval_result else []
    if table:
        lines += ["Evaluation of this folder (`stella-distill evaluate`), per output dim:", "", *table, ""]
    final = last_eval_row(data.rows)
    if final:
        lines += [
            f"Teacher fidelity on held-out corpus rows at the end of training (stage {final.get('stage')}, "
            f"step {final.get('step')}):",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {_fmt(v)} |" for k, v in final.items() if k.startswith("eval/")),
            "",
        ]
    if not data.eval_result and not final:
        lines += ["No evaluation was recorded for this export.", ""]
    for plot in data.plots:
        title = "training loss" if plot == LOSS_PLOT else "metrics by output dim"
        lines += [f"![{title}]({plot})", ""]
    return lines


def _usage(data: CardData) -> list[str]:
    prompts = data.layout.prompts
    first_prompt = next(iter(prompts), None)
    lines = ["## Usage", "", "### sentence-transformers", "", "```python"]
    lines += ["from sentence_transformers import SentenceTransformer", ""]
    lines += [f'model = SentenceTransformer("{data.model_ref}")']
    if first_prompt:
        lines += [
            f'queries = model.encode(["What is distillation?"], prompt_name="{first_prompt}")',
            'documents = model.encode(["Distillation trains a small model to imitate a large one."])',
            "print(model.similarity(queries, documents))",
        ]
    else:
        lines += [
            'embeddings = model.encode(["What is distillation?", "A small model imitates a large one."])',
            "print(model.similarity(embeddings, embeddings))",
        ]
    lines += ["```", ""]
    if prompts:
        lines += [
            "Prompts (`prompt_name=`):",
            "",
            *(f"- `{k}`: `{_md_escape(v)}`" for k, v in prompts.items()),
        ]
        if data.layout.default_prompt_name:
            lines.append(f"- default prompt: `{data.layout.default_prompt_name}`")
        lines.append("")
    return lines


def _other_dims(data: CardData) -> list[str]:
    other, layout, ref = data.other_dims, data.layout, data.model_ref
    if not other:
        return []
    d = other[0]
    lines = [
        f"### Another output dim ({', '.join(map(str, other))})",
        "",
        "```python",
        "import stella_distill",
        "",
    ]
    lines += [f'model = stella_distill.load("{ref}", dim={d})', "```", ""]
    if layout.mode == "truncate":
        return lines + [
            "Every prefix of the full vector is an embedding (Matryoshka truncation):",
            "",
            "```python",
            f'model = SentenceTransformer("{ref}", truncate_dim={d})',
            "```",
            "",
        ]
    return lines + [
        f"Each dim has its own head (`2_Dense_{{dim}}`); `modules.json` selects {layout.default_dim}. "
        "With sentence-transformers alone, swap the head in:",
        "",
        "```python",
        *(["from huggingface_hub import snapshot_download"] if data.repo_id else []),
        "from sentence_transformers import SentenceTransformer",
        "from sentence_transformers.models import Dense",
        "",
        data.path_line,
        "model = SentenceTransformer(path)",
        f'model[2] = Dense.load(f"{{path}}/2_Dense_{d}")',
        "```",
        "",
    ]


def _transformers_only(data: CardData) -> list[str]:
    layout = data.layout
    d = layout.default_dim
    dense_dir = f"2_Dense_{d}" if layout.mode == "heads" else f"2_Dense_{layout.full_dim}"
    lines = ["### transformers only", "", "```python", "import torch", "import torch.nn.functional as F"]
    lines += ["from huggingface_hub import snapshot_download"] if data.repo_id else []
    lines += [
        "from safetensors.torch import load_file",
        "from transformers import AutoModel, AutoTokenizer",
        "",
    ]
    lines += [
        data.path_line,
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModel.from_pretrained(path).eval()",
        f'dense = load_file(f"{{path}}/{dense_dir}/model.safetensors")',
        "",
        'texts = ["What is distillation?", "A small model imitates a large one."]',
        f"batch = tokenizer(texts, padding=True, truncation=True, max_length={layout.max_length or 512}, "
        "return_tensors='pt')",
        "with torch.no_grad():",
        "    hidden = model(**batch).last_hidden_state",
        *_pooling_snippet(layout.pooling),
        "embeddings = pooled @ dense['linear.weight'].T + dense['linear.bias']",
    ]
    if layout.mode == "truncate" and d != layout.full_dim:
        lines += [f"embeddings = embeddings[:, :{d}]  # Matryoshka prefix"]
    return lines + ["embeddings = F.normalize(embeddings, dim=-1)", "```", ""]


def _citation(data: CardData) -> list[str]:
    return ["## Citation", "", "```bibtex", PAPER_BIBTEX, "```", ""]


def _pooling_snippet(pooling: str) -> list[str]:
    if pooling == "mean":
        return [
            "mask = batch['attention_mask'].unsqueeze(-1).to(hidden.dtype)",
            "pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling",
        ]
    if pooling == "cls":
        return ["pooled = hidden[:, 0]  # CLS pooling"]
    return [
        "positions = torch.arange(batch['attention_mask'].shape[1])",
        "last = (batch['attention_mask'] * positions).argmax(1)  # last real token, any padding side",
        "pooled = hidden[torch.arange(hidden.shape[0]), last]  # last-token pooling",
    ]


def _eval_table(result: dict) -> list[str]:
    by_dim = {int(d): m for d, m in (result.get("dims") or {}).items()}
    names = sorted({k for m in by_dim.values() for k in m})
    if not names:
        return []
    lines = ["| dim | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for d in sorted(by_dim, reverse=True):
        lines.append(f"| {d} | " + " | ".join(_fmt(by_dim[d].get(n)) for n in names) + " |")
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return "" if value is None else str(value)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


# ---------------------------------------------------------------------------------------------
# Plots


def plot_loss_curve(rows: list[dict], path: str | Path) -> Path | None:
    """Total loss (log scale) against the global step, one colour per stage; None without loss rows."""
    # A resumed run logs some steps twice; the last record of a step wins.
    by_step = {
        r["step"]: r
        for r in rows
        if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("step"), int)
    }
    points = [by_step[s] for s in sorted(by_step)]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    stages: dict[str, list[dict]] = {}
    for r in points:
        stages.setdefault(str(r.get("stage", "")), []).append(r)
    for name, rs in stages.items():
        ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], label=name or None, linewidth=1.2)
    if all(r["loss"] > 0 for r in points):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("total loss")
    ax.set_title("training loss")
    if len(stages) > 1 or next(iter(stages)):
        ax.legend(title="stage", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_metrics_by_dim(result: dict, path: str | Path) -> Path | None:
    """One panel per metric of an ``eval.json`` result, metric against output dim; None without metrics."""
    by_dim = {int(d): m for d, m in (result.get("dims") or {}).items()}
    names = sorted({k for m in by_dim.values() for k, v in m.items() if isinstance(v, (int, float))})
    if not names:
        return None
    plt = _pyplot()
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    dims = sorted(by_dim)
    for ax, name in zip(axes.flat, names):
        xs = [d for d in dims if isinstance(by_dim[d].get(name), (int, float))]
        ax.plot(xs, [by_dim[d][name] for d in xs], marker="o")
        if len(xs) > 1 and min(xs) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(d) for d in xs])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("dim")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return Path(path)
