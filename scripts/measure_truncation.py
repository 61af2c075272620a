"""What `truncate_dim` costs on an export: each dim's own head against prefixes of a bigger head.

For a heads-mode export, per offered dim d (STS-B dev Spearman x 100, through the evaluator `evaluate`
uses): the dim's own head (``dims/{d}``), the first d values of the default head (what
``SentenceTransformer(export, truncate_dim=d)`` returns) and of the full head, and the mean cosine between
the own head's vectors and the default head's prefix on the same sentences (near 0: another space).
Given ``--truncate-export`` (the same run trained with ``student.mrl.mode: truncate``), its prefixes too.

    python scripts/measure_truncation.py --export runs/quickstart/export [--truncate-export runs/qs-trunc/export]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from stella_distill.evalsets import read_sts
from stella_distill.evaluate import spearman_cosine, sts_spearman
from stella_distill.layout import read_layout

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", required=True, help="heads-mode export folder with dims/")
    p.add_argument("--truncate-export", default=None, help="the same run trained in truncate mode")
    p.add_argument("--sts", default=str(ROOT / "data" / "stsbenchmark" / "sts-dev.csv"))
    args = p.parse_args()
    from sentence_transformers import SentenceTransformer

    s1, s2, scores = pairs = read_sts(args.sts)
    texts = list(dict.fromkeys(s1 + s2))
    export = Path(args.export)
    layout = read_layout(export)
    default = SentenceTransformer(str(export), device="cpu")
    full = SentenceTransformer(str(export / "dims" / str(layout.full_dim)), device="cpu")
    cut_default = default.encode(texts, prompt="")
    cut_full = full.encode(texts, prompt="")
    index = {t: i for i, t in enumerate(texts)}
    rows1, rows2 = [index[t] for t in s1], [index[t] for t in s2]

    def score(vectors: np.ndarray, d: int) -> float:
        return spearman_cosine(vectors[rows1, :d], vectors[rows2, :d], scores)

    truncate = SentenceTransformer(args.truncate_export, device="cpu") if args.truncate_export else None
    header = f"| dim | own head (dims/d) | prefix of the {layout.default_dim}-d head | prefix of the {layout.full_dim}-d head"
    header += " | cosine own vs prefix |" + (" truncate-mode run |" if truncate is not None else "")
    print(f"{args.sts}, {len(scores)} pairs; {export} ({layout.mode} mode)\n")
    print(header)
    print("|---" * (6 if truncate is not None else 5) + "|")
    for d in layout.dims:
        own = SentenceTransformer(str(export / "dims" / str(d)), device="cpu")
        own_score = sts_spearman(own, pairs, prompt_name=None)
        vectors = own.encode(texts, prompt="")
        cells = [f"{own_score:.2f}"]
        cells.append(f"{score(cut_default, d):.2f}" if d <= layout.default_dim else "-")
        cells.append(f"{score(cut_full, d):.2f}")
        if d <= layout.default_dim and d != layout.default_dim:
            a = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
            b = cut_default[:, :d] / np.linalg.norm(cut_default[:, :d], axis=1, keepdims=True)
            cells.append(f"{float(np.mean(np.sum(a * b, axis=1))):.3f}")
        else:
            cells.append("-")
        if truncate is not None:
            cells.append(f"{sts_spearman(truncate, pairs, truncate_dim=d):.2f}")
        print(f"| {d} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
