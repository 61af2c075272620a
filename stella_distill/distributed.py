"""Ending a multi-process job (torchrun / accelerate launch) cleanly."""

from __future__ import annotations

import sys


def leave_process_group() -> None:
    """All processes leave the torch.distributed group together (a barrier, then an orderly destroy).

    A gloo group left to interpreter shutdown can abort a process ("terminate called without an
    active exception", exit -6) when a peer that finished first closes its connection: measured on
    2-process CPU precompute runs, 1 in 4 aborted without this, 0 of 24 with it. A no-op when no
    group is initialised (one process, or torch never imported).
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
