"""A fork server for the reliability suite: import the heavy libraries once, fork one child per job.

Every CLI run of the suite (dozens, many of them killed with SIGKILL) would otherwise pay 5-8 s of
importing torch, transformers and accelerate on a 2-core machine. This process imports them once and
then, for each job read from stdin (one JSON object a line), forks a child that runs
``stella_distill.cli.main(argv)`` exactly as ``python -m stella_distill`` does (``sys.exit(main())``:
an exception that escapes is printed as a traceback and gives exit 1). The child's stdout and stderr
go to files; the parent answers ``{"pid": ...}`` at once and ``{"rc": ...}`` when the child ends
(negative: killed by that signal).

No torch operation runs before ``fork``, so no thread pool is copied into a child in a bad state.

A job may name a ``fault``: a test-only way to make a write fail with ENOSPC inside the child
(the product has no such hook; this patches the library functions the child calls):

- ``{"kind": "pwrite", "after": N}``: ``os.pwrite`` of the cache writes half its bytes and then
  fails from the (N+1)-th call on (a disk that fills up in the middle of a shard).
- ``{"kind": "pwrite_pause", "after": N, "seconds": S}``: from the (N+1)-th call on, ``os.pwrite`` of
  the cache writes all its bytes and then sleeps S seconds (a slow disk: it holds a shard's rows on
  disk without their record long enough for a kill to land there on any machine).
- ``{"kind": "torch_save_pause", "after": N, "seconds": S}``: from the (N+1)-th call on, ``torch.save``
  saves and then sleeps S seconds (a slow disk under a checkpoint write: its temp folder stays in
  flight long enough for a kill to land there).
- ``{"kind": "torch_save", "after": N}``: ``torch.save`` fails from the (N+1)-th call on after writing
  a few bytes (a disk that fills up in the middle of a checkpoint).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback


def _preload() -> None:
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from accelerate import Accelerator  # noqa: F401
    from transformers import AutoModel, AutoTokenizer, BertModel, BertTokenizer  # noqa: F401

    import stella_distill.cli  # noqa: F401
    import stella_distill.export  # noqa: F401
    import stella_distill.precompute  # noqa: F401
    import stella_distill.train  # noqa: F401


def _install_fault(fault: dict) -> None:
    kind, after = fault["kind"], int(fault["after"])
    calls = [0]

    def full(path: str) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    if kind == "pwrite":
        import stella_distill.cache as cache

        real = os.pwrite

        def pwrite(fd, data, offset):
            calls[0] += 1
            if calls[0] > after:
                half = memoryview(data)[: len(data) // 2]
                if len(half):
                    real(fd, half, offset)
                raise full(os.readlink(f"/proc/self/fd/{fd}"))
            return real(fd, data, offset)

        cache.os = _OsProxy(pwrite)
    elif kind == "pwrite_pause":
        import time

        import stella_distill.cache as cache

        real, seconds = os.pwrite, float(fault["seconds"])

        def pwrite(fd, data, offset):
            calls[0] += 1
            written = real(fd, data, offset)
            if calls[0] > after:
                time.sleep(seconds)
            return written

        cache.os = _OsProxy(pwrite)
    elif kind == "torch_save":
        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] > after:
                with open(f, "wb") as out:
                    out.write(b"PK\x03\x04 partial")
                raise full(str(f))
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif kind == "torch_save_pause":
        import time

        import torch

        real_save, seconds = torch.save, float(fault["seconds"])

        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            out = real_save(obj, f, *args, **kwargs)
            if calls[0] > after:
                time.sleep(seconds)
            return out

        torch.save = save
    else:
        raise ValueError(f"unknown fault {kind!r}")


class _OsProxy:
    """``os`` with one function replaced (only for the module that imported it as ``os``)."""

    def __init__(self, pwrite):
        self.pwrite = pwrite

    def __getattr__(self, name):
        return getattr(os, name)


def _child(job: dict) -> None:
    code = 1
    try:
        os.chdir(job.get("cwd") or os.getcwd())
        os.environ.update(job.get("env") or {})
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, job["out"]), (2, job["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        if job.get("fault"):
            _install_fault(job["fault"])
        from stella_distill.cli import main

        sys.argv = ["stella-distill", *job["argv"]]
        try:
            code = main(job["argv"])
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def main() -> None:
    _preload()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        for path in (job["out"], job["err"]):
            open(path, "w").close()  # exists even if the child is killed before it opens it
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(job)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
