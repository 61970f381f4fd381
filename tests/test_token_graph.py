"""TRG graph loss kernels (spec §5.2–5.3): CPU/CUDA kernels vs the fp64 reference (values and
gradients, every option, kNN and given graphs), the per-edge coefficient ∂L/∂d² vs autograd,
gradcheck, opcheck, torch.compile, hypothesis shapes, low precision, thread-count independence,
non-contiguous inputs, bad inputs, far neighbours, empty graphs, backend contract."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdloss
from kdloss import TokenGraphLoss, TRGLoss
from kdloss._ops import float_arg
from kdloss.functional import token_graph_loss
from kdloss.reference import token_graph_reference
from kdloss.token_graph import knn_indices

from helpers import assert_close_fp64, assert_within_lowp_bound, non_contiguous, raises_naming

REDUCTIONS = ["mean", "sum", "none"]
EDGES = ["kernel", "log_kernel"]
DIRECTIONS = ["student_teacher", "teacher_student"]
CODES = {"none": 0, "mean": 1, "sum": 2}


def nodes(m, d, dtype=torch.float64, device="cpu", gen=None, scale=1.0):
    return (scale * torch.randn(m, d, generator=gen, dtype=torch.float64)).to(device, dtype)


def grads_of(out, x, seed):
    w = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, x, grad_outputs=w.to(out.device, out.dtype))[0]


def check_parity(xs, xt, *, seed=0, **options):
    out = token_graph_loss(xs, xt, backend="kernel", **options)
    ref = token_graph_loss(xs, xt, backend="reference", **options)
    assert out.dtype == xs.dtype and out.device == xs.device
    assert_close_fp64(out, ref)
    assert_close_fp64(grads_of(out, xs, seed), grads_of(ref, xs, seed), atol=1e-13)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (40, 37, 19, 8), (2, 1, 1, 1), (65, 70, 33, 12)])
def test_kernel_matches_reference_fp64(device, reduction, shape):
    m, ds, dt, k = shape
    gen = torch.Generator().manual_seed(1)
    xs = nodes(m, ds, device=device, gen=gen).requires_grad_()
    xt = nodes(m, dt, device=device, gen=gen)
    for edge, direction, graph in itertools.product(EDGES, DIRECTIONS, ["teacher", "student"]):
        sigma = 0.5 * (ds + dt)  # kernel values spread over (0, 1): informative gradients
        check_parity(xs, xt, k=k, sigma=sigma, graph=graph, edge=edge, kl_direction=direction, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_given_neighbours_with_self_edges_and_repeats(device, reduction):
    gen = torch.Generator().manual_seed(2)
    xs = nodes(30, 9, device=device, gen=gen).requires_grad_()
    xt = nodes(30, 14, device=device, gen=gen)
    nb = torch.randint(0, 30, (30, 11), generator=gen)
    nb[0] = 0  # a node whose edges all point at itself: uniform softmaxes, zero loss
    nb[1, :3] = 5  # repeats
    for edge, direction in itertools.product(EDGES, DIRECTIONS):
        check_parity(xs, xt, sigma=4.0, edge=edge, kl_direction=direction, reduction=reduction,
                     neighbours=nb.to(device))
    assert torch.equal(token_graph_loss(xs, xt, neighbours=nb.to(device), reduction="none")[0].cpu(),
                       torch.zeros((), dtype=torch.float64))


def test_edge_coefficient_matches_autograd_of_the_definition():
    """coef[i, j] = ∂L/∂d²_ij (the closed form of the kernels) equals autograd through the spec's
    definition with the squared distances as leaves."""
    gen = torch.Generator().manual_seed(3)
    xs, xt = nodes(12, 6, gen=gen), nodes(12, 4, gen=gen)
    nb = knn_indices(xt, 4)
    sigma = 3.0
    for edge, direction in itertools.product(EDGES, DIRECTIONS):
        d_s = ((xs[:, None] - xs[nb]) ** 2).sum(-1).requires_grad_()
        d_t = ((xt[:, None] - xt[nb]) ** 2).sum(-1)

        def logits(d):
            return torch.exp(-d / (2 * sigma)) if edge == "kernel" else -d / (2 * sigma)

        lps, lpt = torch.log_softmax(logits(d_s), -1), torch.log_softmax(logits(d_t), -1)
        kl = (lps.exp() * (lps - lpt)) if direction == "student_teacher" else (lpt.exp() * (lpt - lps))
        loss = kl.sum()
        expected = torch.autograd.grad(loss, d_s)[0]
        out, coef = torch.ops.kdloss.token_graph_fwd(xs, xt, nb, float_arg(sigma), EDGES.index(edge), DIRECTIONS.index(direction),
                                                     2)
        assert_close_fp64(out, loss.detach())
        assert_close_fp64(coef, expected, atol=1e-15)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_on_the_op(device, reduction):
    kdloss._build.require("token_graph", device.type)
    gen = torch.Generator().manual_seed(4)
    xs = nodes(9, 5, device=device, gen=gen).requires_grad_()
    xt = nodes(9, 3, device=device, gen=gen)
    nb = torch.randint(0, 9, (9, 4), generator=gen).to(device)
    for edge, direction in itertools.product((0, 1), (0, 1)):
        assert torch.autograd.gradcheck(
            lambda x: torch.ops.kdloss.token_graph_fwd(x, xt, nb, float_arg(2.5), edge, direction, CODES[reduction])[0], (xs,))
    assert torch.autograd.gradcheck(lambda x: token_graph_loss(x, xt, k=3, sigma=2.0, reduction=reduction,
                                                               backend="kernel"), (xs,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(device, reduction):
    kdloss._build.require("token_graph", device.type)
    code = CODES[reduction]
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        xs = nodes(11, 10, dtype, device, gen).requires_grad_()
        xt = nodes(11, 7, acc, device, gen)
        nb = torch.randint(0, 11, (11, 4), generator=gen).to(device)
        torch.library.opcheck(torch.ops.kdloss.token_graph_fwd.default, (xs, xt, nb, float_arg(1.5), 0, 0, code))
        torch.library.opcheck(torch.ops.kdloss.token_graph_fwd.default, (xs, xt, nb, float_arg(1.5), 1, 1, code))
        _, coef = torch.ops.kdloss.token_graph_fwd(xs.detach(), xt, nb, float_arg(1.5), 0, 0, code)
        grad = torch.rand((11,) if code == 0 else (), dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.kdloss.token_graph_bwd.default, (grad, xs.detach(), nb, coef, code))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(device, dynamic):
    torch._dynamo.reset()
    loss_fn = TokenGraphLoss(k=3, sigma=8.0, backend="kernel")
    compiled = torch.compile(lambda s, t: 3.0 * loss_fn(s, t) + (s * s).mean(), fullgraph=True, dynamic=dynamic)
    gen = torch.Generator().manual_seed(6)
    for m in (10, 13):
        s = nodes(m, 12, torch.float32, device, gen).requires_grad_()
        t = nodes(m, 5, torch.float32, device, gen)
        eager = 3.0 * loss_fn(s, t) + (s * s).mean()
        out = compiled(s, t)
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(torch.autograd.grad(out, s)[0], torch.autograd.grad(eager, s)[0])


@given(m=st.integers(0, 40), ds=st.integers(1, 24), dt=st.integers(1, 24), k=st.integers(1, 10),
       reduction=st.sampled_from(REDUCTIONS), edge=st.sampled_from(EDGES), direction=st.sampled_from(DIRECTIONS),
       graph=st.sampled_from(["teacher", "student"]), strided=st.booleans(), seed=st.integers(0, 2**20))
def test_property_shapes(m, ds, dt, k, reduction, edge, direction, graph, strided, seed):
    k = min(k, max(m - 1, 0)) or 1
    gen = torch.Generator().manual_seed(seed)
    xs, xt = nodes(m, ds, gen=gen), nodes(m, dt, gen=gen)
    xs = (non_contiguous(xs) if strided else xs).requires_grad_()
    options = dict(k=k, sigma=float(ds + dt), graph=graph, edge=edge, kl_direction=direction, reduction=reduction)
    if m == 1:  # k = 1 > M − 1: no kNN graph exists; an explicit empty edge list is the way
        options["neighbours"] = torch.empty(1, 0, dtype=torch.long)
    out = token_graph_loss(xs, xt, backend="kernel", **options)
    ref = token_graph_loss(xs, xt, backend="reference", **options)
    assert_close_fp64(out, ref)
    assert torch.isfinite(out).all()
    assert_close_fp64(grads_of(out, xs, seed), grads_of(ref, xs, seed), atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("edge", EDGES)
def test_low_precision_error_bound(device, dtype, edge):
    from kdloss.testing import get

    spec = get("token_graph")
    case = {"nodes": 48, "ds": 40, "dt": 24, "k": 8, "graph": "teacher", "sigma": 32.0, "edge": edge,
            "kl_direction": "student_teacher", "reduction": "mean", "layout": "contiguous", "magnitude": 1.0, "seed": 3}
    built = spec.build(case, device, dtype)
    (s,) = built.inputs
    consts = built.constants
    out = spec.kernel(case, s, **consts)
    assert out.dtype == dtype
    exact_s = s.detach().double().cpu().requires_grad_()
    exact = spec.reference(case, exact_s, teacher=consts["teacher"].cpu(), neighbours=consts["neighbours"].cpu())
    low = s.detach().clone().requires_grad_()
    naive = spec.naive(case, low, **consts)
    assert_within_lowp_bound(out, naive, exact, dtype)
    gk = torch.autograd.grad(out, s)[0]
    assert gk.dtype == dtype
    assert_within_lowp_bound(gk, torch.autograd.grad(naive, low)[0], torch.autograd.grad(exact, exact_s)[0], dtype,
                             "grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp32_large_logits_as_accurate_as_fp64_distances(reduction):
    """Fuzz case (seed 0): σ = 0.5 and squared distances ≈ 183 give log-kernel logits ≈ −183 whose
    differences decide a confident softmax; fp32 distances moved the loss by 1e-4 (1.6× the bound).
    Beyond |ℓ| = 4 the kernel forms the distances and the KL in fp64: per node, the loss is then as
    accurate as its fp32 rounding."""
    from kdloss.testing import check_case, get

    case = {"nodes": 7, "ds": 10, "dt": 1, "k": 5, "graph": "teacher", "sigma": 0.5, "edge": "log_kernel",
            "kl_direction": "student_teacher", "reduction": reduction, "layout": "contiguous", "magnitude": 3.0,
            "seed": 0}
    result = check_case("token_graph", case, device="cpu", dtype=torch.float32)
    assert result.ok, "\n".join(result.details)
    spec = get("token_graph")
    built = spec.build(dict(case, reduction="none"), torch.device("cpu"), torch.float32)
    (s,) = built.inputs
    rows = spec.kernel(dict(case, reduction="none"), s, **built.constants)
    exact = spec.reference(dict(case, reduction="none"), s.detach().double(), **built.constants)
    eps = torch.finfo(torch.float32).eps
    assert ((rows.double() - exact).abs() <= 4 * eps * (1 + exact.abs())).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_results_independent_of_thread_count(reduction):
    from kdloss.testing import check_determinism

    for graph in ("teacher", "random"):  # random: many incoming edges per node (the CSR scatter)
        check_determinism("token_graph", {"nodes": 300, "ds": 45, "dt": 17, "k": 8, "graph": graph, "sigma": 32.0,
                                          "edge": "kernel", "kl_direction": "student_teacher", "reduction": reduction,
                                          "layout": "contiguous", "magnitude": 1.0, "seed": 8},
                          thread_counts=(1, 2))


def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(9)
    xs = non_contiguous(nodes(25, 13, device=device, gen=gen)).requires_grad_()
    xt = nodes(13, 25, device=device, gen=gen).T  # transposed view
    nb = torch.randint(0, 25, (6, 25), generator=gen).to(device).T  # non-contiguous int64
    assert not (xs.is_contiguous() or xt.is_contiguous() or nb.is_contiguous())
    check_parity(xs, xt, sigma=10.0, neighbours=nb)
    check_parity(xs, xt, k=4, sigma=10.0, edge="log_kernel", reduction="none")
    sliced = nodes(25, 30, device=device, gen=gen)[:, 3:20].requires_grad_()  # row stride ≠ width
    check_parity(sliced, xt, k=4, sigma=10.0)


def test_teacher_is_a_constant_and_mixed_dtypes(device):
    gen = torch.Generator().manual_seed(10)
    xs = nodes(12, 6, torch.bfloat16, device, gen).requires_grad_()
    xt = nodes(12, 8, torch.float16, device, gen).requires_grad_()
    out = token_graph_loss(xs, xt, k=3, sigma=6.0, backend="kernel")
    assert out.dtype == torch.bfloat16
    out.backward()
    assert xt.grad is None and xs.grad is not None and xs.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("edge", EDGES)
def test_far_neighbours_stay_finite(device, edge):
    """σ far below the squared distances: the kernel underflows to 0 on every edge (uniform
    softmaxes, zero gradient); the log kernel gives logits ~ −1e6 (max-shifted, finite)."""
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        xs = nodes(20, 16, dtype, device, gen, scale=100.0).requires_grad_()
        xt = nodes(20, 16, dtype, device, gen, scale=100.0)
        for reduction in REDUCTIONS:
            out = token_graph_loss(xs, xt, k=5, sigma=1e-3, edge=edge, reduction=reduction, backend="kernel")
            grad = grads_of(out, xs, 0)
            assert torch.isfinite(out).all() and torch.isfinite(grad).all()
            if dtype == torch.float64:
                ref = token_graph_loss(xs, xt, k=5, sigma=1e-3, edge=edge, reduction=reduction, backend="reference")
                assert_close_fp64(out, ref, rtol=1e-9, atol=1e-9)
                assert_close_fp64(grad, grads_of(ref, xs, 0), rtol=1e-9, atol=1e-9)
            if edge == "kernel":
                assert torch.equal(out.cpu().float(), torch.zeros_like(out, device="cpu", dtype=torch.float32))
                assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_graphs_give_zero_and_zero_gradient(device, reduction):
    for m, width in ((0, 8), (0, 0), (1, 0), (5, 0)):
        xs = torch.randn(m, 4, dtype=torch.float32, device=device, requires_grad=True)
        xt = torch.randn(m, 3, dtype=torch.float32, device=device)
        options = {"reduction": reduction, "backend": "kernel"}
        if width == 0:
            options["neighbours"] = torch.empty(m, 0, dtype=torch.long, device=device)
        out = token_graph_loss(xs, xt, **options)
        assert out.shape == ((m,) if reduction == "none" else ())
        assert not torch.isnan(out).any() and (out == 0).all()
        (grad,) = torch.autograd.grad(out.sum(), xs)
        assert grad.shape == xs.shape and (grad == 0).all()


def test_module_and_trg_loss_use_the_kernel():
    gen = torch.Generator().manual_seed(12)
    xs, xt = nodes(10, 4, gen=gen), nodes(10, 6, gen=gen)
    nb = knn_indices(xs, 2)
    module = TokenGraphLoss(k=2, sigma=3.0, graph="student", backend="kernel")
    torch.testing.assert_close(module(xs, xt), token_graph_reference(xs, xt, k=2, sigma=3.0, graph="student"))
    torch.testing.assert_close(module(xs, xt, nb), module(xs, xt))
    torch.manual_seed(0)
    trg = TRGLoss(4, 6, alpha=0.0, beta=1.0, gamma=0.0, num_samples=None, k=2, backend="kernel").double()
    ref = trg.graph_loss.__class__(k=2, backend="reference")
    torch.testing.assert_close(trg(xs[None], xt[None]), ref(xs, xt))


def test_backend_contract():
    s, t = torch.randn(6, 3), torch.randn(6, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU kernel builds here: "auto" uses it without a warning
        torch.testing.assert_close(token_graph_loss(s, t, k=2, backend="auto"),
                                   token_graph_loss(s, t, k=2, backend="kernel"))
    torch.testing.assert_close(token_graph_loss(s, t, k=2, backend="kernel"),
                               token_graph_loss(s, t, k=2, backend="reference"))


@pytest.mark.parametrize("call, match", [
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), neighbours=torch.zeros(5, 2)), "neighbours"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), neighbours=torch.zeros(5, 2, dtype=torch.bool)),
     "neighbours"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), neighbours=torch.zeros(4, 2, dtype=torch.long)),
     "neighbours"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), neighbours=torch.zeros(5, dtype=torch.long)),
     "neighbours"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), neighbours=torch.full((5, 2), 5)), "neighbours"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), neighbours=torch.full((5, 2), -1)), "neighbours"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), neighbours=[[0, 1]] * 5), "neighbours"),
    (lambda: token_graph_loss(torch.randn(5, 0), torch.randn(5, 2), k=2), "student_nodes"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 0), k=2), "teacher_nodes"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2, 1), k=2), "teacher_nodes"),
    (lambda: token_graph_loss(torch.randn(5, 3).long(), torch.randn(5, 2), k=2), "student_nodes"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), k=5), "k"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), k=2, sigma=float("inf")), "sigma"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), k=2, reduction="avg"), "reduction"),
    (lambda: token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), k=2, backend="gpu"), "backend"),
])
def test_bad_inputs(call, match):
    with raises_naming(match):
        call()


def test_kernel_rejects_out_of_range_neighbours_at_the_op_level():
    kdloss._build.require("token_graph", "cpu")
    xs, xt = torch.randn(4, 3), torch.randn(4, 2)
    with raises_naming("neighbours"):
        torch.ops.kdloss.token_graph_fwd(xs, xt, torch.full((4, 2), 4), float_arg(1.0), 0, 0, 1)
    with raises_naming("neighbours"):
        torch.ops.kdloss.token_graph_bwd(torch.ones(()), xs, torch.full((4, 2), -1), torch.zeros(4, 2), 1)


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


# --- kNN selection: blocked top-k, (distance, index) order -------------------------------------------


def brute_force_knn(x, k):
    """The definition over the full matrix in float64: (distance, index) ascending, self excluded."""
    x = x.double()
    norms = (x * x).sum(1)
    dist = (norms[:, None] + norms[None, :] - 2 * x @ x.T).clamp_min(0)
    dist.fill_diagonal_(float("nan"))
    return torch.sort(dist, dim=1, stable=True).indices[:, :k]


@pytest.mark.parametrize("m, dim, k", [(2, 3, 1), (7, 2, 6), (50, 3, 4), (193, 5, 8), (450, 4, 12), (1111, 3, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_ties_and_duplicates_go_to_the_smaller_index(m, dim, k, dtype):
    """Small-integer coordinates: every distance is exact, with many exact ties and duplicated points
    (distance 0 to another node). The CPU kernel (one or many blocks, odd and even block counts) and
    the PyTorch path both give exactly the definition's order."""
    from kdloss.token_graph import _knn_blocked

    gen = torch.Generator().manual_seed(m)
    x = torch.randint(-2, 3, (m, dim), generator=gen).to(dtype)
    x[m // 2] = x[0]
    expected = brute_force_knn(x, k)
    assert torch.equal(knn_indices(x, k), expected)
    assert torch.equal(_knn_blocked(x, k), expected)


def test_knn_matches_the_full_matrix_selection_on_random_nodes():
    """No ties: the same neighbours, in the same order, as ``cdist`` + ``topk`` over the M×M matrix."""
    gen = torch.Generator().manual_seed(21)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(500, 32, generator=gen).to(dtype)
        full = torch.cdist(x, x).pow(2)
        full.fill_diagonal_(float("inf"))
        assert torch.equal(knn_indices(x, 8), full.topk(8, dim=1, largest=False).indices)
        assert torch.equal(knn_indices(x.bfloat16(), 3), knn_indices(x.bfloat16().float(), 3))


def test_knn_independent_of_thread_count():
    """The block size follows the thread count; the selection must not."""
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(1500, 40, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = knn_indices(x, 9)
        torch.set_num_threads(3)
        three = knn_indices(x, 9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_knn_non_finite_nodes_rank_last_by_index():
    """A NaN or infinite node is at distance +inf from everyone (ranked after every finite distance,
    ties by index); kernel and PyTorch path agree."""
    from kdloss.token_graph import _knn_blocked

    gen = torch.Generator().manual_seed(23)
    x = torch.randn(300, 6, generator=gen)
    x[5, 2] = float("nan")
    x[7, 0] = float("inf")
    got = knn_indices(x, 299)
    assert torch.equal(got, _knn_blocked(x, 299))
    assert (got[5] == torch.arange(300)[torch.arange(300) != 5]).all()  # all +inf: index order
    assert set(got[0, -2:].tolist()) == {5, 7}


def test_knn_bounds_and_opcheck():
    x = torch.randn(6, 3)
    assert knn_indices(x, 0).shape == (6, 0)
    assert knn_indices(x[:0], 3).shape == (0, 3)
    with raises_naming("k"):
        knn_indices(x, 6)
    torch.library.opcheck(torch.ops.kdloss.token_graph_knn.default, (x, 4))
    with pytest.raises(ValueError, match="k"):
        torch.ops.kdloss.token_graph_knn(x, 6)
