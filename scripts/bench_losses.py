"""Benchmark the relative-similarity loss: the exact sub-quadratic form against the O(B^4) naive one.

    python scripts/bench_losses.py                  # CPU, torch's default thread count
    python scripts/bench_losses.py --threads 1
    python scripts/bench_losses.py --device cuda

Prints two tables of forward+backward time (median of --repeats runs after one warm-up):
1. fast vs naive on the same inputs in the same process (CPU: B = 16 ... 128; CUDA: 16 ... 256), what
   ``method="auto"`` picks at each B, and the measured switch point: the largest B up to which naive
   is never slower (``losses.NAIVE_MAX_BATCH`` holds one per device type);
2. fast alone at B = 256 ... 2048, each size in a fresh subprocess that also reports its peak memory
   growth over its own baseline, taken after a warm-up (CPU: peak RSS, reset through
   /proc/self/clear_refs and read as VmHWM, getrusage where that is missing; CUDA:
   torch.cuda.max_memory_allocated).
Inputs: D = 1152 for student and target (a realistic embedding width), the student a noisy copy of
the target.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from stella_distill.losses import naive_max_batch, relative_similarity_loss, relative_similarity_loss_naive

DIM = 1152


def make_inputs(b: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, DIM, generator=g)
    student = target + 0.7 * torch.randn(b, DIM, generator=g)
    return student.to(device), target.to(device)


def fast(student, target):
    return relative_similarity_loss(student, target, method="fast")


def fwd_bwd_seconds(fn, student, target) -> float:
    student = student.detach().requires_grad_()
    if student.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(student, target).backward()
    if student.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(fn, student, target, repeats: int) -> float:
    fwd_bwd_seconds(fn, student, target)  # warm-up
    return statistics.median(fwd_bwd_seconds(fn, student, target) for _ in range(repeats))


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int | None:
    """Reset the peak RSS to the current RSS (Linux: clear_refs 5) and return it; None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_bytes("VmRSS")
    except OSError:
        return None


def one_size(b: int, device: str, repeats: int) -> dict:
    """Measure one batch size; meant to run alone in a fresh process so the peak is its own."""
    student, target = make_inputs(b, device)
    small_s, small_t = make_inputs(64, device)
    fwd_bwd_seconds(fast, small_s, small_t)  # load every kernel before the baseline
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
        if base is None:  # peak since start: an upper bound on the growth would need a reset
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    first = fwd_bwd_seconds(fast, student, target)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        try:
            peak = _proc_status_bytes("VmHWM") - base
        except OSError:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = [first] + [fwd_bwd_seconds(fast, student, target) for _ in range(repeats - 1)]
    return {"b": b, "seconds": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compare", default=None, help="batch sizes for fast vs naive (default: per device, up to 128 / 256)"
    )
    parser.add_argument("--large", default="256,512,1024,2048", help="batch sizes for fast alone")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.device, args.repeats)))
        return

    name = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    print(f"relative_similarity_loss fwd+bwd, D = {DIM}, float32, {name}, torch {torch.__version__}")
    auto_max = naive_max_batch(torch.device(args.device))
    print(f"median of {args.repeats} after a warm-up; method='auto' uses naive for B <= {auto_max}\n")
    print(f"{'B':>6} {'P':>10} {'fast ms':>10} {'naive ms':>10} {'naive/fast':>11} {'auto picks':>11}")
    compare = args.compare or (
        "16,32,48,64,96,128" if args.device == "cpu" else "16,32,64,96,128,160,192,256"
    )
    rows = []
    for b in (int(x) for x in compare.split(",")):
        student, target = make_inputs(b, args.device)
        t_fast = median_seconds(fast, student, target, args.repeats)
        naive_repeats = args.repeats if b < 128 or args.device == "cuda" else 3
        t_naive = median_seconds(relative_similarity_loss_naive, student, target, naive_repeats)
        rows.append({"b": b, "fast_ms": t_fast * 1e3, "naive_ms": t_naive * 1e3})
        pick = "naive" if b <= auto_max else "fast"
        print(
            f"{b:>6} {b * (b - 1) // 2:>10} {t_fast * 1e3:>10.2f} {t_naive * 1e3:>10.2f} "
            f"{t_naive / t_fast:>10.2f}x {pick:>11}"
        )
    # largest measured B up to which naive was never slower than fast
    switch = 0
    for r in rows:
        if r["naive_ms"] > r["fast_ms"]:
            break
        switch = r["b"]
    print(
        f"measured switch point: naive never slower up to B = {switch}; "
        f"method='auto' switches after B = {auto_max} (losses.NAIVE_MAX_BATCH[{args.device!r}])"
    )
    result = {"device": name, "compare": rows, "switch_point": switch, "auto_naive_max_batch": auto_max}

    peak_name = "peak GPU alloc MB" if args.device == "cuda" else "peak RSS growth MB"
    print(f"\n{'B':>6} {'P':>10} {'fast ms':>10} {peak_name:>20}")
    for b in (int(x) for x in args.large.split(",")):
        command = [sys.executable, __file__, "--one", str(b), "--device", args.device]
        command += ["--repeats", str(max(1, min(args.repeats, 3)))]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{b:>6} {b * (b - 1) // 2:>10} {r['seconds'] * 1e3:>10.1f} {r['peak_bytes'] / 2**20:>20.1f}")
        result.setdefault("large", []).append(
            {"b": b, "fast_ms": r["seconds"] * 1e3, "peak_mb": r["peak_bytes"] / 2**20}
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
