"""STS scoring speed: `evaluate`'s path (sentence-transformers' EmbeddingSimilarityEvaluator) against the
obvious alternative (encode each unique sentence once, cosine and Spearman in numpy), same model, same run.

The evaluator encodes both columns as they are (duplicates included); the alternative encodes the unique
sentences once. Runs alternate and each side keeps its best of ``--repeats``, so that load from other jobs
hurts both alike. The scores must agree (printed: the largest difference).

    python scripts/bench_evaluate.py --model runs/quickstart/export/dims/128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stella_distill.evalsets import read_sts
from stella_distill.evaluate import spearman_cosine, sts_spearman

ROOT = Path(__file__).resolve().parents[1]


def unique_then_numpy(model, s1: list[str], s2: list[str], scores, batch_size: int) -> float:
    texts = list(dict.fromkeys(s1 + s2))
    vectors = model.encode(texts, batch_size=batch_size, show_progress_bar=False)
    index = {t: i for i, t in enumerate(texts)}
    return spearman_cosine(vectors[[index[t] for t in s1]], vectors[[index[t] for t in s2]], scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a sentence-transformers folder (an export or dims/<d>)")
    p.add_argument("--sts", default=str(ROOT / "data" / "stsbenchmark" / "sts-dev.csv"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from sentence_transformers import SentenceTransformer

    s1, s2, scores = read_sts(args.sts)
    model = SentenceTransformer(args.model, device="cpu")
    best = {"evaluator": float("inf"), "unique + numpy": float("inf")}
    values = {}
    for _ in range(args.repeats):
        for name in best:
            t = time.perf_counter()
            if name == "evaluator":
                values[name] = sts_spearman(model, (s1, s2, scores), args.batch_size)
            else:
                values[name] = unique_then_numpy(model, s1, s2, scores, args.batch_size)
            best[name] = min(best[name], time.perf_counter() - t)
    print(f"{args.model}: {len(scores)} pairs, {len(set(s1 + s2))} unique sentences, batch {args.batch_size}")
    for name, seconds in best.items():
        print(f"  {name:<15} {seconds:7.2f} s  Spearman {values[name]:.4f}")
    ratio = best["unique + numpy"] / best["evaluator"]
    diff = abs(values["evaluator"] - values["unique + numpy"])
    print(f"  evaluator speed / alternative: {ratio:.2f}x; scores differ by {diff:.2e}")


if __name__ == "__main__":
    main()
