"""The figures of a model card: the training loss, and each metric against the output dim with the
teachers' ceiling and the student's start drawn beside it.

matplotlib runs headless (Agg) and is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

from stella_distill.files import replaced_atomically

LOSS_PLOT = "loss_curve.png"
DIM_PLOT = "metrics_by_dim.png"
# How the scores measured before training (baseline.json) are drawn: label, line style, colour.
BASELINE_STYLE = {
    "target": ("teachers' target (ceiling)", "--", "tab:red"),
    "teacher": ("teacher {}", ":", "tab:gray"),
    "student_start": ("student before training", "-.", "black"),
}


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


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_metrics_by_dim(result: dict, path: str | Path, baseline: dict | None = None) -> Path | None:
    """One panel per metric of an ``eval.json`` result, metric against output dim; None without metrics.

    ``baseline`` (``{metric: {"target" | "teacher:NAME" | "student_start": score}}``, as ``stella-distill
    run`` writes in ``baseline.json``) adds a horizontal line per score to that metric's panel: the
    teachers' ceiling and where the student started.
    """
    by_dim = {int(d): m for d, m in (result.get("dims") or {}).items()}
    names = sorted({k for m in by_dim.values() for k, v in m.items() if _finite(v)})
    if not names:
        return None
    plt = _pyplot()
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), dpi=110, squeeze=False)
    dims = sorted(by_dim)
    for ax, name in zip(axes.flat, names):
        xs = [d for d in dims if _finite(by_dim[d].get(name))]
        ax.set_title(name, fontsize=9)
        ax.plot(xs, [by_dim[d][name] for d in xs], marker="o", label="student")
        for model, score in ((baseline or {}).get(name) or {}).items():
            if not _finite(score):
                continue
            kind, _, teacher = model.partition(":")
            label, style, colour = BASELINE_STYLE.get(kind, (model, ":", "tab:gray"))
            ax.axhline(score, linestyle=style, color=colour, linewidth=1, label=label.format(teacher))
        if len(xs) > 1 and min(xs) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(d) for d in xs])
        ax.set_xlabel("dim")
        ax.grid(alpha=0.3)
        if (baseline or {}).get(name):
            ax.legend(fontsize=7)
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
    try:
        with replaced_atomically(Path(path)) as tmp:  # a reader never sees half a PNG
            fig.savefig(tmp, format="png")
    finally:
        _pyplot().close(fig)
    return Path(path)
