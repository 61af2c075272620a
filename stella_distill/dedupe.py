"""Exact-duplicate removal over a stream of texts in bounded memory: by 64-bit hash, with the texts
themselves compared only where hashes collide.

What is kept is 16 bytes per kept text (its hash and row id) in sorted runs, never the texts (a merge
of runs briefly needs about twice the entries merged, at most 2 x 16 MiB more): a text
whose hash is already taken is compared with the earlier texts behind that hash, which the caller
reads back from wherever it put them (the corpus table). So two different texts that share a hash
both stay, and nothing but a real repeat is dropped. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_RUN_CAP = 1 << 20  # entries (16 MiB); 8 M rows make about 8 capped runs plus O(log) small ones


class Deduper:
    """First occurrences of texts across batches: ``keep = d.first_occurrences(texts, hashes)``, then
    ``d.add(hashes[keep], row_ids)`` for the rows written.

    ``texts_at(rows)`` returns the texts of rows added earlier, in the order asked.
    """

    def __init__(self, texts_at: Callable[[list[int]], list[str]]):
        self._texts_at = texts_at
        # sorted runs of (hashes, rows); a run merges with the last one while it is as long, so there
        # are O(log n) runs to search and every row is re-sorted O(log n) times; runs stop growing at
        # _RUN_CAP entries, so a merge never holds more than two capped runs twice (bounded memory)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def first_occurrences(self, texts: list[str], hashes: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``texts`` equal no earlier text (added before, or earlier in ``texts``)."""
        keep = np.ones(len(texts), dtype=bool)
        unique, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
        taken = self.rows_of(unique)
        # a text whose hash is new and once in the batch stays without a look; the rest, in order
        ask = counts[inverse.ravel()] > 1
        if taken:
            ask |= np.isin(hashes, np.fromiter(taken, dtype=np.uint64, count=len(taken)))
        if not ask.any():
            return keep
        earlier: dict[int, set[str]] = {}
        if taken:
            rows = sorted({r for rs in taken.values() for r in rs})
            by_row = dict(zip(rows, self._texts_at(rows)))
            earlier = {h: {by_row[r] for r in rs} for h, rs in taken.items()}
        here: dict[int, set[str]] = {}
        for k in np.flatnonzero(ask).tolist():
            text, h = texts[k], int(hashes[k])
            if text in earlier.get(h, ()) or text in here.get(h, ()):
                keep[k] = False
            else:
                here.setdefault(h, set()).add(text)
        return keep

    def add(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        """Record kept texts by hash and row id."""
        if len(hashes) == 0:
            return
        order = np.argsort(hashes, kind="stable")
        run = (np.asarray(hashes)[order], np.asarray(rows, dtype=np.int64)[order])
        while self._runs and len(self._runs[-1][0]) <= len(run[0]) < _RUN_CAP:
            h, r = self._runs.pop()
            h, r = np.concatenate([h, run[0]]), np.concatenate([r, run[1]])
            order = np.argsort(h, kind="stable")
            run = (h[order], r[order])
        self._runs.append(run)

    def rows_of(self, queries: np.ndarray) -> dict[int, list[int]]:
        """``{hash: [row, ...]}`` for those of the sorted, distinct hashes ``queries`` that rows added
        earlier have (sorted: the searches walk each run in order)."""
        found: dict[int, list[int]] = {}
        for h, r in self._runs:
            lo = np.searchsorted(h, queries)
            hit = np.flatnonzero(h[np.minimum(lo, len(h) - 1)] == queries)
            start, values = lo[hit], queries[hit]
            stop = np.searchsorted(h, values, side="right")  # stop - start > 1: texts whose hashes collide
            for value, a, b in zip(values.tolist(), start.tolist(), stop.tolist()):
                found.setdefault(value, []).extend(r[a:b].tolist())
        return found
