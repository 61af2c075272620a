"""Distillation losses of Jasper/Stella: pure functions of ``(student, target)``.

Reference: Zhang, Li, Zeng, Wang, "Jasper and Stella: distillation of SOTA embedding models"
(arXiv:2412.19048), the losses section of the distillation stages: ``L_cosine``, ``L_sim`` and
``L_resim`` (relative similarity distillation loss).

Every function takes ``student`` ``(B, D_s)`` and ``target`` ``(B, D_t)`` of any float dtype,
L2-normalises both rows-wise itself, computes in float32 at least (float64 stays float64) and returns
a 0-dim tensor in that compute dtype. Gradients flow to ``student`` (and, for the cosine and similarity
losses, to ``target`` too if it requires them; the ranking loss treats the teacher order as labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Largest batch, per device type, for which ``relative_similarity_loss(method="auto")`` uses the
# O(B^4) naive form: up to it the naive broadcast is as fast as the exact fast form, whose cost at
# small B is a fixed one (a few hundred small ops and three host syncs: ~2 ms on CPU, ~10 ms on a
# GPU, where every op is a kernel launch). Measured with scripts/bench_losses.py, which prints the
# switch point of the device it runs on: CPU (2 cores) naive 2.5 ms vs fast 2.25 ms at B = 32, 50 vs
# 3.5 at 64; H200 naive 2.2-2.4 ms for B = 32..128 vs fast ~10 ms, and on an H100 naive 13 ms at
# B = 192. Devices not listed take the CPU value.
NAIVE_MAX_BATCH = {"cpu": 32, "cuda": 128}


def naive_max_batch(device: torch.device) -> int:
    """The ``method="auto"`` switch point for ``device`` (``NAIVE_MAX_BATCH``)."""
    return NAIVE_MAX_BATCH.get(device.type, NAIVE_MAX_BATCH["cpu"])


def _prepare(student: torch.Tensor, target: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if student.dim() != 2 or target.dim() != 2:
        raise ValueError(
            f"{name}: student and target must be 2-D (B, D); got shapes {tuple(student.shape)} "
            f"and {tuple(target.shape)}"
        )
    if student.shape[0] != target.shape[0]:
        raise ValueError(
            f"{name}: student and target batch sizes differ ({student.shape[0]} vs {target.shape[0]})"
        )
    if student.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    dtype = torch.promote_types(torch.promote_types(student.dtype, target.dtype), torch.float32)
    return F.normalize(student.to(dtype), dim=-1), F.normalize(target.to(dtype), dim=-1)


def cosine_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between each student vector and its target.

    ``L = (1/B) * sum_i (1 - s_i . t_i)`` with ``s_i``, ``t_i`` the L2-normalised rows.

    Shapes: ``student`` ``(B, D)``, ``target`` ``(B, D)`` (dims must match); returns a 0-dim tensor.
    Reference: arXiv:2412.19048, losses section, ``L_cosine``.
    """
    if student.dim() == 2 and target.dim() == 2 and student.shape[1] != target.shape[1]:
        raise ValueError(
            f"cosine_loss needs equal dims: student dim {student.shape[1]} != target dim {target.shape[1]} "
            "(use similarity_loss / relative_similarity_loss for reduced-dim heads)"
        )
    s, t = _prepare(student, target, "cosine_loss")
    return (1.0 - (s * t).sum(dim=-1)).mean()


def similarity_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the in-batch similarity matrices of student and target.

    ``L = (1/B^2) * sum_{i,j} (s_i . s_j - t_i . t_j)^2``, i.e. ``mean((S S^T - T T^T)^2)`` with
    ``S``, ``T`` the row-normalised matrices.

    Shapes: ``student`` ``(B, D_s)``, ``target`` ``(B, D_t)`` (dims may differ); returns a 0-dim tensor.
    Reference: arXiv:2412.19048, losses section, ``L_sim``.
    """
    s, t = _prepare(student, target, "similarity_loss")
    return (s @ s.T - t @ t.T).pow(2).mean()


def _pair_scores(student: torch.Tensor, target: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangle in-batch scores: ``(P,)`` student (with grad) and ``(P,)`` target (no grad)."""
    s, t = _prepare(student, target, name)
    b = s.shape[0]
    i, j = torch.triu_indices(b, b, offset=1, device=s.device)
    with torch.no_grad():
        t_pairs = (t @ t.T)[i, j]
    return (s @ s.T)[i, j], t_pairs


def _ranking_hinge_naive(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    # rows p, columns q: hinge relu(S_q - S_p + m), counted where the teacher ranks p above q
    hinge = torch.relu(s.unsqueeze(0) - s.unsqueeze(1) + margin)
    mask = t.unsqueeze(1) > t.unsqueeze(0)
    n = mask.sum()
    return torch.where(mask, hinge, 0.0).sum() / n.clamp(min=1).to(hinge.dtype)


def relative_similarity_loss_naive(
    student: torch.Tensor, target: torch.Tensor, margin: float = 0.015
) -> torch.Tensor:
    """The relative-similarity loss written directly over all pairs of pairs: O(B^4) time and memory.

    Same formula and contract as :func:`relative_similarity_loss`; kept as the reference the fast
    form is checked against and benchmarked with. Needs ``P^2`` floats (P = B(B-1)/2) several times
    over: about 1 GB at B = 128 in float32, out of memory near B = 200.
    """
    s, t = _pair_scores(student, target, "relative_similarity_loss_naive")
    return _ranking_hinge_naive(s, t, margin)


def relative_similarity_loss(
    student: torch.Tensor, target: torch.Tensor, margin: float = 0.015, *, method: str = "auto"
) -> torch.Tensor:
    """Pair-ranking hinge loss: the student must order text pairs the way the teacher does.

    With the L2-normalised rows ``s_i``, ``t_i``, every text pair ``p = (i, j)``, ``i < j``
    (``P = B(B-1)/2`` pairs) gets the scores ``S_p = s_i . s_j`` and ``T_p = t_i . t_j``. Over every
    ordered pair of pairs ``(p, q)`` with ``T_p > T_q`` (strictly: teacher ties contribute nothing)::

        L = (1/N) * sum_{(p, q): T_p > T_q} relu(S_q - S_p + margin),   N = #{(p, q): T_p > T_q}

    ``L = 0`` (still connected to ``student`` in the graph, with zero gradient) when no such ``(p, q)``
    exists: ``B < 3`` or all teacher scores tied.

    Shapes: ``student`` ``(B, D_s)``, ``target`` ``(B, D_t)`` (dims may differ); returns a 0-dim tensor.
    No gradient flows to ``target``: its order acts as labels.
    Reference: arXiv:2412.19048, losses section, ``L_resim`` (CoSENT-style).

    ``method``: ``"fast"`` gives the same value and gradient (the same float comparisons, so hinges
    exactly at their kink agree too) without ever building a ``P x P`` tensor: O(P log P) time, O(P)
    memory (see ``_dominance``). ``"naive"`` is :func:`relative_similarity_loss_naive`. ``"auto"``
    (default) takes the naive form for ``B <= naive_max_batch(device)``, where it is as fast or faster.
    """
    if method not in ("auto", "fast", "naive"):
        raise ValueError(f"relative_similarity_loss: unknown method {method!r}; expected auto, fast or naive")
    s, t = _pair_scores(student, target, "relative_similarity_loss")
    if method == "naive" or (method == "auto" and student.shape[0] <= naive_max_batch(student.device)):
        return _ranking_hinge_naive(s, t, margin)
    if s.numel() < 2:
        return s.sum() * 0.0
    return _PairRankingHinge.apply(s, t, float(margin))


# --- exact O(P log P) pair-ranking hinge ---------------------------------------------------------


def _hinge_on(s_q: torch.Tensor, s_p: torch.Tensor, margin: float) -> torch.Tensor:
    # the naive test relu(s_q - s_p + m) > 0 written the same way, so kinks agree bit for bit
    return (s_q - s_p) + margin > 0


def _first_true(values, lo, hi, pred, x, span: int):
    """Per query i: first j in [lo_i, hi_i) with ``pred(values[j], x_i)``, else hi_i.

    ``pred`` must be monotone (false then true) along every range; a vectorised binary search of
    ``span.bit_length()`` steps, where ``span >= max(hi - lo)``.
    """
    lo, hi = lo.clone(), hi.clone()
    for _ in range(max(span, 1).bit_length()):
        active = lo < hi
        mid = (lo + hi) >> 1
        hit = pred(values[mid.clamp(max=values.numel() - 1)], x)
        hi = torch.where(active & hit, mid, hi)
        lo = torch.where(active & ~hit, mid + 1, lo)
    return hi


def _exact_rank(sorted_vals: torch.Tensor, x: torch.Tensor, pred, threshold: torch.Tensor, margin: float):
    """Per query i: first index j of ascending ``sorted_vals`` with ``pred(sorted_vals[j], x_i)``.

    ``threshold`` is ``pred``'s boundary rounded once, so ``searchsorted`` on it is right but for
    values within a few ulps of it: those queries are found and settled by a binary search with
    ``pred`` itself, between bounds a safe slack apart.
    """
    n = sorted_vals.numel()
    k = torch.searchsorted(sorted_vals, threshold, right=True)
    too_high = (k > 0) & pred(sorted_vals[(k - 1).clamp(min=0)], x)
    too_low = (k < n) & ~pred(sorted_vals[k.clamp(max=n - 1)], x)
    wrong = (too_high | too_low).nonzero().squeeze(1)
    if wrong.numel():
        thr = threshold[wrong]
        slack = 8 * torch.finfo(sorted_vals.dtype).eps * (float(thr.abs().max()) + abs(margin) + 1.0)
        lo = torch.searchsorted(sorted_vals, thr - slack, right=True)
        hi = torch.searchsorted(sorted_vals, thr + slack, right=True)
        k[wrong] = _first_true(sorted_vals, lo, hi, pred, x[wrong], int((hi - lo).max()))
    return k


def _argsort(x: torch.Tensor, stable: bool = False) -> torch.Tensor:
    """``argsort`` of a float32/float64 tensor through order-preserving integer keys.

    Flipping the magnitude bits of negative floats makes their bit patterns sort as signed integers
    in float order (-0.0 just before +0.0); torch sorts integers several times faster than floats on CPU.
    """
    bits = x.view(torch.int32 if x.dtype == torch.float32 else torch.int64)
    magnitude = (1 << (8 * x.element_size() - 1)) - 1
    return torch.argsort(bits ^ ((bits >> (8 * x.element_size() - 1)) & magnitude), stable=stable)


def _tie_groups(ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ascending ``ts``: index of the first and one past the last element equal to each element."""
    pos = torch.arange(ts.numel(), device=ts.device)
    new = torch.ones_like(ts, dtype=torch.bool)
    new[1:] = ts[1:] != ts[:-1]
    start = torch.where(new, pos, 0).cummax(dim=0).values
    last = torch.ones_like(new)
    last[:-1] = new[1:]
    end = torch.where(last, pos + 1, ts.numel()).flip(0).cummin(dim=0).values.flip(0)
    return start, end


def _dominance(t: torch.Tensor, s: torch.Tensor, margin: float):
    """Exact hinge counts of the pair-ranking loss, in O(P log P) time and O(P) memory.

    For every p (``t``, ``s`` of shape ``(P,)``), in the input order:

    - ``below_p = #{q : t_q < t_p, relu(s_q - s_p + margin) > 0}`` (p ranked above q, hinge on);
    - ``above_p = #{r : t_r > t_p, relu(s_p - s_r + margin) > 0}`` (p ranked below r, hinge on);

    and ``N = sum_p #{q : t_q < t_p}``, the number of (p, q) the loss averages over.

    How: elements are laid out in t order (ties by s) and padded to n = 2^k. Going down a segment
    tree over that layout (segments of L = n, n/2, ..., 2), every segment keeps its elements sorted by
    s, and every element keeps the insertion index of its hinge threshold (``s_p - margin`` for q below,
    ``s_p + margin`` for r above) among its own segment's sorted scores. Per level, a cumulative count
    of the left-half elements along each sorted segment answers every "how many left-half (earlier in
    t) elements are on my hinge" by one lookup; a stable partition then splits each segment into its
    halves, still sorted, and the insertion indices follow by the same lookup (fractional cascading).
    Each earlier element is met at exactly one level. Earlier elements with an equal t are then taken
    out within each tie group, where the order by s makes them one contiguous range.
    """
    p_len, dev = t.numel(), s.device
    order = _argsort(t)
    group_start, group_end = _tie_groups(t[order])
    largest_tie = int((group_end - group_start).max()) - 1
    if largest_tie > 0:  # ties in t: order them by s, so each group's hinge partners are contiguous
        order = _argsort(s, stable=True)
        order = order[_argsort(t[order], stable=True)]
    a = s[order]
    n = 1 << (p_len - 1).bit_length()

    slots = _argsort(a)  # slot -> element; every segment's slots sorted by s
    sorted_a = a[slots]

    def insertion_index(pred, threshold):
        # queried in sorted order (cache friendly), then handed to the elements; padding queries nothing
        k = torch.zeros(n, dtype=torch.long, device=dev)
        return k.index_put_((slots,), _exact_rank(sorted_a, sorted_a, pred, threshold, margin))

    # k_lo: first slot whose q has its hinge on below p; k_up: first slot whose r has it off above p
    k_lo = insertion_index(lambda v, x: _hinge_on(v, x, margin), sorted_a - margin)
    k_up = insertion_index(lambda v, x: ~_hinge_on(x, v, margin), sorted_a + margin)
    # padding: after every real element in t order and above every threshold in s order
    slots = F.pad(slots, (0, n - p_len))
    slots[p_len:] = torch.arange(p_len, n, device=dev)
    below = torch.zeros(n, dtype=torch.long, device=dev)
    above = torch.zeros(n, dtype=torch.long, device=dev)

    seg_len = n
    while seg_len > 1:
        # rows are segments; columns are positions, for elements (t order) and for slots (s order)
        h, shape = seg_len // 2, (n // seg_len, seg_len)
        seg_slots = slots.view(shape)
        slot_is_left = (seg_slots & h) == 0
        lefts = F.pad(slot_is_left.cumsum(dim=1), (1, 0))  # lefts[g, i]: among the first i slots

        # a right element counts the left ones on its hinge, a left element the right ones; then every
        # element moves its insertion index into its own half
        k = k_lo.view(shape)
        lefts_before = lefts.gather(1, k)
        below.view(shape)[:, h:] += h - lefts_before[:, h:]
        k[:, h:] -= lefts_before[:, h:]
        k[:, :h] = lefts_before[:, :h]
        k = k_up.view(shape)
        lefts_before = lefts.gather(1, k)
        above.view(shape)[:, :h] += k[:, :h] - lefts_before[:, :h]
        k[:, h:] -= lefts_before[:, h:]
        k[:, :h] = lefts_before[:, :h]

        # stable partition of every segment's slots into its left half, then its right half
        before = lefts[:, :-1]
        dest = torch.where(slot_is_left, before, h + torch.arange(seg_len, device=dev) - before)
        slots = torch.empty_like(seg_slots).scatter_(1, dest, seg_slots).view(-1)
        seg_len = h

    below, above = below[:p_len], above[:p_len]
    if largest_tie > 0:
        pos = torch.arange(p_len, device=dev)
        # inside a tie group a ascends: the tied q before p with the hinge on are [first, p) ...
        first = _first_true(a, group_start, pos, lambda v, x: _hinge_on(v, x, margin), a, largest_tie)
        below = below - (pos - first)
        # ... and the tied r after p with the hinge on are (p, stop)
        stop = _first_true(a, pos + 1, group_end, lambda v, x: ~_hinge_on(x, v, margin), a, largest_tie)
        above = above - (stop - pos - 1)

    def unsort(x):
        out = torch.empty_like(x)
        out[order] = x
        return out

    return unsort(below), unsort(above), group_start.sum()


class _PairRankingHinge(torch.autograd.Function):
    """``(1/N) sum_{p,q: t_p > t_q} relu(s_q - s_p + m)`` on pair-score vectors ``s``, ``t`` ``(P,)``.

    With the hinge counts of :func:`_dominance`, every active (p, q) adds ``s_q - s_p + m``; summing
    by element, p appears with ``-s_p`` in its ``below_p`` terms and with ``+s_p`` in its ``above_p``:

        L = (1/N) sum_p (s_p (above_p - below_p) + m below_p),   dL/ds_p = (above_p - below_p) / N.

    Comparisons run in float64 for float64 input, else float32; the sum in float64 (counts are exact).
    No gradient for ``t``.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
        work = torch.float64 if s.dtype == torch.float64 else torch.float32
        acc = torch.float32 if s.device.type == "mps" else torch.float64
        below, above, n = _dominance(t.detach().to(work), s.detach().to(work), margin)
        n = n.clamp(min=1).to(acc)
        slope = (above - below).to(acc)
        total = (s.detach().to(acc) * slope).sum() + margin * below.sum().to(acc)
        ctx.save_for_backward((slope / n).to(s.dtype))
        return (total / n).to(s.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (grad_s,) = ctx.saved_tensors
        return grad_s * grad_out, None, None
