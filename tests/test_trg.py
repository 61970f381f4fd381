"""TRG (spec §5): contextual kernel vs the fp64 reference (values, gradients, reductions, low
precision, shapes), spec §5.3 gradient formula, gradcheck, opcheck, torch.compile, bad inputs,
backend contract of the reference-only contrastive term, helpers and TRGLoss (graph-loss kernels:
tests/test_token_graph.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdloss
from kdloss import TokenContextualLoss, TokenContrastiveLoss, TokenGraphLoss, TRGLoss
from kdloss.functional import token_contextual_loss, token_contrastive_loss, token_graph_loss
from kdloss.reference import token_contextual_reference, token_graph_reference
from kdloss.trg import feature_map_to_tokens, sample_tokens, temperature_schedule

from helpers import assert_close_fp64, assert_within_lowp_bound, non_contiguous

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
    ref = token_contextual_reference(s, t, reduction)
    assert_close_fp64(out, ref)
    g = torch.Generator().manual_seed(2)
    gk = grads_of(out, s, g)
    g = torch.Generator().manual_seed(2)
    assert_close_fp64(gk, grads_of(ref, s, g), atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_bound(device, dtype):
    from kdloss.testing import get

    spec = get("token_contextual")
    case = {"batch": 2, "tokens": 37, "ds": 24, "dt": 40, "reduction": "mean", "layout": "contiguous",
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
    ref = token_contextual_reference(s, t, reduction)
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
        torch.library.opcheck(torch.ops.kdloss.token_contextual_fwd.default, (s, t, code))
        _, ls, lt, rho = torch.ops.kdloss.token_contextual_fwd(s.detach(), t, code)
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

    for tokens_per_image in (29, 150):  # one tile and several tiles (≤ 48 rows each) per image
        check_determinism("token_contextual", {"batch": 3, "tokens": tokens_per_image, "ds": 19, "dt": 11,
                                               "reduction": "mean", "layout": "contiguous", "magnitude": 1.0,
                                               "seed": 8})


@pytest.mark.parametrize("call, match", [
    (lambda: token_contextual_loss(torch.randn(2, 3), torch.randn(2, 3, 4)), "student_tokens"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 4, 4)), "teacher_tokens"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 0), torch.randn(2, 3, 4)), "student_tokens"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 0)), "teacher_tokens"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4).long()), "teacher_tokens"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), reduction="avg"), "reduction"),
    (lambda: token_contextual_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), backend="gpu"), "backend"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), k=5), "k"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), k=0), "k"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), sigma=0.0), "sigma"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(4, 2), k=2), "teacher_nodes"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), k=2, graph="both"), "graph"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), k=2, edge="x"), "edge"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), k=2, kl_direction="x"), "kl_direction"),
    (lambda: token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 4)), "teacher_emb"),
    (lambda: token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 3), temperature=0), "temperature"),
    (lambda: token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 3), similarity="l2"), "similarity"),
    (lambda: token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 3), symmetric=1), "symmetric"),
    (lambda: feature_map_to_tokens(torch.randn(1, 2, 5, 4), 2), "patch_size"),
    (lambda: sample_tokens(torch.randn(1, 4, 2), torch.randn(1, 4, 3), 5), "num_samples"),
    (lambda: temperature_schedule(1, 0), "total_steps"),
    (lambda: TRGLoss(4, 6)(torch.randn(1, 4, 5), torch.randn(1, 4, 6)), "student_tokens"),
    (lambda: TokenGraphLoss(k=-1), "k"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_contrastive_is_reference_only():  # the graph loss has kernels: tests/test_token_graph.py
    s, t = torch.randn(6, 3), torch.randn(6, 2)
    for fn in (lambda b: token_contrastive_loss(s, t[:, :1].expand(6, 3).contiguous(), backend=b),):
        with pytest.raises(kdloss.KernelUnavailableError, match="reference only"):
            fn("kernel")
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to fall back from: no warning
            torch.testing.assert_close(fn("auto"), fn("reference"))


def test_graph_loss_definition_and_gradcheck():
    gen = torch.Generator().manual_seed(9)
    xs = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    out = token_graph_loss(xs, xt, k=3, sigma=2.0)
    d_t = torch.cdist(xt, xt) ** 2
    d_t.fill_diagonal_(float("inf"))
    idx = d_t.topk(3, largest=False).indices
    a_s = torch.exp(-((xs[:, None] - xs[idx]) ** 2).sum(-1) / 4.0)
    a_t = torch.exp(-((xt[:, None] - xt[idx]) ** 2).sum(-1) / 4.0)
    ps, pt = torch.softmax(a_s, -1), torch.softmax(a_t, -1)
    assert_close_fp64(out, (ps * (ps / pt).log()).sum(-1).mean())
    for opts in ({}, {"graph": "student", "edge": "log_kernel", "kl_direction": "teacher_student", "reduction": "none"}):
        assert torch.autograd.gradcheck(lambda x: token_graph_loss(x, xt, k=3, sigma=2.0, **opts), (xs,))
    assert token_graph_loss(xs[:0], xt[:0]).item() == 0.0


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


def test_helpers():
    fmap = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tok = feature_map_to_tokens(fmap, 2)
    assert tok.shape == (2, 6, 12)
    assert torch.equal(tok[0, 0], fmap[0, :, :2, :2].reshape(-1))
    s, t = torch.randn(3, 10, 4), torch.randn(3, 10, 6)
    gen = torch.Generator().manual_seed(0)
    ss, tt, idx = sample_tokens(s, t, 4, generator=gen)
    assert ss.shape == (3, 4, 4) and tt.shape == (3, 4, 6)
    for b in range(3):
        assert len(set(idx[b].tolist())) == 4
        assert torch.equal(ss[b], s[b, idx[b]]) and torch.equal(tt[b], t[b, idx[b]])
    for kind in ("cosine", "linear", "exponential"):
        assert temperature_schedule(0, 10, kind=kind) == pytest.approx(1.0)
        assert temperature_schedule(10, 10, kind=kind) == pytest.approx(0.07)
        assert temperature_schedule(20, 10, kind=kind) == pytest.approx(0.07)
        assert 0.07 < temperature_schedule(5, 10, kind=kind) < 1.0


def test_trg_loss_composes_terms_and_trains():
    torch.manual_seed(0)
    loss_fn = TRGLoss(8, 12, alpha=1.0, beta=0.5, gamma=0.25, embed_dim=16, num_samples=5, k=3,
                      backend="reference")
    s = torch.randn(2, 10, 8, requires_grad=True)
    t = torch.randn(2, 10, 12)
    total, terms = loss_fn(s, t, generator=torch.Generator().manual_seed(1), return_terms=True)
    torch.testing.assert_close(total, terms["inner"] + 0.5 * terms["local"] + 0.25 * terms["global"])
    torch.testing.assert_close(terms["inner"], token_contextual_loss(s, t, backend="reference"))
    total.backward()
    assert s.grad is not None and loss_fn.student_proj.weight.grad is not None
    assert loss_fn.teacher_proj.weight.grad is not None  # trainable teacher head
    loss_fn.temperature = temperature_schedule(3, 10)
    assert loss_fn.contrastive_loss.temperature == pytest.approx(temperature_schedule(3, 10))
    assert "alpha=1.0" in repr(loss_fn)


def test_modules_match_functionals():
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    torch.testing.assert_close(TokenContextualLoss(backend="reference")(s, t), token_contextual_loss(s, t, backend="reference"))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    torch.testing.assert_close(TokenGraphLoss(k=2)(x, y), token_graph_reference(x, y, 2))
    torch.testing.assert_close(TokenContrastiveLoss()(x, x.flip(0)), token_contrastive_loss(x, x.flip(0)))
