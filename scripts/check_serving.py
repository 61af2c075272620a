"""Serve an export with a real serving stack (infinity-emb) and check it returns our vectors at every dim.

infinity-emb runs in a virtual environment of its own (it pins sentence-transformers < 4, numpy < 2 and
transformers <= 5.0, so it cannot share this project's); this script starts its server on localhost with
one model per dim, the way its users ask for a dim:

- ``dims/{d}/`` served as its own model (``--model-id EXPORT/dims/{d} --served-model-name NAME-{d}``),
  queried with ``POST /embeddings {"model": "NAME-{d}", "input": [...]}`` (its OpenAI-compatible route);
- the export's root with ``"dimensions": d``, infinity's Matryoshka option: right for a truncate-mode
  export, and for a heads-mode one the trap the card warns about (another space than the dim's head).

Reference: sentence-transformers in this process, ``SentenceTransformer(EXPORT/dims/{d})`` (and
``truncate_dim`` on the root). Servers apply no prompt, so a prompted check sends the prompt text
inside the input and compares with ``prompt_name``. Exit status 1 if a served dim's vectors are not
the library's (min cosine < 0.999).

    python3 -m venv /tmp/infinity-venv
    /tmp/infinity-venv/bin/pip install torch==2.13.0            # the CPU wheel, before anything pulls CUDA
    /tmp/infinity-venv/bin/pip install "infinity-emb[server,torch]==0.0.78"
    python scripts/check_serving.py --infinity /tmp/infinity-venv/bin/infinity_emb --export runs/quickstart/export
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STS_DEV = ROOT / "data" / "stsbenchmark" / "sts-dev.csv"
FALLBACK = [
    "A man is playing a guitar.",
    "Distillation trains a small model to imitate a large one.",
    "The river flows to the sea.",
    "a",
]


def texts(n: int) -> list[str]:
    """``n`` real sentences (STS-B dev, first column pairs), or a few fixed ones without the data."""
    if not STS_DEV.is_file():
        return FALLBACK
    out = []
    for line in STS_DEV.read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        out += cols[5:7] if len(cols) >= 7 else []
    return list(dict.fromkeys(out))[:n]


def post(port: int, body: dict) -> np.ndarray:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/embeddings",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        data = json.loads(response.read())["data"]
    return np.asarray([row["embedding"] for row in sorted(data, key=lambda r: r["index"])], dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def start(infinity: str, models: list[tuple[str, str]], port: int, log: Path) -> subprocess.Popen:
    args = [infinity, "v2", "--port", str(port), "--device", "cpu", "--engine", "torch", "--no-model-warmup"]
    for path, name in models:
        args += ["--model-id", path, "--served-model-name", name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
    env.pop("PYTHONPATH", None)  # the server's venv, nothing of ours
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_ready(server: subprocess.Popen, port: int, log: Path, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if server.poll() is not None:
            sys.exit(f"infinity exited with {server.returncode}; its log:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return time.perf_counter() - t0
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit(f"infinity not ready after {timeout:.0f} s; its log:\n{log.read_text()[-3000:]}")


def check(export: Path, infinity: str, port: int, n: int, timeout: float) -> bool:
    from sentence_transformers import SentenceTransformer

    info = json.loads((export / "stella_distill.json").read_text())
    dims = sorted((int(p.name) for p in (export / "dims").iterdir()), reverse=True)
    st_cfg = json.loads((export / "config_sentence_transformers.json").read_text())
    prompt_name, prompt = next(((k, v) for k, v in st_cfg["prompts"].items() if v), (None, None))
    sentences = texts(n)
    models = [(str(export), "root")] + [(str(export / "dims" / str(d)), f"dim-{d}") for d in dims]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"infinity-{os.getpid()}.log"
    t0 = time.perf_counter()
    server = start(infinity, models, port, log)
    try:
        ready = wait_ready(server, port, log, timeout)
        print(f"\n{export}: {info['mrl_mode']} mode, dims {dims}, default {info['default_dim']}; "
              f"infinity ready {ready:.1f} s after start, {len(sentences)} texts")  # fmt: skip
        print(
            f"{'dim':>6}  {'how it is asked for':<44} {'got':>5} {'min cos':>8} {'mean cos':>8}  as the library"
        )
        ok = True
        root = SentenceTransformer(str(export), device="cpu")
        got = post(port, {"model": "root", "input": sentences})
        rows = [
            (
                "root",
                'model "root" (the export folder)',
                got,
                root.encode(sentences, prompt="", truncate_dim=got.shape[1]),
                True,
            )
        ]
        for d in dims:
            plain = SentenceTransformer(str(export / "dims" / str(d)), device="cpu")
            want = plain.encode(sentences, prompt="")  # the dim's own embedding, as the library computes it
            rows.append(
                (
                    d,
                    f'model "dim-{d}" (dims/{d})',
                    post(port, {"model": f"dim-{d}", "input": sentences}),
                    want,
                    True,
                )
            )
            if prompt is not None:
                got = post(port, {"model": f"dim-{d}", "input": [prompt + s for s in sentences]})
                rows.append(
                    (
                        d,
                        f'model "dim-{d}", {prompt_name} text in the input',
                        got,
                        plain.encode(sentences, prompt_name=prompt_name),
                        True,
                    )
                )
            if d < info["full_dim"]:
                got = post(port, {"model": "root", "input": sentences, "dimensions": d})
                rows.append(
                    (d, f'model "root", "dimensions": {d}', got, want, info["mrl_mode"] == "truncate")
                )
        for d, how, got, want, must in rows:
            c = cosines(got, want) if got.shape == want.shape else np.array([np.nan])
            good = bool(c.min() >= 0.999)
            ok &= good or not must
            mark = (
                ("yes" if good else "NO")
                if must
                else ("no: another space (the card's warning)" if not good else "yes")
            )
            print(f"{d:>6}  {how:<44} {got.shape[1]:>5} {c.min():8.4f} {c.mean():8.4f}  {mark}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"{export}: {'every dim served as the library computes it' if ok else 'MISMATCH'} "
          f"({time.perf_counter() - t0:.1f} s in all)")  # fmt: skip
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", action="append", required=True, help="export folder with dims/ (repeatable)")
    p.add_argument("--infinity", default=shutil.which("infinity_emb"), help="infinity_emb executable")
    p.add_argument("--port", type=int, default=7997)
    p.add_argument("--texts", type=int, default=256, help="sentences per request (STS-B dev)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server")
    args = p.parse_args()
    if not args.infinity:
        sys.exit("infinity_emb not found: pass --infinity /path/to/venv/bin/infinity_emb (see the docstring)")
    version = subprocess.run([str(Path(args.infinity).with_name("python")), "-c",
                              "import infinity_emb, sentence_transformers as s, transformers as t, torch;"
                              "print(infinity_emb.__version__, s.__version__, t.__version__, torch.__version__)"],
                             capture_output=True, text=True).stdout.split()  # fmt: skip
    if version:
        print(
            "server side: infinity-emb {}, sentence-transformers {}, transformers {}, torch {}".format(
                *version
            )
        )
    import sentence_transformers
    import torch
    import transformers

    print(f"reference:   sentence-transformers {sentence_transformers.__version__}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")  # fmt: skip
    results = [check(Path(e), args.infinity, args.port, args.texts, args.timeout) for e in args.export]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
