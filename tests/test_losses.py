"""The distillation losses against naive references written here, not taken from the module."""

from __future__ import annotations

import time

import pytest
import torch

from stella_distill.losses import (
    NAIVE_MAX_BATCH,
    cosine_loss,
    naive_max_batch,
    relative_similarity_loss,
    relative_similarity_loss_naive,
    similarity_loss,
)

MARGIN = 0.015


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small tensors: a second thread only adds waits on a shared, busy CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- references ----------------------------------------------------------------------------------


def ref_normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=1, keepdim=True)


def ref_cosine(student, target):
    s, t = ref_normalize(student), ref_normalize(target)
    b = s.shape[0]
    return sum(1.0 - torch.dot(s[i], t[i]) for i in range(b)) / b


def ref_similarity(student, target):
    s, t = ref_normalize(student), ref_normalize(target)
    b = s.shape[0]
    terms = [(torch.dot(s[i], s[j]) - torch.dot(t[i], t[j])) ** 2 for i in range(b) for j in range(b)]
    return sum(terms) / (b * b)


def ref_pairs(b: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(b) for j in range(i + 1, b)]


def ref_pair_scores(x: torch.Tensor) -> torch.Tensor:
    """Score of every text pair (i < j), row by row, without a Gram matrix."""
    pairs = ref_pairs(x.shape[0])
    first, second = [i for i, _ in pairs], [j for _, j in pairs]
    return (x[first] * x[second]).sum(dim=1)


def ref_relative_loops(student, target, margin=MARGIN):
    """Literal definition: python loops over every ordered pair of text pairs."""
    s, t = ref_normalize(student), ref_normalize(target)
    pairs = ref_pairs(s.shape[0])
    s_score = {p: torch.dot(s[p[0]], s[p[1]]) for p in pairs}
    t_score = {p: float(torch.dot(t[p[0]], t[p[1]])) for p in pairs}
    terms = [
        torch.relu(s_score[q] - s_score[p] + margin) for p in pairs for q in pairs if t_score[p] > t_score[q]
    ]
    if not terms:
        return student.sum() * 0.0
    return torch.stack(terms).mean()


def ref_relative(student, target, margin=MARGIN, chunk=1024):
    """Broadcast definition in float64, chunked over p so B = 128 fits; returns (value, d value/d student).

    The gradient comes from autograd on each chunk's sum, accumulated on the pair-score leaf.
    """
    student = student.detach().double().requires_grad_()
    s_pairs = ref_pair_scores(ref_normalize(student))
    t_pairs = ref_pair_scores(ref_normalize(target.detach()))
    leaf = s_pairs.detach().requires_grad_()
    grad = torch.zeros_like(leaf)
    total, count = 0.0, 0
    for start in range(0, leaf.numel(), chunk):
        higher = t_pairs[start : start + chunk, None] > t_pairs[None, :]
        hinge = torch.relu(leaf[None, :] - leaf[start : start + chunk, None] + margin)
        part = (hinge * higher).sum()
        grad += torch.autograd.grad(part, leaf)[0]
        total += part.item()
        count += int(higher.sum())
    if count == 0:
        return 0.0, torch.zeros_like(student)
    (g_student,) = torch.autograd.grad(s_pairs, student, grad_outputs=grad / count)
    return total / count, g_student


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def value_and_grad(fn, student, target, **kwargs):
    student = student.detach().clone().requires_grad_()
    loss = fn(student, target, **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def make(b, d_s, d_t, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, d_t, generator=g, dtype=torch.float64)
    # a student correlated with the target when dims agree, as after some training
    student = torch.randn(b, d_s, generator=g, dtype=torch.float64)
    if d_s == d_t:
        student = target + 0.7 * student
    return student.to(dtype), target.to(dtype)


# --- cosine and similarity -----------------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 5, 17])
def test_cosine_loss_value_and_gradients(b):
    student, target = make(b, 12, 12, seed=b)
    student.requires_grad_()
    target.requires_grad_()
    loss = cosine_loss(student, target)
    ref = ref_cosine(student, target)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert rel_err(loss, ref) <= 1e-12
    for got, want in zip(
        torch.autograd.grad(loss, (student, target)), torch.autograd.grad(ref, (student, target))
    ):
        assert rel_err(got, want) <= 1e-12


def test_cosine_loss_of_identical_and_opposite_vectors():
    x = torch.randn(4, 8, dtype=torch.float64)
    assert abs(float(cosine_loss(x, 3.0 * x))) < 1e-12
    assert abs(float(cosine_loss(x, -x)) - 2.0) < 1e-12


def test_cosine_loss_dim_mismatch_names_both_dims():
    with pytest.raises(ValueError, match=r"student dim 12 != target dim 24"):
        cosine_loss(torch.randn(3, 12), torch.randn(3, 24))


@pytest.mark.parametrize("fn", [cosine_loss, similarity_loss, relative_similarity_loss])
def test_losses_reject_bad_shapes(fn):
    with pytest.raises(ValueError, match="batch sizes differ"):
        fn(torch.randn(3, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.randn(8), torch.randn(8))


@pytest.mark.parametrize("b", [1, 6, 19])
def test_similarity_loss_value_and_gradients_with_different_dims(b):
    student, target = make(b, 10, 23, seed=100 + b)
    student.requires_grad_()
    target.requires_grad_()
    loss = similarity_loss(student, target)
    ref = ref_similarity(student, target)
    assert loss.dim() == 0
    assert rel_err(loss, ref) <= 1e-12
    for got, want in zip(
        torch.autograd.grad(loss, (student, target)), torch.autograd.grad(ref, (student, target))
    ):
        assert rel_err(got, want) <= 1e-12


def test_similarity_loss_is_zero_for_rotated_student():
    target = torch.randn(9, 6, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert float(similarity_loss(2.0 * target @ rotation, target)) < 1e-25


@pytest.mark.parametrize("fn", [cosine_loss, similarity_loss])
def test_low_precision_inputs_compute_in_float32(fn):
    student, target = make(8, 16, 16, seed=3)
    s16 = student.to(torch.bfloat16).requires_grad_()
    loss = fn(s16, target.to(torch.bfloat16))
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, s16)
    assert grad.dtype == torch.bfloat16
    ref = fn(s16.detach().double(), target.to(torch.bfloat16).double())
    assert rel_err(loss, ref) <= 1e-5


# --- relative similarity -------------------------------------------------------------------------


def test_relative_similarity_hand_computed_example():
    # student / target Gram matrices with pair scores (0,1), (0,2), (1,2) = S (.2, .5, .4), T (.9, .5, .1):
    # (p, q) with T_p > T_q: relu(.5 - .2 + m) + relu(.4 - .2 + m) + relu(.4 - .5 + m) = .315 + .215 + 0
    def vectors(a, b, c):
        gram = torch.tensor([[1.0, a, b], [a, 1.0, c], [b, c, 1.0]], dtype=torch.float64)
        return torch.linalg.cholesky(gram)

    student, target = vectors(0.2, 0.5, 0.4), vectors(0.9, 0.5, 0.1)
    for method in ("fast", "naive", "auto"):
        loss = relative_similarity_loss(student, target, 0.015, method=method)
        assert abs(float(loss) - 0.53 / 3) < 1e-12, method


def test_references_agree():
    for seed in range(3):
        student, target = make(6, 5, 4, seed=seed)
        loops, loops_grad = value_and_grad(ref_relative_loops, student, target)
        value, grad = ref_relative(student, target, chunk=4)
        assert abs(float(loops) - value) <= 1e-12 * abs(value)
        assert rel_err(grad, loops_grad) <= 1e-12


@pytest.mark.parametrize("method", ["fast", "auto", "naive"])
@pytest.mark.parametrize("b", [1, 2, 3, 4, 7, 33])
def test_relative_similarity_matches_reference(b, method):
    for seed in range(3):
        for margin in (MARGIN, 0.0, 0.2):
            student, target = make(b, 9, 14, seed=1000 * b + seed)
            loss, grad = value_and_grad(
                relative_similarity_loss, student, target, margin=margin, method=method
            )
            ref, ref_grad = ref_relative(student, target, margin)
            assert loss.dtype == torch.float64 and loss.dim() == 0
            assert abs(float(loss) - ref) <= 1e-9 * max(abs(ref), 1e-300)
            if b < 3:  # no pair of pairs: zero, through the graph
                assert ref == 0.0 and float(grad.abs().max()) == 0.0
            else:
                assert rel_err(grad, ref_grad) <= 1e-9


def test_relative_similarity_b128_float64():
    student, target = make(128, 48, 40, seed=7)
    ref, ref_grad = ref_relative(student, target, chunk=256)
    loss, grad = value_and_grad(relative_similarity_loss, student, target)
    assert abs(float(loss) - ref) <= 1e-6 * ref
    assert rel_err(grad, ref_grad) <= 1e-6


def signs(b: int, d: int, seed: int) -> torch.Tensor:
    """Rows of +-1 with d a power of 4: normalised entries are +-1/sqrt(d), exact, so every pair score
    is an exact multiple of 1/d however it is summed - ties are ties for any implementation."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (b, d), generator=g).double() * 2 - 1


def duplicated_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    half = x.shape[0] // 2
    x[half : 2 * half] = x[:half].clone()
    return x


@pytest.mark.parametrize(
    "case", ["quantised_target", "duplicated_target_rows", "quantised_both_at_kinks", "duplicated_both"]
)
def test_relative_similarity_teacher_ties(case):
    margin = MARGIN
    for b in (5, 12, 40):
        student, _ = make(b, 6, 3, seed=b)
        target = signs(b, 16, seed=b)  # 17 possible pair scores: large tie groups
        if case == "duplicated_target_rows":
            target = duplicated_rows(target)
        elif case == "quantised_both_at_kinks":
            # student scores are multiples of 1/16 too, and margin 2/16 puts many hinges exactly at 0
            student, margin = signs(b, 16, seed=b + 1), 0.125
        elif case == "duplicated_both":
            target, student = duplicated_rows(target), duplicated_rows(student)
        ref, ref_grad = ref_relative(student, target, margin)
        for method in ("fast", "naive"):
            loss, grad = value_and_grad(
                relative_similarity_loss, student, target, margin=margin, method=method
            )
            assert abs(float(loss) - ref) <= 1e-9 * ref, (case, b, method)
            assert rel_err(grad, ref_grad) <= 1e-9, (case, b, method)


def test_relative_similarity_float_ties_fast_equals_naive():
    # duplicated real-valued teacher rows: whether their pair scores tie depends on rounding in the Gram
    # matrix, so here the two module forms (same Gram matrix) must agree with each other exactly
    for b in (12, 41):
        student, target = make(b, 10, 7, seed=b)
        target = duplicated_rows(target)
        fast, fast_grad = value_and_grad(relative_similarity_loss, student, target, method="fast")
        naive, naive_grad = value_and_grad(relative_similarity_loss, student, target, method="naive")
        assert abs(float(fast) - float(naive)) <= 1e-12 * float(naive)
        assert rel_err(fast_grad, naive_grad) <= 1e-12


@pytest.mark.parametrize("method", ["fast", "naive"])
def test_relative_similarity_all_teacher_scores_tied_is_zero_with_gradient_path(method):
    student = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    target = torch.ones(30, 16, dtype=torch.float64)  # every pair score exactly 1.0
    loss = relative_similarity_loss(student, target, method=method)
    assert loss.requires_grad and float(loss.detach()) == 0.0
    loss.backward()
    assert float(student.grad.abs().max()) == 0.0


@pytest.mark.parametrize("b", [1, 2])
def test_relative_similarity_tiny_batch_is_zero_with_gradient_path(b):
    student = torch.randn(b, 8, requires_grad=True)
    loss = relative_similarity_loss(student, torch.randn(b, 8), method="fast")
    assert loss.requires_grad and float(loss.detach()) == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert float(student.grad.abs().max()) == 0.0


def test_relative_similarity_identical_student_and_target():
    target, _ = make(45, 16, 16, seed=11)
    ref, ref_grad = ref_relative(target, target)
    loss, grad = value_and_grad(relative_similarity_loss, target, target.clone(), method="fast")
    assert abs(float(loss) - ref) <= 1e-9 * ref
    assert rel_err(grad, ref_grad) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["fast", "naive"])
def test_relative_similarity_low_precision_inputs(dtype, method):
    student, target = make(48, 32, 24, seed=5, dtype=dtype)
    loss, grad = value_and_grad(relative_similarity_loss, student, target, method=method)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # reference on the very same (rounded) inputs, in float64
    ref, ref_grad = ref_relative(student.double(), target.double())
    assert abs(float(loss) - ref) <= 1e-6 * ref
    # float32 scores may flip a hinge sitting within rounding of its kink; bfloat16 rounds the gradient
    assert rel_err(grad.double(), ref_grad) <= (1e-3 if dtype == torch.float32 else 1e-2)


def test_relative_similarity_fast_agrees_with_naive_in_float32():
    student, target = make(96, 64, 64, seed=9, dtype=torch.float32)
    fast, fast_grad = value_and_grad(relative_similarity_loss, student, target, method="fast")
    naive, naive_grad = value_and_grad(relative_similarity_loss_naive, student, target)
    # both make the same float32 comparisons; only the summation order differs
    assert abs(float(fast) - float(naive)) <= 1e-5 * float(naive)
    assert rel_err(fast_grad, naive_grad) <= 1e-5


def test_relative_similarity_target_gets_no_gradient():
    student, target = make(40, 8, 8, seed=2)
    student.requires_grad_()
    target.requires_grad_()
    for method in ("fast", "naive"):
        loss = relative_similarity_loss(student, target, method=method)
        grad_s, grad_t = torch.autograd.grad(loss, (student, target), allow_unused=True)
        assert grad_s is not None and grad_t is None


def test_relative_similarity_auto_dispatch_and_bad_method():
    cpu = naive_max_batch(torch.device("cpu"))
    assert cpu == NAIVE_MAX_BATCH["cpu"] and naive_max_batch(torch.device("meta")) == cpu
    assert naive_max_batch(torch.device("cuda")) == NAIVE_MAX_BATCH["cuda"] >= 128  # the H200's switch point
    student, target = make(cpu + 1, 8, 8, seed=4)
    assert torch.equal(
        relative_similarity_loss(student, target), relative_similarity_loss(student, target, method="fast")
    )
    student, target = make(cpu, 8, 8, seed=4)
    assert torch.equal(
        relative_similarity_loss(student, target), relative_similarity_loss(student, target, method="naive")
    )
    with pytest.raises(ValueError, match="unknown method"):
        relative_similarity_loss(student, target, method="quadratic")


def test_relative_similarity_b1024_builds_no_pair_of_pairs_tensor():
    # P = 523,776 text pairs: a P x P float tensor would be 1 TB, so finishing at all shows none is built
    student, target = make(1024, 32, 32, seed=12)
    start = time.perf_counter()
    loss, grad = value_and_grad(relative_similarity_loss, student, target)
    elapsed = time.perf_counter() - start
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0
    assert elapsed < 20.0  # under 1 s on this 2-core CPU; the bound only catches a blow-up
    # the loss is a function of the set of texts: permuting the batch changes neither value nor gradient
    perm = torch.randperm(1024, generator=torch.Generator().manual_seed(0))
    loss_p, grad_p = value_and_grad(relative_similarity_loss, student[perm], target[perm])
    assert abs(float(loss_p) - float(loss)) <= 1e-12 * float(loss)
    assert rel_err(grad_p, grad[perm]) <= 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relative_similarity_on_cuda_matches_cpu(dtype):
    student, target = make(300, 64, 48, seed=21, dtype=dtype)
    cpu_loss, cpu_grad = value_and_grad(relative_similarity_loss, student, target, method="fast")
    loss, grad = value_and_grad(relative_similarity_loss, student.cuda(), target.cuda(), method="fast")
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert abs(float(loss) - float(cpu_loss)) <= tol * float(cpu_loss)
    assert rel_err(grad.cpu(), cpu_grad) <= tol
    naive, naive_grad = value_and_grad(
        relative_similarity_loss_naive, student[:64].cuda(), target[:64].cuda()
    )
    fast, fast_grad = value_and_grad(
        relative_similarity_loss, student[:64].cuda(), target[:64].cuda(), method="fast"
    )
    assert abs(float(fast) - float(naive)) <= tol * float(naive)
    assert rel_err(fast_grad, naive_grad) <= tol
