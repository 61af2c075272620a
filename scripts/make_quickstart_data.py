#!/usr/bin/env python
"""Rebuild the repo's `data/` folder (quickstart corpus + STS-B dev) from the raw source files.

Sources (`--source`, default `../shared/data` next to the repo): `corpus/wordnet_glosses.txt`,
`corpus/wordnet_examples.txt`, `corpus/fortunes.txt` (Debian `wordnet-base` and `fortunes`, one
text a line) and `stsbenchmark/sts-{train,dev}.csv` (tab-separated: genre, file, year, id, score,
sentence 1, sentence 2, sometimes licence columns after).

What it writes under `--out` (default `data/`):
- `corpus/stsb_train_sentences.txt`: the unique sentences of STS-B train (texts only, no scores);
- `corpus/wordnet_examples.txt`: every WordNet usage example;
- `corpus/wordnet_glosses.txt`: `--glosses` WordNet glosses, evenly spaced over the source file
  (it is ordered by part of speech, so a prefix would be all verbs);
- `corpus/fortunes.txt`: every fortune, one a line;
- `stsbenchmark/sts-dev.csv`: byte-for-byte copy, the development evaluation set;
- the licence files beside what they cover, and `README.md` with the line counts.

Every corpus line is stripped; empty lines, lines already written to an earlier corpus file (files
are written in the order above) and every sentence of STS-B dev (exact match after strip) are dropped,
so evaluating on the dev set never scores text the student was trained on. Deterministic: the same
sources give byte-identical output. Standard library only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LICENCES = {
    "corpus": ["corpus/COPYRIGHT.wordnet", "corpus/COPYRIGHT.fortunes"],
    "stsbenchmark": ["stsbenchmark/LICENSE.txt", "stsbenchmark/readme.txt"],
}


def sts_sentences(path: Path) -> list[str]:
    """Sentences 1 and 2 of every row of an STS-B file, in file order (duplicates kept).

    Split on tabs, not with the csv module: stray quotes in the texts make it merge rows.
    """
    out = []
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 7:
            sys.exit(f"make_quickstart_data: error: {path}:{lineno}: expected >= 7 tab-separated columns")
        out += [cols[5].strip(), cols[6].strip()]
    return out


def _lines(path: Path) -> list[str]:
    # split on newlines only: str.splitlines() also breaks on form feeds and U+2028 inside a text
    return path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")


def read_lines(path: Path) -> list[str]:
    """Stripped, non-empty lines of a text file."""
    return [s for s in (line.strip() for line in _lines(path)) if s]


def evenly_spaced(items: list[str], n: int) -> list[str]:
    """n items spread evenly over the list, in their original order (all of them if n >= len)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def keep_new(lines: list[str], seen: set[str]) -> list[str]:
    """Lines not in `seen` (first occurrence only); adds them to `seen`."""
    out = []
    for s in lines:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def build(source: Path, out: Path, n_glosses: int) -> dict[str, int]:
    """Write data/ from the sources; return {relative file: line count} of the files written."""
    dev = set(sts_sentences(source / "stsbenchmark" / "sts-dev.csv"))
    glosses = keep_new(read_lines(source / "corpus" / "wordnet_glosses.txt"), set())
    raw = {
        "corpus/stsb_train_sentences.txt": sts_sentences(source / "stsbenchmark" / "sts-train.csv"),
        "corpus/wordnet_examples.txt": read_lines(source / "corpus" / "wordnet_examples.txt"),
        "corpus/wordnet_glosses.txt": evenly_spaced(glosses, n_glosses),
        "corpus/fortunes.txt": read_lines(source / "corpus" / "fortunes.txt"),
    }
    seen = set(dev)  # dev sentences count as already seen, so no corpus file takes them
    corpus = {rel: keep_new(lines, seen) for rel, lines in raw.items()}
    dropped_dev = {rel: len(set(lines) & dev) for rel, lines in raw.items()}

    for sub in ("corpus", "stsbenchmark"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for rel, lines in corpus.items():
        (out / rel).write_text("".join(s + "\n" for s in lines), encoding="utf-8")
    shutil.copyfile(source / "stsbenchmark" / "sts-dev.csv", out / "stsbenchmark" / "sts-dev.csv")
    for sub, files in LICENCES.items():
        for rel in files:
            shutil.copyfile(source / rel, out / sub / Path(rel).name)
    # STS-B train sentences sit in corpus/, so its licence goes there too, under a clear name.
    shutil.copyfile(source / "stsbenchmark" / "LICENSE.txt", out / "corpus" / "LICENSE.stsbenchmark")
    counts = {rel: len(lines) for rel, lines in corpus.items()}
    counts["stsbenchmark/sts-dev.csv"] = sum(
        1 for line in _lines(out / "stsbenchmark" / "sts-dev.csv") if line
    )
    (out / "README.md").write_text(readme(out, counts, dropped_dev, n_glosses, len(dev)), encoding="utf-8")
    return counts


def readme(out: Path, counts: dict[str, int], dropped_dev: dict[str, int], n_glosses: int, n_dev: int) -> str:
    """data/README.md: provenance, method and line counts of every shipped file."""
    origin = {
        "corpus/stsb_train_sentences.txt": "STS benchmark `sts-train.csv`: unique sentences (both sentence columns), no scores",
        "corpus/wordnet_examples.txt": "WordNet 3.0 usage examples (Debian `wordnet-base`)",
        "corpus/wordnet_glosses.txt": f"WordNet 3.0 glosses (Debian `wordnet-base`), {n_glosses:,} evenly spaced",
        "corpus/fortunes.txt": "BSD fortune cookies (Debian `fortunes`), one fortune a line",
        "stsbenchmark/sts-dev.csv": "STS benchmark dev split, unchanged (evaluation only)",
    }
    licence = {
        "corpus/stsb_train_sentences.txt": "`corpus/LICENSE.stsbenchmark`",
        "corpus/wordnet_examples.txt": "`corpus/COPYRIGHT.wordnet`",
        "corpus/wordnet_glosses.txt": "`corpus/COPYRIGHT.wordnet`",
        "corpus/fortunes.txt": "`corpus/COPYRIGHT.fortunes`",
        "stsbenchmark/sts-dev.csv": "`stsbenchmark/LICENSE.txt`, `stsbenchmark/readme.txt`",
    }
    rows = []
    for rel, n in counts.items():
        size = (out / rel).stat().st_size / 1e6
        rows.append(f"| `{rel}` | {n:,} | {size:.2f} MB | {origin[rel]} | {licence[rel]} |")
    total = sum(n for rel, n in counts.items() if rel.startswith("corpus/"))
    dropped = ", ".join(f"{n:,} from `{rel}`" for rel, n in dropped_dev.items() if n) or "none"
    return f"""# Data shipped with stella-distill

Real English text for the quickstart (`configs/quickstart.yaml`) and the STS benchmark dev split it
evaluates on, so the quickstart needs nothing but this repository and two PyPI packages.

| file | lines | size | from | licence |
|---|---|---|---|---|
{chr(10).join(rows)}

Corpus total: {total:,} texts, one per line (UTF-8).

How it was made: `python scripts/make_quickstart_data.py --source <raw data> --out data`
rebuilds this folder byte for byte. Every corpus line is stripped; empty lines, repeats of a line
already kept (in the table's order) and all {n_dev:,} distinct sentences of `sts-dev.csv` (exact match
after strip) are dropped, so scoring on STS-B dev never scores text the student was trained on
(dev sentences found and dropped: {dropped}).
STS-B train sentences are in-domain text and a legitimate distillation corpus (no labels are used),
as in sentence-transformers' own distillation examples.

`sts-dev.csv` format: tab-separated genre, file, year, id, score (0-5), sentence 1, sentence 2, and
on some rows licence columns after; split on tabs (the csv module mis-parses the stray quotes).
"""


def main(argv: list[str] | None = None) -> int:
    """Command line: rebuild data/."""
    p = argparse.ArgumentParser(description="Rebuild data/ (quickstart corpus + STS-B dev) from raw sources.")
    p.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data", help="raw data folder")
    p.add_argument(
        "--out", type=Path, default=REPO / "data", help="output folder (default: the repo's data/)"
    )
    p.add_argument("--glosses", type=int, default=40000, help="how many WordNet glosses to keep")
    args = p.parse_args(argv)
    if not (args.source / "stsbenchmark" / "sts-dev.csv").is_file():
        sys.exit(
            f"make_quickstart_data: error: {args.source}: no stsbenchmark/sts-dev.csv there (use --source)"
        )
    counts = build(args.source, args.out, args.glosses)
    for rel, n in counts.items():
        print(f"{n:>7} lines  {args.out / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
