"""The model card of an export: its facts collected once, kept in the folder, rendered by short sections.

At export, ``collect_facts`` gathers what the card says about the run (its resolved config, a summary
of ``metrics.jsonl``, the scores before training in ``baseline.json``, license, languages, datasets);
``save_facts`` keeps them in the folder's ``stella_distill.json``, so that ``evaluate`` (putting in its
results) and ``push`` (naming the Hub repo) rewrite the card from the folder alone. ``card_data``
joins the facts with what the folder offers (``Layout``) and its ``eval.json``; ``render`` joins the
sections, each a small function of ``CardData`` returning markdown lines. The YAML header is
huggingface_hub's ``ModelCardData``, with one ``EvalResult`` per evaluated (dim, metric): the Hub's
``model-index``. Each ``dims/{d}`` folder gets a short card of its own (``render_dim_card``).

Uses run (metrics, baseline), layout (what the folder offers) and plots; never the trainer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stella_distill.config import ExperimentConfig, from_dict
from stella_distill.errors import UserError
from stella_distill.files import atomic_write
from stella_distill.hub import is_hub_id
from stella_distill.layout import INFO_FILE, Layout, dim_revision, read_info
from stella_distill.plots import BASELINE_STYLE, DIM_PLOT, LOSS_PLOT, plot_loss_curve, plot_metrics_by_dim
from stella_distill.run import BASELINE_FILE, EVAL_FILE, summarize_training
from stella_distill.tables import read_json

CARD_FILE = "README.md"
TAGS = "sentence-transformers sentence-similarity feature-extraction embeddings distillation matryoshka stella-distill"
PAPER_BIBTEX = """@misc{zhang2025jasperstelladistillationsota,
  title         = {Jasper and Stella: distillation of SOTA embedding models},
  author        = {Dun Zhang and Jiacheng Li and Ziyang Zeng and Fulong Wang},
  year          = {2025},
  eprint        = {2412.19048},
  archivePrefix = {arXiv},
  primaryClass  = {cs.IR},
  url           = {https://arxiv.org/abs/2412.19048},
}"""
# eval.json metric families -> the Hub's task type and name (model-index), and how a metric is named there
TASKS = {
    "sts": ("semantic-similarity", "Semantic Similarity"),
    "retrieval": ("information-retrieval", "Information Retrieval"),
    "fidelity": ("feature-extraction", "Teacher fidelity"),
    "mteb": ("mteb", "MTEB"),
}


@dataclass
class CardData:
    """Everything the card says, gathered once."""

    name: str  # the card's title: the Hub repo, else the run's name, else the folder's
    model_ref: str  # what users pass to SentenceTransformer(...): the Hub repo or the folder
    repo_id: str | None
    revision: str | None  # the Hub branch of the export's root (None: main)
    layout: Layout
    cfg: ExperimentConfig | None
    source: str | None  # where the weights came from (final, checkpoint ...)
    license: str | None = None
    language: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids for the metadata
    training: dict = field(default_factory=dict)  # summary of metrics.jsonl (summarize_training)
    baseline: dict | None = None  # {metric: {model: score}} before training (baseline.json)
    eval_result: dict | None = None  # eval.json of the folder
    plots: tuple[str, ...] = ()

    @property
    def other_dims(self) -> list[int]:
        return [d for d in self.layout.dims if d != self.layout.default_dim]

    @property
    def path_line(self) -> str:
        """The line of a snippet that sets ``path`` to the model's folder."""
        if self.repo_id:
            revision = f', revision="{self.revision}"' if self.revision else ""
            return f'path = snapshot_download("{self.repo_id}"{revision})'
        return f"path = {self.model_ref!r}"

    def load_call(self, dim: int | None = None, root: bool = True) -> str:
        """``SentenceTransformer(...)`` giving ``dim``-d vectors (default: the default dim) and nothing else;
        the export's root for its default dim unless ``root`` is False."""
        code = ", trust_remote_code=True" if self.layout.trust_remote_code else ""  # the backbone's own code
        if dim is None or (root and dim == self.layout.default_dim) or dim not in self.layout.dim_folders:
            revision = f', revision="{self.revision}"' if self.repo_id and self.revision else ""
            return f'SentenceTransformer("{self.model_ref}"{revision}{code})'
        if self.repo_id:
            return (
                f'SentenceTransformer("{self.repo_id}", revision="{dim_revision(dim, self.revision)}"{code})'
            )
        return f'SentenceTransformer("{self.model_ref}/{self.layout.dim_folders[dim]}"{code})'


# ---------------------------------------------------------------------------------------------
# Facts: collected at export, kept in the folder


def collect_facts(
    cfg: ExperimentConfig | None,
    run_dir: Path | None,
    rows: list[dict],
    source: str | None,
    license: str | None = None,
) -> dict:
    """The card's facts about the run, as plain JSON: config, training summary (of the metrics ``rows``),
    baseline, metadata.

    ``license`` overrides ``export.license``. The card's ``datasets`` are ``export.datasets``, else the
    Hub dataset ids among ``data.train`` (local files are named in the card's text, not dropped).
    """
    ex = cfg.export if cfg is not None else None
    baseline = run_dir / BASELINE_FILE if run_dir is not None else None
    datasets = (
        list(ex.datasets)
        if ex is not None and ex.datasets is not None
        else [s.path for s in cfg.data.train if is_hub_id(s.path)]
        if cfg is not None
        else []
    )
    return {
        "name": cfg.name if cfg is not None else None,
        "config": cfg.to_dict() if cfg is not None else None,
        "source": source,
        "license": license or (ex.license if ex is not None else None),
        "language": list(ex.language) if ex is not None else [],
        "datasets": datasets,
        "training": summarize_training(rows),
        "baseline": _scores(read_json(baseline)) if baseline is not None and baseline.is_file() else None,
    }


def _scores(baseline) -> dict:
    """The ``{metric: {model: score}}`` entries of ``baseline.json`` (not its ``made_from`` stamp)."""
    return {k: v for k, v in baseline.items() if isinstance(v, dict)} if isinstance(baseline, dict) else {}


def save_facts(folder: Path, facts: dict) -> None:
    """Keep ``facts`` in ``folder``'s ``stella_distill.json`` (its other keys untouched)."""
    info = read_info(folder)
    info["card"] = facts
    atomic_write(folder / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())


def load_facts(folder: Path) -> dict:
    """The facts an earlier export kept in ``folder`` (``{}`` for a folder without them)."""
    facts = read_info(folder).get("card")
    return facts if isinstance(facts, dict) else {}


def _config(data: dict | None) -> ExperimentConfig | None:
    if not isinstance(data, dict):
        return None
    try:  # the config as the run resolved it: its models are not looked at again
        return from_dict(data, resolve_models=False)
    except UserError:  # written by another version of stella-distill: the card goes without it
        return None


def card_data(folder: Path, layout: Layout, facts: dict, model_ref: str | None = None) -> CardData:
    """``CardData`` of ``folder``: ``facts``, what the folder offers, and its ``eval.json``.

    ``facts["repo_id"]`` / ``facts["revision"]`` name the Hub repo and branch; ``model_ref`` is what the
    snippets load (default: the Hub repo, else ``folder``).
    """
    repo_id = facts.get("repo_id")
    ref = model_ref or repo_id or str(folder)
    eval_file = Path(folder) / EVAL_FILE
    return CardData(
        name=repo_id or facts.get("name") or Path(ref).name,
        model_ref=ref,
        repo_id=repo_id,
        revision=facts.get("revision") if repo_id else None,
        layout=layout,
        cfg=_config(facts.get("config")),
        source=facts.get("source") or layout.source,
        license=facts.get("license"),
        language=list(facts.get("language") or []),
        datasets=list(facts.get("datasets") or []),
        training=facts.get("training") or {},
        baseline=facts.get("baseline"),
        eval_result=read_json(eval_file) if eval_file.is_file() else None,
    )


def write_model_card(folder: str | Path, data: CardData, rows: list[dict] | None = None) -> Path:
    """Write ``README.md`` into ``folder`` (and a short one into each ``dims/{d}``); returns its path.

    ``metrics_by_dim.png`` is drawn when there are results; ``loss_curve.png`` from ``rows`` (the run's
    metrics, given at export) or kept as the export drew it.
    """
    folder = Path(folder)
    plots = []
    if (rows and plot_loss_curve(rows, folder / LOSS_PLOT)) or (folder / LOSS_PLOT).is_file():
        plots.append(LOSS_PLOT)
    if data.eval_result and plot_metrics_by_dim(data.eval_result, folder / DIM_PLOT, data.baseline):
        plots.append(DIM_PLOT)
    data.plots = tuple(plots)
    atomic_write(folder / CARD_FILE, render(data).encode())
    for dim, sub in data.layout.dim_folders.items():
        if (folder / sub).is_dir():
            atomic_write(folder / sub / CARD_FILE, render_dim_card(data, dim).encode())
    return folder / CARD_FILE


# ---------------------------------------------------------------------------------------------
# The card


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
        _every_dim,
        _transformers_only,
        _citation,
    )
    return "\n".join(line for section in sections for line in section(data))


def render_dim_card(data: CardData, dim: int) -> str:
    """The card of ``dims/{dim}`` (the Hub branch of that dim): what it is, how to load it, its results."""
    main = f"[{data.name}](https://huggingface.co/{data.repo_id})" if data.repo_id else "`../../README.md`"
    lines = [
        *_header(data, dims=[dim], title=f"{data.name} ({dim}-d)"),
        f"The {dim}-dim version of {main}, as a sentence-transformers model of its own: Transformer -> "
        f"Pooling -> Dense({dim}) -> Normalize. Every tool that loads sentence-transformers folders (serving "
        f"stacks included) gets {dim}-d vectors from it with no option to set.",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f"model = {data.load_call(dim, root=False)}",
        "```",
        "",
    ]
    if data.eval_result:
        lines += _eval_table(data.eval_result, dims=[dim]) + [""]
    return "\n".join(lines + [f"Teachers, training, the other dims and citation: {main}.", ""])


def eval_results(result: dict | None, dims: list[int] | None = None) -> list:
    """One huggingface_hub ``EvalResult`` per finite (dim, metric) of an ``eval.json`` result."""
    from huggingface_hub import EvalResult

    out = []
    by_dim = {int(d): m for d, m in ((result or {}).get("dims") or {}).items()}
    for d in sorted(by_dim, reverse=True):
        if dims is not None and d not in dims:
            continue
        for key, value in sorted(by_dim[d].items()):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            family, _, rest = key.partition("/")
            task_type, task_name = TASKS.get(family, (family, family))
            if family == "retrieval":
                dataset, _, metric = rest.rpartition("/")
                metric_type = f"cosine_{metric}"
            elif family == "sts":
                dataset, metric_type = rest, "spearman_cosine"
            elif family == "mteb":
                dataset, metric_type = f"mteb/{rest}", "main_score"
            else:
                dataset, metric_type = "held-out corpus rows", rest
            dataset, _, split = dataset.partition(":")
            out.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=dataset,
                    dataset_name=f"{dataset} dim {d}",
                    dataset_config=f"dim-{d}",  # part of the Hub's key of a result: one per dim
                    dataset_split=split or None,
                    metric_type=metric_type,
                    metric_name=f"{metric_type} (dim {d})",
                    metric_value=round(float(value), 4),
                )
            )
    return out


def _header(data: CardData, dims: list[int] | None = None, title: str | None = None) -> list[str]:
    from huggingface_hub import ModelCardData

    results = eval_results(data.eval_result, dims)
    student = data.cfg.student if data.cfg is not None else None
    meta = ModelCardData(
        model_name=(title or data.name) if results else None,
        base_model=student.model if student is not None and is_hub_id(student.model) else None,
        datasets=data.datasets or None,
        language=data.language or None,
        license=data.license,
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=TAGS.split(),
        metrics=sorted({r.metric_type for r in results}) or None,
        eval_results=results or None,
    )
    return ["---", meta.to_yaml(), "---", "", f"# {title or data.name}", ""]


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
    if data.license:
        facts.append(("license", data.license))
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
        where = "Hub dataset" if is_hub_id(s.path) else "local file"
        extra = (
            f"{where}; split {s.split}{f', subset {s.subset}' if s.subset else ''}, field `{s.text_field}`"
        )
        lines.append(f"- `{s.path}` ({extra}{f', first {s.limit}' if s.limit else ''})")
    if cfg.data.limit:
        lines.append(f"- at most {cfg.data.limit} texts in all")
    return [*lines, ""]


def _stages(data: CardData) -> list[str]:
    cfg = data.cfg
    if cfg is None:
        return []
    world = data.training.get("world_size")
    done = data.training.get("stages") or {}
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
        stage = done.get(str(i)) or {}
        lines.append(
            f"| {s.name} | {trainable} | {steps} | {s.lr:g} | {batch} | "
            f"{w.cosine:g} / {w.similarity:g} / {w.relative_similarity:g} | {mrl} | "
            f"{stage.get('last_step', '')} | {_fmt(stage.get('last_loss'))} |"
        )
    return [*lines, ""]


def _results(data: CardData) -> list[str]:
    lines = ["## Results", ""]
    table = _eval_table(data.eval_result) if data.eval_result else []
    if table:
        lines += ["Evaluation of this folder (`stella-distill evaluate`), per output dim:", "", *table, ""]
    if data.baseline:
        found = {m for scores in data.baseline.values() for m in scores}
        order = {"student_start": 0, "teacher": 1, "target": 2}
        models = sorted(found, key=lambda m: (order.get(m.partition(":")[0], 1), m))
        labels = [
            BASELINE_STYLE.get(m.partition(":")[0], (m,))[0].format(m.partition(":")[2]) for m in models
        ]
        lines += [
            "Before training (`baseline.json` of the run), for scale:",
            "",
            "| metric | " + " | ".join(labels) + " |",
            "|---" * (len(models) + 1) + "|",
            *(
                f"| {k} | " + " | ".join(_fmt(v.get(m)) for m in models) + " |"
                for k, v in data.baseline.items()
            ),
            "",
        ]
    final = data.training.get("final_eval") or {}
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
    if not table and not final:
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
    lines += [f"model = {data.load_call()}  # {data.layout.default_dim}-d vectors"]
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
            "Prompts (`prompt_name=`; a server applies none: put the prompt text before your query yourself):",
            "",
            *(f"- `{k}`: `{_md_escape(v)}`" for k, v in prompts.items()),
        ]
        if data.layout.default_prompt_name:
            lines.append(f"- default prompt: `{data.layout.default_prompt_name}`")
        lines.append("")
    return lines


def _every_dim(data: CardData) -> list[str]:
    layout = data.layout
    if not data.other_dims:
        return []
    lines = [f"### Every output dim ({', '.join(map(str, layout.dims))})", ""]
    if layout.mode == "heads":
        d = data.other_dims[-1]
        lines += [
            f"Each dim has its own trained head (`2_Dense_{{dim}}`). **Do not ask for a smaller dim with "
            f"`truncate_dim`** (nor with a server's `dimensions` parameter): the first {d} values of the "
            f"{layout.default_dim}-d vector are not the {d}-d embedding but another space, and no tool can "
            "tell you so. Load the dim you want as a model of its own:",
            "",
        ]
    else:
        lines += [
            "Every prefix of the full vector is an embedding (Matryoshka truncation): "
            f'`SentenceTransformer("{data.model_ref}", truncate_dim=d)` for any d up to {layout.full_dim}, '
            "and a server's `dimensions=d` gives the same vectors. A model per dim, for tools without such "
            "an option:",
            "",
        ]
    if layout.dim_folders:
        lines += ["| dim | sentence-transformers, any serving stack that loads its folders |", "|---|---|"]
        for d in layout.dims:
            note = " (default)" if d == layout.default_dim else ""
            lines.append(f"| {d}{note} | `{data.load_call(d)}` |")
        where = "a branch of the repo (`revision=`)" if data.repo_id else "a folder under `dims/`"
        lines += [
            "",
            f"Each is {where} holding a complete sentence-transformers model; servers take it the same "
            "way, e.g. `infinity_emb v2 --model-id "
            + (
                f"{data.repo_id} --revision {dim_revision(d, data.revision)}"
                if data.repo_id
                else f"PATH/dims/{d}"
            )
            + f" --served-model-name my-model-{d}`.",
            "",
        ]
    elif layout.mode == "heads":
        d = data.other_dims[0]
        lines += [
            "```python",
            *(["from huggingface_hub import snapshot_download"] if data.repo_id else []),
            "from sentence_transformers import SentenceTransformer",
            "from sentence_transformers.models import Dense",
            "",
            data.path_line,
            "model = SentenceTransformer(path)",
            f'model[2] = Dense.load(f"{{path}}/2_Dense_{d}")  # {d}-d vectors',
            "```",
            "",
        ]
    return lines + [
        "With stella-distill installed: "
        f'`stella_distill.load("{data.model_ref}", dim={data.other_dims[0]})` does the same.',
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


def _eval_table(result: dict, dims: list[int] | None = None) -> list[str]:
    by_dim = {int(d): m for d, m in (result.get("dims") or {}).items() if dims is None or int(d) in dims}
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
