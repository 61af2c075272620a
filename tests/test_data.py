"""Corpus loading: every source format, limits, skip counts, file:line errors, the fingerprint."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stella_distill.config import DataConfig, SourceConfig, from_dict
from stella_distill.data import Corpus, load_corpus
from stella_distill.errors import UserError
from stella_distill.fingerprints import corpus_fingerprint, text_hashes


def _corpus(*sources: dict, log=None, cache_dir=None, **data) -> Corpus:
    cfg = DataConfig(train=[SourceConfig(**s) for s in sources], **data)
    lines: list[str] = []
    corpus = load_corpus(cfg, log=lines.append, cache_dir=cache_dir)
    if log is not None:
        log.extend(lines)
    return corpus


def _texts(*sources: dict, **data) -> list[str]:
    return list(_corpus(*sources, **data).texts)


def _write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def test_text_hashes_are_blake2b_prefixes():
    hashes = text_hashes(["a", "héllo"])
    for text, h in zip(["a", "héllo"], hashes):
        want = int.from_bytes(hashlib.blake2b(text.encode("utf-8")).digest()[:8], "little")
        assert int(h) == want
    assert hashes.dtype == np.uint64
    assert corpus_fingerprint(hashes) == hashlib.sha256(hashes.astype("<u8").tobytes()).hexdigest()


def test_every_format_reads_the_same_texts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = ["first text", "second, with a comma", 'third "quoted"', "  inner  spaces kept  "]
    txt = _write(tmp_path / "c.txt", "\n".join(want) + "\n")
    jsonl = _write(
        tmp_path / "c.jsonl", "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(want))
    )
    json_list = _write(tmp_path / "c.json", json.dumps([{"body": t} for t in want], indent=1))
    json_lines = _write(tmp_path / "l.json", "".join(json.dumps({"body": t}) + "\n" for t in want))
    pq.write_table(pa.table({"body": want, "n": list(range(4))}), tmp_path / "c.parquet")
    import csv

    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        w.writerows([i, t] for i, t in enumerate(want))
    for path, field in [
        (txt, "text"),
        (jsonl, "body"),
        (json_list, "body"),
        (json_lines, "body"),
        (str(tmp_path / "c.parquet"), "body"),
        (str(tmp_path / "c.csv"), "body"),
    ]:
        corpus = _corpus({"path": path, "text_field": field})
        assert list(corpus.texts) == want, path
        assert corpus.fingerprint == corpus_fingerprint(text_hashes(want))


def test_compressed_text_formats_read_like_the_plain_files(tmp_path):
    import bz2
    import gzip
    import lzma

    want = ["first text", "héllo wörld, with a comma", 'third "quoted"']
    jsonl = "".join(json.dumps({"body": t}) + "\n" for t in want).encode()
    files = {
        "c.txt.gz": (gzip.compress(("\n".join(want) + "\n").encode()), "text"),
        "c.jsonl.bz2": (bz2.compress(jsonl), "body"),
        "c.json.xz": (lzma.compress(json.dumps([{"body": t} for t in want]).encode()), "body"),
        "c.CSV.GZ": (gzip.compress(("body\n" + "\n".join(f'"{t}"' if "," in t else t for t in want.copy()) + "\n")
                                   .replace('"third "quoted""', '"third ""quoted"""').encode()), "body"),
    }  # fmt: skip
    for name, (data, field) in files.items():
        path = _write(tmp_path / name, data)
        assert _texts({"path": path, "text_field": field}) == want, name
    # a folder picks compressed files up too, in name order
    folder = tmp_path / "folder"
    folder.mkdir()
    _write(folder / "a.txt.gz", gzip.compress(b"one\ntwo\n"))
    _write(folder / "b.txt", "three\n")
    _write(folder / "notes.gz", gzip.compress(b"no inner format: not a data file\n"))
    assert _texts({"path": str(folder)}) == ["one", "two", "three"]

    truncated = _write(tmp_path / "cut.jsonl.gz", gzip.compress(jsonl * 50)[:-30])
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz: cannot decompress .*is the file complete\?"):
        _corpus({"path": truncated, "text_field": "body"})
    fake = _write(tmp_path / "fake.txt.gz", "plain text, not gzip\n")
    with pytest.raises(UserError, match=r"fake\.txt\.gz: cannot decompress"):
        _corpus({"path": fake})
    with pytest.raises(UserError, match=r"fake\.json\.xz: cannot decompress"):
        _corpus({"path": _write(tmp_path / "fake.json.xz", b"{}")})
    with pytest.raises(UserError, match=r"unsupported file type '\.parquet\.gz'"):
        _corpus({"path": _write(tmp_path / "c.parquet.gz", gzip.compress(b"x"))})


def test_tsv_texts_keep_their_quote_marks(tmp_path):
    """TSV has no quoting: a text that starts with a quote mark, or holds an unmatched one, is kept
    as written and never swallows the following rows."""
    want = ['"Quoted" at the start', 'an "unclosed quote here', "plain", 'ends with a quote"']
    path = _write(tmp_path / "c.tsv", "id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(want)))
    assert _texts({"path": path}) == want


def test_saved_dataset_folder_and_folder_of_files(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x one", "x two"]}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"dev": datasets.Dataset.from_dict({"text": ["d one"]})}).save_to_disk(
        str(tmp_path / "dd")
    )
    (tmp_path / "files").mkdir()
    _write(tmp_path / "files" / "b.txt", "b1\nb2\n")
    _write(tmp_path / "files" / "a.jsonl", '{"text": "a1"}\n')
    assert _texts({"path": str(tmp_path / "saved")}) == ["x one", "x two"]
    assert _texts({"path": str(tmp_path / "dd"), "split": "dev"}) == ["d one"]
    with pytest.raises(UserError, match=r"data.train.0.split: 'train' is not a split .*dev"):
        _corpus({"path": str(tmp_path / "dd")})
    assert _texts({"path": str(tmp_path / "files")}) == ["a1", "b1", "b2"]


def test_concatenation_limits_dedupe_and_the_summary_line(tmp_path):
    a = _write(tmp_path / "a.txt", "a1\n\n   \na2\na3\nshared\n")
    b = _write(
        tmp_path / "b.jsonl",
        '{"text": "b1"}\n{"text": null}\n{"text": 5}\n{"text": ""}\n{"text": "shared"}\n',
    )
    log: list[str] = []
    corpus = _corpus({"path": a}, {"path": b}, log=log)
    assert list(corpus.texts) == ["a1", "a2", "a3", "shared", "b1", "shared"]
    assert corpus.stats["skipped_empty"] == 3 and corpus.stats["skipped_non_string"] == 2
    assert corpus.stats["read"] == 11
    assert [s["kept"] for s in corpus.stats["sources"]] == [4, 2]
    assert len(log) == 1
    assert "6 texts from 2 source(s)" in log[0]
    assert "skipped 3 empty or whitespace-only and 2 non-string" in log[0]

    deduped = _corpus({"path": a}, {"path": b}, dedupe=True, log=log)
    assert list(deduped.texts) == ["a1", "a2", "a3", "shared", "b1"]
    assert deduped.stats["duplicates_dropped"] == 1 and "dropped 1 duplicates" in log[-1]

    assert _texts({"path": a, "limit": 2}, {"path": b, "limit": 1}) == ["a1", "a2", "b1"]
    assert _texts({"path": a}, {"path": b}, limit=5) == ["a1", "a2", "a3", "shared", "b1"]


def test_texts_are_kept_as_they_are_except_the_trailing_newline(tmp_path):
    path = _write(tmp_path / "c.txt", " lead and trail \r\nsecond\tline\nlast without newline")
    assert _texts({"path": path}) == [" lead and trail ", "second\tline", "last without newline"]
    jsonl = _write(tmp_path / "c.jsonl", json.dumps({"text": "two\nlines\n"}) + "\n")
    assert _texts({"path": jsonl}) == ["two\nlines"]


def test_fingerprint_follows_content_not_how_it_is_split(tmp_path):
    one = _write(tmp_path / "one.txt", "t1\nt2\nt3\n")
    first = _write(tmp_path / "first.txt", "t1\n")
    rest = _write(tmp_path / "rest.jsonl", '{"text": "t2"}\n{"text": "t3"}\n')
    changed = _write(tmp_path / "changed.txt", "t1\nt2\nt3!\n")
    whole = _corpus({"path": one})
    split = _corpus({"path": first}, {"path": rest})
    assert whole.fingerprint == split.fingerprint
    assert np.array_equal(whole.row_hashes, split.row_hashes)
    assert _corpus({"path": changed}).fingerprint != whole.fingerprint
    assert _corpus({"path": one}, limit=2).fingerprint != whole.fingerprint


@pytest.mark.parametrize(
    "name, content, field, message",
    [
        ("c.jsonl", '{"text": "ok"}\n{"text": "a",}\n', "text", r"c\.jsonl:2: invalid JSON \("),
        (
            "c.jsonl",
            '{"text": "ok"}\n["a list"]\n',
            "text",
            r"c\.jsonl:2: expected a JSON object .*got a list",
        ),
        (
            "c.jsonl",
            '{"text": "ok"}\n{"text": "ok"}\n{"body": "x", "id": 3}\n',
            "text",
            r"c\.jsonl:3: no field 'text' \(data\.train\.0\.text_field\).*error, not a skip.*has: body, id",
        ),
        ("c.json", '[{"text": "ok"}, {"txt": "no"}]', "text", r"c\.json: item 1: no field 'text'"),
        ("c.json", '[{"text": "ok"},\n {"text": }]', "text", r"c\.json:2: invalid JSON"),
        ("c.csv", "id,body\n1,x\n", "text", r"c\.csv:1: no column 'text' .*header has: id, body"),
        ("c.csv", "id,text\n1,x\n2\n", "text", r"c\.csv:3: row has 1 columns, so no 'text'"),
        ("c.txt", b"fine\nbad \xff byte\n", "text", r"c\.txt:2: not UTF-8 text"),
        ("c.jsonl", b'{"text": "ok"}\n{"text": "\xe9"}\n', "text", r"c\.jsonl:2: not UTF-8 text"),
        ("c.txt", "\n  \n\t\n", "text", r"data\.train: the corpus is empty after reading 3 rows \(3 empty"),
        ("c.xml", "<a/>", "text", r"unsupported file type '\.xml'"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, content, field, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(UserError, match=message):
        _corpus({"path": path, "text_field": field})


def test_missing_file_and_unreachable_hub_dataset(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"data\.train\.0\.path: .*nope\.jsonl: file not found"):
        _corpus({"path": str(tmp_path / "nope.jsonl")})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        UserError, match=r"data\.train\.1\.path: 'no-org/no-such-set' does not exist locally and the "
    ):
        _corpus({"path": _write(tmp_path / "a.txt", "a\n")}, {"path": "no-org/no-such-set"})


def test_a_folder_of_split_files_gives_the_configured_split_only(tmp_path):
    """A dataset repository's files (data/train-*.parquet, data/test-*.parquet) must not mix splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for name, texts in [("train-00000-of-00002", ["t1", "t2"]), ("train-00001-of-00002", ["t3"]),
                        ("test-00000-of-00001", ["leak"]), ("validation-00000-of-00001", ["v1"]),
                        ("unsupervised-00000-of-00001", ["u1"])]:  # fmt: skip
        pq.write_table(pa.table({"text": texts}), repo / "data" / f"{name}.parquet")
    assert _texts({"path": str(repo)}) == ["t1", "t2", "t3"]
    assert _texts({"path": str(repo), "split": "dev"}) == ["v1"]
    assert _texts({"path": str(repo), "split": "unsupervised"}) == ["u1"]  # any split name the config gives
    with pytest.raises(
        UserError, match=r"data\.train\.0\.split: 'extra': .* splits test, train, unsupervised, validation"
    ):
        _corpus({"path": str(repo), "split": "extra"})
    _write(repo / "data" / "notes.txt", "stray\n")
    with pytest.raises(
        UserError, match=r"holds files of the splits .* and files that name no split \(data/notes\.txt\)"
    ):
        _corpus({"path": str(repo)})
    # split folders work the same
    (tmp_path / "by_dir" / "train").mkdir(parents=True)
    (tmp_path / "by_dir" / "test").mkdir()
    _write(tmp_path / "by_dir" / "train" / "a.txt", "kept\n")
    _write(tmp_path / "by_dir" / "test" / "a.txt", "leak\n")
    assert _texts({"path": str(tmp_path / "by_dir")}) == ["kept"]
    # ordinary names that merely contain a split word are not splits: every file is read
    (tmp_path / "plain").mkdir()
    for name, text in [("faq.txt", "a"), ("training-manual.txt", "b"), ("unit-testing-notes.txt", "c")]:
        _write(tmp_path / "plain" / name, text + "\n")
    assert _texts({"path": str(tmp_path / "plain")}) == ["a", "b", "c"]
    # a plain file and its compressed copy side by side would be read twice
    import gzip

    _write(tmp_path / "plain" / "faq.txt.gz", gzip.compress(b"a\n"))
    with pytest.raises(UserError, match=r"holds both faq\.txt and faq\.txt\.gz; keep one of them"):
        _corpus({"path": str(tmp_path / "plain")})
    # the same name in two different subfolders is two files, not a copy
    (tmp_path / "two" / "x").mkdir(parents=True)
    (tmp_path / "two" / "y").mkdir()
    _write(tmp_path / "two" / "x" / "a.txt", "first\n")
    _write(tmp_path / "two" / "y" / "a.txt.gz", gzip.compress(b"second\n"))
    assert _texts({"path": str(tmp_path / "two")}) == ["first", "second"]


def test_quoted_tsv_is_detected_and_quoting_can_be_forced(tmp_path):
    """pandas / the csv module quote TSV fields that hold quotes; raw TSV never doubles them."""
    import csv

    want = ['He said "hi" today', "plain", 'ends with "quote"']
    quoted = tmp_path / "pandas.tsv"
    with quoted.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["id", "text"])
        w.writerows([i, t] for i, t in enumerate(want))
    assert '"He said ""hi"" today"' in quoted.read_text()
    assert _texts({"path": str(quoted)}) == want
    raw = _write(tmp_path / "raw.tsv", "text\n" + "\n".join(want) + "\n")
    assert _texts({"path": raw}) == want
    assert _texts({"path": raw, "quoting": "none"}) == want
    assert _texts({"path": str(quoted), "quoting": "none"})[0] == '"He said ""hi"" today"'


def test_hub_sources_stream_when_a_limit_caps_them_and_record_their_commit(tmp_path, monkeypatch):
    """A Hub source with a limit (its own or data.limit) streams only the rows it needs; the commit its
    revision resolves to is what is read and what the corpus table records; a table is reused while
    that commit stays, rebuilt when the branch moves, and reused with a note when the Hub is out of reach."""
    import datasets
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    pulled = []

    def rows():
        for i in range(10_000):
            pulled.append(i)
            yield {"text": "" if i == 1 else f"row {i}", "id": i}

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, revision=None, **kwargs):
        calls.append((path, name, split, streaming, revision))
        if streaming:
            return datasets.IterableDataset.from_generator(rows)
        return datasets.Dataset.from_list([{"text": "all", "id": 0}])

    commits = {"org/web-corpus": "a" * 40}
    asked = []

    def fake_dataset_info(self, repo_id, revision=None, **kwargs):
        asked.append((repo_id, revision))
        if repo_id not in commits:
            raise OfflineModeIsEnabled("offline")
        return type("Info", (), {"sha": commits[repo_id]})()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", fake_dataset_info)
    cache, log = tmp_path / "cache", []
    src = {"path": "org/web-corpus", "limit": 5}
    corpus = _corpus(src, cache_dir=cache, log=log)
    assert list(corpus.texts) == ["row 0", "row 2", "row 3", "row 4", "row 5"]  # the empty row is skipped
    assert calls == [("org/web-corpus", None, "train", True, "a" * 40)]
    assert len(pulled) < 100, len(pulled)
    manifest = json.loads((corpus.path.parent / "corpus.json").read_text())
    assert manifest["identities"] == [{"hub": "org/web-corpus", "commit": "a" * 40}]

    assert list(_corpus(src, cache_dir=cache, log=log).texts) == list(corpus.texts)
    assert len(calls) == 1 and "(sources unchanged)" in log[-1]  # reused: nothing loaded again
    commits["org/web-corpus"] = "b" * 40
    _corpus(src, cache_dir=cache, log=log)
    assert calls[-1][4] == "b" * 40 and len(calls) == 2
    assert f"org/web-corpus moved from commit {'a' * 40} to {'b' * 40}" in log[-1]
    assert f"data.train.0.revision: {'a' * 40} to keep the old corpus" in log[-1]
    del commits["org/web-corpus"]  # the Hub cannot be asked
    _corpus(src, cache_dir=cache, log=log)
    assert len(calls) == 2 and "cannot ask the Hub where org/web-corpus is now" in log[-2]
    pinned = {**src, "revision": "c" * 40}
    n_asked = len(asked)
    _corpus(pinned)
    assert calls[-1][4] == "c" * 40 and len(asked) == n_asked  # a commit needs no question

    assert _texts({"path": "org/small"}) == ["all"] and calls[-1][3] is False  # no limit: downloaded
    assert calls[-1][4] is None  # offline: unresolved, left to the datasets library
    _corpus({"path": "org/small"}, limit=3)
    assert calls[-1][3] is True  # data.limit caps it too
    _corpus({"path": "org/small", "limit": 3, "streaming": False})
    assert calls[-1][3] is False  # as configured
    with pytest.raises(
        UserError,
        match=r"data\.train\.0\.text_field: no column 'body' in org/web-corpus \(columns: text, id\)",
    ):
        _corpus({"path": "org/web-corpus", "limit": 5, "text_field": "body"})


def _cli(tmp_path: Path, data: dict) -> subprocess.CompletedProcess:
    cfg = {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "data": data,
        "teachers": [{"name": "t", "model": str(tmp_path / "no-model")}],
    }
    (tmp_path / "no-model").mkdir()  # an empty folder: the corpus error comes first, no model is loaded
    from_dict(cfg)
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "stella_distill", "precompute", str(tmp_path / "cfg.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("case", ["bad_json", "missing_file"])
def test_cli_exits_2_with_one_line_for_corpus_errors(tmp_path, case):
    if case == "bad_json":
        path = _write(tmp_path / "corpus.jsonl", '{"text": "ok"}\n' * 16 + '{"text": oops}\n')
        want = "corpus.jsonl:17: invalid JSON ("
    else:
        path = str(tmp_path / "missing.txt")
        want = f"data.train.0.path: {path}: file not found"
    proc = _cli(tmp_path, {"train": [{"path": path}]})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("stella-distill precompute: error: ") and want in lines[0]


def test_split_rows_equals_the_plain_permutation_split():
    """The held-out split is what it always was (sorted halves of one seeded permutation), so runs
    and their held-out rows stay the same."""
    from stella_distill.data import split_rows

    rng = np.random.default_rng(0)
    for n, fraction, limit, seed in [
        (1000, 0.1, None, 1),
        (1000, 0.0, 37, 2),
        (500, 0.3, 20, 3),
        (1, 0.5, None, 4),
        (9_000_000, 0.001, None, 5),  # more than one block of the row-id fill
    ]:
        valid = rng.random(n) > 0.2
        rows = np.flatnonzero(valid)
        n_eval = int(round(len(rows) * fraction))
        if limit is not None:
            n_eval = min(n_eval, limit) if fraction > 0 else limit
        n_eval = min(n_eval, max(len(rows) - 1, 0))
        perm = np.random.default_rng(seed + 7919).permutation(len(rows))
        train, held = split_rows(valid, fraction, limit, seed)
        assert np.array_equal(held, np.sort(rows[perm[:n_eval]])) and len(held) == n_eval
        assert np.array_equal(train, np.sort(rows[perm[n_eval:]])) and train.dtype == np.int32
