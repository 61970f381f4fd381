"""Token contextual loss: kernel vs the fp64 reference (values, gradients, reductions, low precision,
shapes), the closed-form gradient, gradcheck, opcheck, torch.compile, thread-count determinism, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdloss import TokenContextualLoss
from kdloss.functional import token_contextual_loss
from kdloss.reference import token_contextual_reference

from helpers import assert_close_fp64, assert_within_lowp_bound, non_contiguous, raises_naming

REDUCTIONS = ["mean", "sum", "none"]


def tokens(b, n, d, dtype=torch.float64, device="cpu", gen=None, scale=1.0):
    return (scale * torch.randn(b, n, d, generator=gen, dtype=torch.float64)).to(device, dtype)


def grads_of(out, x, gen):
    w = torch.rand(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    return torch.autograd.grad(out, x, grad_outputs=w)[0]


def test_reference_matches_spec_formula_and_gradient():
    gen = torch.Generator().manual_seed(0)
    s, t = tokens(2, 6, 5, gen=gen).requires_grad_(), tokens(2, 6, 3, gen=gen)
    a = torch.softmax(s @ s.mT / math.sqrt(5), -1)
    p = torch.softmax(t @ t.mT / math.sqrt(3), -1)
    expected = ((p - a) ** 2).mean()
    out = token_contextual_reference(s, t)
    assert_close_fp64(out, expected)
    # spec §5.3 closed form
    g = 2 * (a - p) / (2 * 36)
    ds = a * (g - (g * a).sum(-1, keepdim=True))
    closed = (ds + ds.mT) @ s / math.sqrt(5)
    assert_close_fp64(torch.autograd.grad(out, s)[0], closed.detach())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (3, 13, 17, 9), (1, 1, 1, 1), (2, 33, 40, 24), (2, 150, 20, 9)])
def test_kernel_matches_reference_fp64(device, reduction, shape):
    b, n, ds, dt = shape
    gen = torch.Generator().manual_seed(1)
    s, t = tokens(b, n, ds, device=device, gen=gen).requires_grad_(), tokens(b, n, dt, device=device, gen=gen)
    out = token_contextual_loss(s, t, reduction=reduction, backend="kernel")
    ref = token_contextual_reference(s, t, reduction=reduction)
    assert_close_fp64(out, ref)
    g = torch.Generator().manual_seed(2)
    gk = grads_of(out, s, g)
    g = torch.Generator().manual_seed(2)
    assert_close_fp64(gk, grads_of(ref, s, g), atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ds, dt", [(24, 40), (32, 17)])  # 32: whole fp32 panels, gradient written in place
def test_low_precision_error_bound(device, dtype, ds, dt):
    from kdloss.testing import get

    spec = get("token_contextual")
    case = {"batch": 2, "tokens": 37, "ds": ds, "dt": dt, "reduction": "mean", "layout": "contiguous",
            "magnitude": 1.0, "seed": 3}
    built = spec.build(case, device, dtype)
    (s,) = built.inputs
    t = built.constants["teacher"]
    out = spec.kernel(case, s, teacher=t)
    assert out.dtype == dtype
    exact_s = s.detach().double().cpu().requires_grad_()
    exact = spec.reference(case, exact_s, teacher=t.cpu())
    low = s.detach().clone().requires_grad_()
    naive = spec.naive(case, low, teacher=t)
    assert_within_lowp_bound(out, naive, exact, dtype)
    gk = torch.autograd.grad(out, s)[0]
    ge = torch.autograd.grad(exact, exact_s)[0]
    gn = torch.autograd.grad(naive, low)[0]
    assert_within_lowp_bound(gk, gn, ge, dtype, "grad")


@given(b=st.integers(0, 3), n=st.integers(0, 21), ds=st.integers(1, 20), dt=st.integers(1, 20),
       reduction=st.sampled_from(REDUCTIONS), strided=st.booleans(), seed=st.integers(0, 2**20))
def test_property_shapes(b, n, ds, dt, reduction, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    s, t = tokens(b, n, ds, gen=gen), tokens(b, n, dt, gen=gen)
    s = (non_contiguous(s) if strided else s).requires_grad_()
    out = token_contextual_loss(s, t, reduction=reduction, backend="kernel")
    ref = token_contextual_reference(s, t, reduction=reduction)
    assert_close_fp64(out, ref)
    assert torch.isfinite(out).all()
    if out.requires_grad:
        assert_close_fp64(grads_of(out, s, torch.Generator().manual_seed(seed)),
                          grads_of(ref, s, torch.Generator().manual_seed(seed)), atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(device, reduction):
    gen = torch.Generator().manual_seed(4)
    s, t = tokens(2, 5, 4, device=device, gen=gen).requires_grad_(), tokens(2, 5, 6, device=device, gen=gen)
    assert torch.autograd.gradcheck(lambda x: token_contextual_loss(x, t, reduction=reduction, backend="kernel"), (s,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(device, reduction):
    from kdloss._build import require
    from kdloss._ops import REDUCTION_CODES

    require("token_contextual", device.type)
    code = REDUCTION_CODES[reduction]
    gen = torch.Generator().manual_seed(5)
    for dtype, teacher_dtype in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                                 (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                 (torch.float16, torch.float16)):
        s = tokens(2, 9, 10, dtype, device, gen).requires_grad_()
        t = tokens(2, 9, 7, teacher_dtype, device, gen)
        for with_grad in (False, True):
            torch.library.opcheck(torch.ops.kdloss.token_contextual_fwd.default, (s, t, code, with_grad))
        _, ls, lt, rho, _ = torch.ops.kdloss.token_contextual_fwd(s.detach(), t, code, False)
        grad = torch.rand((2, 9) if code == 0 else (), dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.kdloss.token_contextual_bwd.default,
                              (grad, s.detach(), t, ls, lt, rho, code))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(device, dynamic):
    torch._dynamo.reset()
    loss_fn = TokenContextualLoss(backend="kernel")
    compiled = torch.compile(lambda s, t: 3.0 * loss_fn(s, t) + (s * s).mean(), fullgraph=True, dynamic=dynamic)
    gen = torch.Generator().manual_seed(6)
    for n in (8, 11):
        s, t = tokens(2, n, 12, torch.float32, device, gen).requires_grad_(), tokens(2, n, 5, torch.float32, device, gen)
        eager = 3.0 * loss_fn(s, t) + (s * s).mean()
        out = compiled(s, t)
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(torch.autograd.grad(out, s)[0], torch.autograd.grad(eager, s)[0])


def test_teacher_is_a_constant_and_mixed_dtypes(device):
    gen = torch.Generator().manual_seed(7)
    s = tokens(2, 6, 4, torch.bfloat16, device, gen).requires_grad_()
    t = tokens(2, 6, 8, torch.float32, device, gen).requires_grad_()
    out = token_contextual_loss(s, t, backend="kernel")
    assert out.dtype == torch.bfloat16
    out.backward()
    assert t.grad is None and s.grad is not None


def test_cpu_results_independent_of_thread_count():
    from kdloss.testing import check_determinism

    # images shorter and longer than the micro-tiles' padding; ds = 32: whole panels (register transposes,
    # the gradient written straight into the output)
    for tokens_per_image, ds in ((29, 19), (150, 19), (29, 32)):
        check_determinism("token_contextual", {"batch": 3, "tokens": tokens_per_image, "ds": ds, "dt": 11,
                                               "reduction": "mean", "layout": "contiguous", "magnitude": 1.0,
                                               "seed": 8})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_non_finite_tokens_give_the_reference_nans(bad, side):
    gen = torch.Generator().manual_seed(4)
    s, t = tokens(2, 19, 16, torch.float32, gen=gen), tokens(2, 19, 16, torch.float32, gen=gen)
    (s if side == "student" else t)[1, 3, 2] = bad
    out = token_contextual_loss(s, t, reduction="none", backend="kernel")
    ref = token_contextual_reference(s, t, reduction="none")
    assert ref.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    assert token_contextual_loss(s, t, backend="kernel").isnan()


@pytest.mark.parametrize("call, match", [
    (lambda: token_contextual_loss(torch.randn(2, 3), torch.randn(2, 3, 4)), "student_tokens"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 4, 4)), "teacher_tokens"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 0), torch.randn(2, 3, 4)), "student_tokens"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 0)), "teacher_tokens"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), reduction="avg"), "reduction"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), backend="gpu"), "backend"),
])
def test_bad_values(call, match):
    with raises_naming(match):
        call()


def test_bad_types():
    with pytest.raises(TypeError, match="teacher_tokens"):
        token_contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4).long())


def test_module_matches_functional():
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    torch.testing.assert_close(TokenContextualLoss(reduction="sum")(s, t), token_contextual_loss(s, t, reduction="sum"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_precomputed_gradient_matches_the_recomputing_backward(reduction):
    """Scalar reductions get their gradient in the forward (scaled by the upstream gradient in the
    backward); it equals the backward op's recomputation from the saved statistics, also when the
    graph is retained and run twice."""
    from kdloss._ops import REDUCTION_CODES

    code = REDUCTION_CODES[reduction]
    gen = torch.Generator().manual_seed(12)
    s, t = tokens(3, 29, 7, gen=gen).requires_grad_(), tokens(3, 29, 5, gen=gen)
    out = token_contextual_loss(s, t, reduction=reduction, backend="kernel")
    first = torch.autograd.grad(2.5 * out, s, retain_graph=True)[0]
    second = torch.autograd.grad(2.5 * out, s)[0]
    assert torch.equal(first, second)
    _, stats_s, stats_t, rho, unit = torch.ops.kdloss.token_contextual_fwd(s.detach(), t, code, False)
    assert unit.numel() == 0
    recomputed = torch.ops.kdloss.token_contextual_bwd(torch.tensor(2.5, dtype=torch.float64), s.detach(), t,
                                                       stats_s, stats_t, rho, code)
    assert_close_fp64(first, recomputed, atol=1e-15)


def test_gradient_is_precomputed_only_when_needed():
    s, t = tokens(2, 9, 4), tokens(2, 9, 6)
    for code, with_grad, shape in ((1, True, (2, 9, 4)), (2, True, (2, 9, 4)), (0, True, (0,)), (1, False, (0,))):
        assert torch.ops.kdloss.token_contextual_fwd(s, t, code, with_grad)[4].shape == shape
    with torch.no_grad():
        assert token_contextual_loss(s.requires_grad_(), t, backend="kernel").requires_grad is False
