"""Token contrastive loss: its definition against cross-entropy on cosine logits, kernel parity with the
float64 reference for every option (shapes crossing the kernels' row blocks and column strips), the
low-precision error rule, the teacher-side gradient, memory without the M × M logits, bad inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdloss import TokenContrastiveLoss
from kdloss._ops import float_arg
from kdloss.functional import token_contrastive_loss
from kdloss.reference.token_contrastive import token_contrastive_reference
from kdloss.testing import check_case

from helpers import assert_close_fp64, raises_naming

OPTIONS = list(itertools.product((False, True), ("cosine", "dot"), ("mean", "sum", "none")))


def _nodes(m, e, seed, dtype=torch.float64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return tuple((scale * torch.randn(m, e, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
                 for _ in range(2))


@pytest.mark.parametrize("m, e", [(1, 3), (7, 5), (300, 19), (517, 8)])
@pytest.mark.parametrize("symmetric, similarity, reduction", OPTIONS)
def test_kernel_matches_reference_fp64(m, e, symmetric, similarity, reduction):
    """Value and both gradients, with a random upstream weight; M = 300 and 517 cross the CPU kernel's
    row blocks (48) and column strips (256), with partial last ones."""
    hs, ht = _nodes(m, e, seed=m + e)
    options = {"temperature": 0.3, "symmetric": symmetric, "similarity": similarity, "reduction": reduction}
    kernel = token_contrastive_loss(hs, ht, backend="kernel", **options)
    exact = token_contrastive_reference(hs, ht, **options)
    assert_close_fp64(kernel, exact)
    weight = torch.rand(kernel.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(kernel, (hs, ht), weight), torch.autograd.grad(exact, (hs, ht), weight),
                         strict=True):
        assert_close_fp64(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric, similarity, reduction", [(False, "cosine", "mean"), (True, "dot", "none")])
def test_low_precision_within_the_error_rule(dtype, symmetric, similarity, reduction):
    case = {"nodes": 300, "dim": 24, "temperature": 0.07 if similarity == "cosine" else 1.0,
            "similarity": similarity, "symmetric": symmetric, "detach_teacher": False, "reduction": reduction,
            "layout": "strided", "magnitude": 1.0, "seed": 5}
    result = check_case("token_contrastive", case, "cpu", dtype)
    assert result.ok, f"{result}\n" + "\n".join(result.details)


@pytest.mark.parametrize("symmetric", [False, True])
def test_large_logits_keep_probabilities_accurate(symmetric):
    """Dot logits of ~100 (τ = 0.05): a log-sum-exp rounded to fp32 errs by eps·100, a 1e-5 relative
    error in every probability of the backward (found by the selftest's fuzz run: 1.2x the bound); the
    saved float64 log-sum-exps, split into an fp32 pair, keep it at one rounding."""
    case = {"nodes": 19, "dim": 1, "temperature": 0.05, "similarity": "dot", "symmetric": symmetric,
            "detach_teacher": False, "reduction": "mean", "layout": "contiguous", "magnitude": 1.0, "seed": 1}
    result = check_case("token_contrastive", case, "cpu", torch.float32)
    assert result.ok and result.ratio < 0.5, f"{result}\n" + "\n".join(result.details)


@pytest.mark.parametrize("symmetric", [False, True])
def test_fp32_logits_in_the_thousands(symmetric):
    """Fuzz case (seed 1): dot logits up to 3700 (magnitude 3, τ = 0.05) round by ~1e-3 in an fp32 dot
    product, and rows whose softmax is not saturated turned that into gradients 1.1x over the bound
    (eager fp32 errs as much). Beyond max‖u‖·max‖v‖/τ = 64 the kernel forms the logits and softmaxes in
    float64: the gradients are then as accurate as their fp32 rounding."""
    case = {"nodes": 300, "dim": 18, "temperature": 0.05, "similarity": "dot", "symmetric": symmetric,
            "detach_teacher": False, "reduction": "mean", "layout": "contiguous", "magnitude": 3.0, "seed": 1}
    result = check_case("token_contrastive", case, "cpu", torch.float32)
    assert result.ok and result.ratio < 0.1, f"{result}\n" + "\n".join(result.details)


@pytest.mark.parametrize("symmetric", [False, True])
def test_confident_rows_keep_the_diagonal_gradient_accurate(symmetric):
    """A well-aligned pair at τ = 0.05 has p_ii close to 1, and the diagonal of the logits' gradient,
    (p_ii − 1)·w/τ, cancelled in fp32 to a relative eps/(1 − p_ii) (fuzz seed 2718, p_ii = 1 − 2.6e-4: 1.12x
    the bound; that case is in test_fuzz's LONG_RUN_CASES). The forward sets the diagonal aside and saves
    each row's and column's off-diagonal mass Σ_{j≠i} p_ij in float64; the loss terms lse_i − L_ii are
    softplus(lse_off − L_ii) in float64 too (the value erred by 1e-6 relative here, now 1e-7)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    noise = [0.05 * torch.randn(64, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    student64, teacher64 = ((base + n).float().double().requires_grad_() for n in noise)  # fp32 values
    options = dict(temperature=0.05, symmetric=symmetric)
    exact = token_contrastive_reference(student64, teacher64, **options)
    exact.backward()
    student, teacher = (t.detach().float().requires_grad_() for t in (student64, teacher64))
    loss = token_contrastive_loss(student, teacher, backend="kernel", **options)
    loss.backward()
    assert abs(loss.item() - exact.item()) <= 4 * 2**-24 * exact.item()
    for ours, theirs in ((student.grad, student64.grad), (teacher.grad, teacher64.grad)):
        # the fp32 similarity and gradient GEMMs' rounding, amplified by 1/τ: 64 ulps of the largest entry
        assert (ours.double() - theirs).abs().max().item() <= 64 * 2**-24 * theirs.abs().max().item()
    _, state = torch.ops.kdloss.token_contrastive_fwd(
        unit_rows(student), unit_rows(teacher), float_arg(0.05), symmetric, 1)
    assert state.shape == (4, 64) and state.dtype == torch.float64
    logits = unit_rows(student).double() @ unit_rows(teacher).double().T / 0.05
    off = ~torch.eye(64, dtype=torch.bool)
    for row, probs in ((2, logits.softmax(1)), (3, logits.softmax(0).T)):
        if row == 3 and not symmetric:
            assert (state[3] == 0).all()
            continue
        mass = (probs * off).sum(1)
        assert ((state[row] - mass).abs() / mass).max().item() < 1e-4  # fp32 logits: relative, not eps/(1 − p)


def unit_rows(x):
    from kdloss.token_contrastive import normalize_rows

    return normalize_rows(x.detach()).contiguous()


def test_auto_runs_the_kernel_and_outputs_keep_the_input_dtype():
    hs, ht = _nodes(9, 4, seed=3, dtype=torch.bfloat16)
    out = token_contrastive_loss(hs, ht, temperature=0.25)
    assert "token_contrastive_fwd" in type(out.grad_fn.next_functions[0][0]).__name__  # the op, then the cast
    assert out.dtype == torch.bfloat16
    out.backward()
    assert hs.grad.dtype == ht.grad.dtype == torch.bfloat16


def test_gradcheck_through_the_kernel():
    hs, ht = _nodes(11, 4, seed=4)
    for symmetric, similarity in [(False, "cosine"), (True, "dot"), (True, "cosine")]:
        assert torch.autograd.gradcheck(
            lambda a, b, s=symmetric, sim=similarity: token_contrastive_loss(
                a, b, temperature=0.5, symmetric=s, similarity=sim, reduction="none", backend="kernel"),
            (hs, ht))


def test_detached_teacher_gets_no_gradient_from_the_kernel():
    hs, ht = _nodes(6, 5, seed=6)
    out = token_contrastive_loss(hs, ht, detach_teacher=True, backend="kernel")
    grad_s, grad_t = torch.autograd.grad(out, (hs, ht), allow_unused=True)
    assert grad_t is None
    assert_close_fp64(grad_s, torch.autograd.grad(token_contrastive_reference(hs, ht, detach_teacher=True), hs)[0])


def test_zero_rows_and_zero_nodes():
    """A zero node (cosine clamps its norm) and the empty set of nodes: finite, as the reference."""
    hs, ht = _nodes(5, 3, seed=7)
    with torch.no_grad():
        hs[2] = 0
    out = token_contrastive_loss(hs, ht, backend="kernel", reduction="none")
    assert_close_fp64(out, token_contrastive_reference(hs, ht, reduction="none"))
    grads = torch.autograd.grad(out.sum(), (hs, ht))
    for got, want in zip(grads, torch.autograd.grad(token_contrastive_reference(hs, ht, reduction="sum"), (hs, ht)),
                         strict=True):
        assert_close_fp64(got, want)
    empty = token_contrastive_loss(hs[:0], ht[:0], backend="kernel")
    assert empty.item() == 0.0
    assert token_contrastive_loss(hs[:0], ht[:0], backend="kernel", reduction="none").shape == (0,)


def test_kernel_never_holds_the_m_by_m_logits():
    """Peak allocation of forward + backward at M = 2048 stays far below one [M, M] fp32 matrix (16 MiB),
    which the reference allocates several times."""
    from kdloss.bench import peak_mib

    hs, ht = (torch.randn(2048, 16).requires_grad_() for _ in range(2))
    kernel = peak_mib(lambda a, b: token_contrastive_loss(a, b, backend="kernel"), (hs, ht), "cpu")
    reference = peak_mib(lambda a, b: token_contrastive_reference(a, b), (hs, ht), "cpu")
    assert kernel < 8.0 < 2 * 16.0 <= reference, (kernel, reference)


def test_contrastive_loss_definition_and_teacher_gradient():
    gen = torch.Generator().manual_seed(10)
    hs = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    out = token_contrastive_loss(hs, ht, temperature=0.5)
    logits = torch.nn.functional.normalize(hs, dim=-1) @ torch.nn.functional.normalize(ht, dim=-1).T / 0.5
    assert_close_fp64(out, torch.nn.functional.cross_entropy(logits, torch.arange(6)))
    assert torch.autograd.gradcheck(lambda a, b: token_contrastive_loss(a, b, symmetric=True), (hs, ht))
    gs, gt = torch.autograd.grad(out, (hs, ht))
    assert gt.abs().sum() > 0
    detached = token_contrastive_loss(hs, ht, detach_teacher=True)
    assert torch.autograd.grad(detached, (hs, ht), allow_unused=True)[1] is None
    assert token_contrastive_loss(hs[:0], ht[:0]).item() == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda: token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 4)), "teacher_emb"),
    (lambda: token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 3), temperature=0), "temperature"),
    (lambda: token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 3), similarity="l2"), "similarity"),
])
def test_bad_values(call, match):
    with raises_naming(match):
        call()


def test_bad_types():
    with pytest.raises(TypeError, match="symmetric"):
        token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 3), symmetric=1)


def test_module_matches_functional():
    x = torch.randn(6, 3)
    torch.testing.assert_close(TokenContrastiveLoss(temperature=0.3)(x, x.flip(0)),
                               token_contrastive_loss(x, x.flip(0), temperature=0.3))
