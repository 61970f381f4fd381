"""Adversarial cases that once gave a silently wrong result: changing float options under
torch.compile, confident and degenerate rows, double backward, extreme temperatures, ε and logit
spreads, unread ignored rows, and absurd-but-accepted options. Each section covers the family, not
the one value first reported; the fuzzer's strategies (kdloss/testing) draw the same extremes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing

import kdloss
from kdloss import functional as F
from kdloss.reference import plackett_luce_reference, sinkhorn_reference, topk_kl_reference
from kdloss.testing import check_case

from helpers import max_abs

# ---------------------------------------------------------------------------------------------
# Inputs


def _topk_inputs(rows=4, vocab=50, k=5, *, dtype=torch.float32, seed=0, confident=False):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    teacher = 3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    ids = teacher.topk(k, dim=-1).indices
    values = torch.log_softmax(teacher, -1).gather(1, ids)
    if confident:  # the student is sure of one kept id: its mass outside the ids is below fp32 resolution
        z.scatter_add_(1, ids[:, :1], torch.full((rows, 1), 40.0, dtype=torch.float64))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return z.to(dtype).requires_grad_(), ids, values.to(acc)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# Every loss with a compiled kernel, as (name, call(x, value), option name, values): `call` runs the
# kernel on the differentiable input x with the float option set to `value`.
def _float_option_cases():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 30, generator=gen)
    ids = torch.randint(0, 30, (4, 1), generator=gen)
    lp = torch.zeros(4, 1)
    hidden, weight = torch.randn(4, 8, generator=gen), torch.randn(30, 8, generator=gen)
    zs, zt = torch.randn(6, 3, generator=gen), torch.randn(5, 3, generator=gen)
    labels = torch.randint(0, 30, (4,), generator=gen)
    nodes_s, nodes_t = torch.randn(9, 4, generator=gen), torch.randn(9, 3, generator=gen)
    return [
        ("topk_kl", z, lambda x, v: F.topk_kl_loss(x, ids, lp, temperature=v, backend="kernel"), "temperature"),
        ("topk_kl", z, lambda x, v: F.topk_kl_loss(x, ids, lp - 0.3, teacher_temperature=v, backend="kernel"),
         "teacher_temperature"),
        ("fused_linear_topk_kl", hidden,
         lambda x, v: F.fused_linear_topk_kl_loss(x, weight, ids, lp, temperature=v, backend="kernel"), "temperature"),
        ("fused_linear_topk_kl", hidden,
         lambda x, v: F.fused_linear_topk_kl_loss(x, weight, ids, lp, softcap=v, backend="kernel"), "softcap"),
        ("sinkhorn", zs, lambda x, v: F.sinkhorn_loss(x, zt, temperature=v, backend="kernel"), "temperature"),
        ("sinkhorn", zs, lambda x, v: F.sinkhorn_loss(x, zt, epsilon=v, backend="kernel"), "epsilon"),
        ("sinkhorn", zs, lambda x, v: F.sinkhorn_loss(x, zt, scale=v, backend="kernel"), "scale"),
        ("plackett_luce", z, lambda x, v: F.plackett_luce_loss(x, z.detach().flip(-1), labels, temperature=v,
                                                                backend="kernel"), "temperature"),
        ("token_graph", nodes_s, lambda x, v: F.token_graph_loss(x, nodes_t, k=3, sigma=v, backend="kernel"), "sigma"),
    ]


FLOAT_OPTION_CASES = _float_option_cases()
FLOAT_OPTION_IDS = [f"{name}-{option}" for name, _, _, option in FLOAT_OPTION_CASES]


# ---------------------------------------------------------------------------------------------
# 1. torch.compile must never compute with a stale float option


def _kdloss_call_args(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("kdloss."):
            yield node.target, node.args


@pytest.mark.parametrize("case", FLOAT_OPTION_CASES, ids=FLOAT_OPTION_IDS)
def test_ops_receive_float_options_as_traced_tensors(case):
    """A Python float handed to an op's ``float`` argument is specialised during tracing while the
    traced graph — the key of the compile caches — stays the same for every value, so a later call
    with another value could reuse a graph built for the first one. Every float option must reach
    every kdloss op as a traced tensor."""
    _, x, call, _ = case
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(call, backend=record, fullgraph=True)
    for value in (1.5, 2.5, 4.0):  # the second distinct value makes the float dynamic
        compiled(x.clone().requires_grad_(), value)
    calls = [c for gm in graphs for c in _kdloss_call_args(gm)]
    assert calls, "no kdloss op was traced"
    for target, args in calls:
        floats = [a for a in args if isinstance(a, float)
                  or isinstance(getattr(a, "meta", {}).get("example_value"), (float, torch.SymFloat))]
        assert not floats, f"{target} received Python (symbolic) floats {floats}"


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_topk_follows_changing_temperature(dynamic):
    """The reported case: compiled with inductor, T = 1, 2, 5, 3 must give eager's loss and gradient,
    and a changing temperature must not recompile per value."""
    torch._dynamo.reset()
    x0, ids, lp = _topk_inputs(seed=1)
    x0 = (5 * x0.detach()).requires_grad_()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda z, t: F.topk_kl_loss(z, ids, lp, temperature=t, backend="kernel"),
                             backend=counter, fullgraph=True, dynamic=dynamic)
    for i, t in enumerate((1.0, 2.0, 5.0, 3.0, 0.7)):
        x = x0.detach().clone().requires_grad_()
        got = compiled(x, t)
        want = F.topk_kl_loss(x, ids, lp, temperature=t, backend="kernel")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_grad(got, x), _grad(want, x), rtol=1e-5, atol=1e-6)
        if i == 1:  # T = 1 (no teacher re-tempering) and one general T compiled
            compiled_after_two = counter.frame_count
    assert counter.frame_count == compiled_after_two, "a changing temperature recompiles per value"


def test_compiled_module_follows_attribute_changes():
    torch._dynamo.reset()
    x0, ids, lp = _topk_inputs(seed=2)
    module = kdloss.TopKKLLoss(backend="kernel")
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    for t in (1.0, 4.0, 2.0):
        module.temperature = t
        x = x0.detach().clone().requires_grad_()
        torch.testing.assert_close(compiled(x, ids, lp), F.topk_kl_loss(x, ids, lp, temperature=t, backend="kernel"))


# ---------------------------------------------------------------------------------------------
# 2. Confident and degenerate rows: finite, and the kernel agrees with the reference


def _exact_and_fp32(loss_fn, make, backend):
    x64, *rest64 = make(torch.float64)
    exact = loss_fn(x64, *rest64, backend="reference")
    x32, *rest32 = make(torch.float32)
    got = loss_fn(x32, *rest32, backend=backend)
    return exact, _grad(exact, x64), got, _grad(got, x32)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("tail, support", [("renorm", "full"), ("bucket", "full"), ("none", "full"),
                                           ("renorm", "topk"), ("none", "topk")])
def test_topk_confident_student(backend, tail, support):
    """One logit 40 above the rest on a kept id: Σ_K q rounds to 1 in fp32. DistillKit's clamp of
    Σ_K q to 1 − 1e-8 is 1 in fp32 (log1p(−1) = −inf); kdloss applies it as r_s ≥ 1e-8, which is
    what the clamp means in exact arithmetic: finite, equal to the fp64 value."""
    def loss_fn(x, ids, lp, backend):
        return F.topk_kl_loss(x, ids, lp, tail=tail, student_support=support, backend=backend)

    exact, g_exact, got, g_got = _exact_and_fp32(
        loss_fn, lambda dt: _topk_inputs(dtype=dt, confident=True), backend)
    assert torch.isfinite(got) and torch.isfinite(g_got).all()
    assert abs(got.item() - exact.item()) <= 1e-5 * (1 + abs(exact.item()))
    assert max_abs(g_got, g_exact) <= 1e-5


@pytest.mark.parametrize("gap", [8.0, 12.0, 16.0])
def test_topk_bucket_tail_keeps_its_digits(gap):
    """A student that puts all but r_s ≈ 1e-3 … 1e-6 of its mass on the kept ids: r_s = 1 − Σ_K q in
    fp32 keeps only ~eps/r_s of its digits (value errors of 1e-3 on the fused head). The kernels sum
    the tail over the ids outside K (in double, from the same exp values), the reference over the
    log-probabilities outside K: both match fp64 to fp32 precision."""
    def make(dt):
        x, ids, lp = _topk_inputs(rows=6, vocab=40, k=3, dtype=torch.float64, seed=11)
        x = x.detach()
        x.scatter_add_(1, ids, torch.full(ids.shape, gap, dtype=torch.float64))
        return x.to(dt).requires_grad_(), ids, lp.to(torch.float64 if dt == torch.float64 else torch.float32)

    for backend in ("kernel", "reference"):
        exact, ge, got, gg = _exact_and_fp32(
            lambda x, ids, lp, backend: F.topk_kl_loss(x, ids, lp, tail="bucket", backend=backend), make, backend)
        assert abs(got.item() - exact.item()) <= 1e-5 * abs(exact.item())
        assert max_abs(gg, ge) <= 1e-6 * (1 + ge.abs().max().item())
    case = {"rows": 15, "hidden": 20, "vocab": 2, "k": 1, "pad": 0, "values": "logprobs", "tail": "bucket",
            "support": "full", "temperature": 1.0, "teacher_temperature": 1.5, "scale_by_t2": False, "labels": None,
            "num_items": None, "reduction": "sum", "bias": True, "softcap": None, "chunk_size": None,
            "magnitude": 3.0, "quantised": False, "seed": 62}
    result = check_case("fused_linear_topk_kl", case)
    assert result.ok and result.error < 1e-5, "\n".join(result.details)


@pytest.mark.parametrize("tail", ["renorm", "bucket", "none"])
def test_topk_degenerate_rows(tail):
    """V = 1 (k = V), k = V > 1, and a teacher with all its mass on one id: finite on both backends,
    which agree."""
    gen = torch.Generator().manual_seed(5)
    cases = [
        (torch.randn(3, 1, generator=gen), torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), -0.1)),
        (torch.randn(3, 6, generator=gen), torch.arange(6).repeat(3, 1), torch.log_softmax(torch.randn(3, 6), -1)),
        (torch.randn(3, 9, generator=gen), torch.tensor([[2, 4]] * 3), torch.tensor([[0.0, float("-inf")]] * 3)),
    ]
    for z, ids, lp in cases:
        results = []
        for backend in ("kernel", "reference"):
            x = z.clone().requires_grad_()
            loss = F.topk_kl_loss(x, ids, lp, tail=tail, backend=backend)
            results.append((loss, _grad(loss, x)))
            assert torch.isfinite(loss) and torch.isfinite(results[-1][1]).all()
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


def test_fused_head_confident_rows():
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(4, 8, generator=gen, requires_grad=True)
    weight = torch.randn(30, 8, generator=gen)
    weight[3] = 40 * hidden.detach()[0] / hidden.detach()[0].norm() ** 2  # row 0's logit 3 is ~40
    ids = torch.tensor([[3, 1], [0, 2], [5, 6], [7, 8]])
    lp = torch.log_softmax(torch.randn(4, 2, generator=gen), -1) - 0.2
    out = {}
    for backend in ("kernel", "reference"):
        w = weight.clone().requires_grad_()
        loss = F.fused_linear_topk_kl_loss(hidden, w, ids, lp, tail="bucket", backend=backend)
        gh, gw = torch.autograd.grad(loss, (hidden, w))
        assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
        out[backend] = (loss, gh, gw)
    for a, b in zip(out["kernel"], out["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_sinkhorn_and_pld_degenerate_rows(backend):
    """One-hot softmaxes (logits 60 apart), B = 1, B' = 1, C = 1: finite, and equal to fp64."""
    z = torch.tensor([[60.0, 0.0, -5.0], [0.0, 60.0, 1.0]], dtype=torch.float64)
    for zs, zt in ((z, z.flip(0)), (z[:1], z[1:]), (z[:, :1], z[:, :1])):
        exact, ge, got, gg = _exact_and_fp32(
            lambda x, t, backend: F.sinkhorn_loss(x, t, epsilon=1e-3, backend=backend),
            lambda dt: (zs.to(dt).requires_grad_(), zt.to(dt)), backend)
        assert torch.isfinite(got) and torch.isfinite(gg).all()
        assert abs(got.item() - exact.item()) <= 1e-5 and max_abs(gg, ge) <= 1e-5
    labels = torch.tensor([0, 2])
    for zs in (z, z[:, :2]):
        exact, ge, got, gg = _exact_and_fp32(
            lambda x, t, backend: F.plackett_luce_loss(x, t, labels.clamp(max=x.shape[-1] - 1), backend=backend),
            lambda dt: (zs.to(dt).requires_grad_(), zs.to(dt)), backend)
        assert torch.isfinite(got) and torch.isfinite(gg).all()
        assert abs(got.item() - exact.item()) <= 1e-4 * (1 + abs(exact.item())) and max_abs(gg, ge) <= 1e-5


# ---------------------------------------------------------------------------------------------
# 3. Double backward raises on every kernel path (never a silently wrong number)


def _double_backward_cases():
    gen = torch.Generator().manual_seed(7)
    ids, lp = torch.randint(0, 20, (4, 2), generator=gen), torch.log_softmax(torch.randn(4, 2, generator=gen), -1)
    weight = torch.randn(20, 8, generator=gen)
    zt = torch.randn(5, 3, generator=gen)
    labels = torch.randint(0, 20, (4,), generator=gen)
    tokens_t = torch.randn(2, 5, 3, generator=gen)
    nodes_t = torch.randn(9, 3, generator=gen)
    teacher_margins = torch.randn(6, 3, generator=gen)
    return [
        ("topk_kl", (4, 20), lambda x: F.topk_kl_loss(x, ids, lp, tail="bucket", backend="kernel")),
        ("fused mean", (4, 8), lambda x: F.fused_linear_topk_kl_loss(x, weight, ids, lp, backend="kernel")),
        ("fused none", (4, 8),
         lambda x: F.fused_linear_topk_kl_loss(x, weight, ids, lp, reduction="none", backend="kernel").sum()),
        ("sinkhorn", (6, 3), lambda x: F.sinkhorn_loss(x, zt, backend="kernel")),
        ("plackett_luce", (4, 20), lambda x: F.plackett_luce_loss(x, x.detach().flip(-1), labels, backend="kernel")),
        ("margin_mse", (6, 4), lambda x: F.margin_mse_loss(x[:, 0], x[:, 1:], teacher_margins, backend="kernel")),
        ("token_contextual", (2, 5, 4), lambda x: F.token_contextual_loss(x, tokens_t, backend="kernel")),
        ("token_graph", (9, 4), lambda x: F.token_graph_loss(x, nodes_t, k=3, backend="kernel")),
    ]


@pytest.mark.parametrize("case", _double_backward_cases(), ids=lambda c: c[0])
def test_double_backward_raises_on_kernel_paths(case):
    _, shape, loss_fn = case
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(8), requires_grad=True)
    loss = loss_fn(x)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)  # a gradient with create_graph alone is fine
    with pytest.raises(NotImplementedError, match="second derivative"):
        (loss + (g * g).sum()).backward()
    # first-order use after create_graph still works
    x.grad = None
    loss_fn(x).backward()
    assert torch.isfinite(x.grad).all()


def test_double_backward_on_the_reference_backend():
    """The pure-PyTorch backend does support a gradient penalty (autograd twice)."""
    x, ids, lp = _topk_inputs(dtype=torch.float64)
    loss = F.topk_kl_loss(x, ids, lp, backend="reference")
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (h,) = torch.autograd.grad((g * g).sum(), x)
    assert torch.isfinite(h).all() and h.abs().max() > 0


# ---------------------------------------------------------------------------------------------
# 4–6. Accuracy at extreme temperatures, ε and logit spreads (the project's error rule)


def _topk_case(temperature, tail, support="full", magnitude=5.0, vocab=1000, seed=0):
    return {"rows": 6, "split": False, "vocab": vocab, "k": 20, "pad": 2, "values": "logprobs", "tail": tail,
            "support": support, "temperature": temperature, "teacher_temperature": 1.0, "scale_by_t2": True,
            "labels": "some", "num_items": None, "reduction": "mean", "layout": "contiguous",
            "magnitude": magnitude, "student_pad": 0, "quantised": False, "confident": False, "seed": seed}


@pytest.mark.parametrize("temperature", [1e-6, 1e-5, 1e-3, 3.7, 1e3])
@pytest.mark.parametrize("tail, support", [("renorm", "full"), ("bucket", "full"), ("none", "full"),
                                           ("renorm", "topk")])
def test_topk_accuracy_across_temperatures(temperature, tail, support):
    """The student's log-softmax is (z − max z)/T − log Σ exp((z − max z)/T): at small T, z/T and its
    log-sum-exp are huge and rounding them separately cost the gradient 5 % at T = 1e-5 (52 % at
    1e-6). k = 1 with the student renormalised over the ids is exactly 0."""
    for dtype in (torch.float32, torch.bfloat16):
        result = check_case("topk_kl", _topk_case(temperature, tail, support), dtype=dtype)
        assert result.ok, "\n".join(result.details)
    one = dict(_topk_case(3.7, "renorm", "topk", magnitude=8.0, vocab=3180), k=1, pad=0, labels=None)
    assert check_case("topk_kl", one).error == 0.0


def _sinkhorn_case(batch, batch_t, classes, epsilon, temperature=2.0, magnitude=1.0, seed=0):
    return {"batch": batch, "batch_t": batch_t, "classes": classes, "temperature": temperature,
            "epsilon": epsilon, "n_iters": 20, "scale": 1.0, "layout": "contiguous", "magnitude": magnitude,
            "seed": seed}


@pytest.mark.parametrize("epsilon", [1e-8, 1e-7, 1e-6, 1e-5, 1e-3])
@pytest.mark.parametrize("shape", [(6, 5, 7), (21, 5, 2), (32, 32, 10)])
def test_sinkhorn_accuracy_at_small_epsilon(epsilon, shape):
    """The iterate is kept and updated in place, as the fp32 reference computes it; potentials
    accumulated as −W/ε + f + g grow like W/ε and cancelled (3.145 instead of 3.198 at ε = 1e-8)."""
    result = check_case("sinkhorn", _sinkhorn_case(*shape, epsilon))
    assert result.ok, "\n".join(result.details)
    # as accurate as the fp32 reference itself
    gen = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(shape[0], shape[2], generator=gen, dtype=torch.float64), torch.randn(shape[1], shape[2],
                                                                                              generator=gen,
                                                                                              dtype=torch.float64)
    exact, ge, got, gg = _exact_and_fp32(lambda x, t, backend: F.sinkhorn_loss(x, t, epsilon=epsilon, backend=backend),
                                         lambda dt: (zs.to(dt).requires_grad_(), zt.to(dt)), "kernel")
    ref = sinkhorn_reference(zs.float().requires_grad_(), zt.float(), epsilon=epsilon)
    assert abs(got.item() - exact.item()) <= 4 * abs(ref.item() - exact.item()) + 1e-6 * (1 + abs(exact.item()))


@pytest.mark.parametrize("case", [
    # two teacher rows 3e-4 apart in probability: at ε = 1e-8 the exact plan splits every student row
    # evenly between them, which a float −W/ε (ulps of 8 at 1e8) cannot resolve
    _sinkhorn_case(40, 3, 2, 1e-8, temperature=1.0, magnitude=6.0),
    # W from float probabilities: their rounding amplified by 1/ε
    _sinkhorn_case(8, 8, 5, 1e-5, temperature=0.5, magnitude=6.0, seed=3),
    _sinkhorn_case(16, 4, 2, 1e-3, temperature=0.5, magnitude=0.1, seed=1),
    # found by the fuzzer: fp32 gradient error 1.18e-5 against a bound of 7.9e-6
    _sinkhorn_case(2, 22, 2, 1e-3, temperature=2.0, magnitude=0.1, seed=382),
    # the softmax's 1/T amplifies too: stabilised fp32 gradients were 1.3-17x over the bound here
    # (T = 1e-4 at the default ε, found by the fuzzer; ε = 0.02 at T = 0.05 and 0.5)
    _sinkhorn_case(33, 3, 18, 0.1, temperature=1e-4, magnitude=0.1, seed=62),
    _sinkhorn_case(33, 8, 18, 0.02, temperature=0.05, magnitude=0.1, seed=5),
    _sinkhorn_case(33, 9, 18, 0.02, temperature=0.5, magnitude=1.0, seed=5),
])
def test_sinkhorn_ill_conditioned_plans(case):
    """Below ε = 0.02 the softmaxes, the cost W = Σ|s − t| (a difference of nearly equal
    probabilities) and the whole log-domain recursion run in float64 for fp32 inputs too: their fp32
    rounding would be amplified by 1/ε."""
    result = check_case("sinkhorn", case, "cpu", torch.float32)
    assert result.ok, "\n".join(result.details)


@pytest.mark.parametrize("temperature", [1e-4, 1e-2, 100.0])
def test_sinkhorn_extreme_temperatures(temperature):
    result = check_case("sinkhorn", _sinkhorn_case(9, 7, 5, 0.1, temperature=temperature, magnitude=6.0))
    assert result.ok, "\n".join(result.details)


def _pld_case(magnitude, temperature=1.0, classes=30, seed=0):
    return {"lead": [8], "classes": classes, "ties": False, "ignore": 0.3, "permutation": False,
            "temperature": temperature, "reduction": "mean", "layout": "contiguous", "magnitude": magnitude,
            "seed": seed}


@pytest.mark.parametrize("magnitude", [30.0, 1e3, 1e5])
@pytest.mark.parametrize("temperature", [1e-4, 1.0, 100.0])
def test_plackett_luce_accuracy_across_spreads(magnitude, temperature):
    result = check_case("plackett_luce", _pld_case(magnitude, temperature))
    assert result.ok, "\n".join(result.details)


def _pld_exact(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
    """PLD loss and gradient from differences of logits only (O(C²) per row, fp64): exact for any
    spread, where the fp64 reference's lse_j − x_j rounds at eps·spread."""
    from kdloss.reference.plackett_luce import label_first, teacher_ranking

    s, t = s.double(), t.double()
    order = label_first(teacher_ranking(t), labels)
    alpha = torch.softmax(t, -1).gather(-1, order)
    x = s.gather(-1, order)
    rows, classes = x.shape
    diff = x[:, None, :] - x[:, :, None]  # diff[r, j, l] = x_l − x_j
    later = torch.ones(classes, classes, dtype=torch.bool).triu()  # l ≥ j
    gap = torch.logsumexp(diff.masked_fill(~later, -math.inf), dim=-1)  # lse_j − x_j
    loss = torch.where(alpha > 0, alpha * gap, torch.zeros_like(gap)).sum(-1)
    # ∂L/∂x_j = Σ_{k≤j} α_k exp(x_j − lse_k) − α_j, with x_j − lse_k = (x_j − x_k) − (lse_k − x_k)
    x_minus_lse = (x[:, None, :] - x[:, :, None]).transpose(1, 2) - gap[:, None, :]  # [r, j, k]
    earlier = torch.ones(classes, classes, dtype=torch.bool).tril()  # k ≤ j
    g_perm = (alpha[:, None, :] * x_minus_lse.exp()).masked_fill(~earlier, 0.0).sum(-1) - alpha
    grad = torch.zeros_like(s).scatter(-1, order, g_perm)
    return loss.mean(), grad / rows


@pytest.mark.parametrize("spread", [1e7, 1e20, 1e37])
def test_plackett_luce_huge_spreads_against_exact(spread):
    """The kernel never forms lse_j (a number as large as the logits): accurate gradients at any
    spread, and no NaN where the maximum-shift overflows (the reported [2e38, −2e38, 0] → NaN)."""
    gen = torch.Generator().manual_seed(4)
    s = (spread * torch.randn(6, 12, generator=gen, dtype=torch.float64)).float().double()
    t = 3 * torch.randn(6, 12, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 12, (6,), generator=gen)
    loss, grad = _pld_exact(s, t.float().double(), labels)
    x = s.float().requires_grad_()
    got = F.plackett_luce_loss(x, t.float(), labels, backend="kernel")
    g = _grad(got, x)
    assert torch.isfinite(g).all()
    assert max_abs(g, grad) <= 1e-5
    assert abs(got.item() - loss.item()) <= 1e-5 * loss.abs().item()
    for backend in ("kernel", "reference"):
        x = torch.tensor([[2e38, -2e38, 0.0]], requires_grad=True)
        got = F.plackett_luce_loss(x, x.detach(), torch.tensor([0]), backend=backend)
        assert got.item() == 0.0 and torch.equal(_grad(got, x), torch.zeros(1, 3))


# ---------------------------------------------------------------------------------------------
# 7. Ignored rows are never read into the result


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_ignored_rows_may_hold_nan(backend):
    gen = torch.Generator().manual_seed(9)
    nan_row = torch.full((7,), float("nan"))
    s, t = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    s[1], t[1] = nan_row, nan_row
    x = s.clone().requires_grad_()
    loss = F.plackett_luce_loss(x, t, torch.tensor([0, -100, 2]), backend=backend)
    g = _grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and torch.equal(g[1], torch.zeros(7))

    z, ids, lp = _topk_inputs(rows=3, vocab=7, k=2)
    z = z.detach().clone()
    z[1] = nan_row
    x = z.requires_grad_()
    loss = F.topk_kl_loss(x, ids, lp, torch.tensor([0, -100, 2]), backend=backend)
    g = _grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and torch.equal(g[1], torch.zeros(7))

    hidden = torch.randn(3, 4, generator=gen)
    hidden[1] = float("nan")
    h, w = hidden.requires_grad_(), torch.randn(7, 4, generator=gen, requires_grad=True)
    loss = F.fused_linear_topk_kl_loss(h, w, ids, lp, torch.tensor([0, -100, 2]), backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert torch.equal(gh[1], torch.zeros(4))


def test_reference_backends_are_plain_functions_of_the_kept_rows():
    """Same value whatever an ignored row holds (the reference used to read it into the gradient)."""
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    labels = torch.tensor([1, -100])
    base = plackett_luce_reference(s, t, labels)
    s2 = s.clone()
    s2[1] = 1e30
    assert torch.equal(plackett_luce_reference(s2, t, labels), base)
    z, ids, lp = _topk_inputs(rows=2, vocab=5, k=2)
    z = z.detach()
    ref = topk_kl_reference(z, ids, lp, labels)
    z2 = z.clone()
    z2[1] = float("inf")
    assert torch.equal(topk_kl_reference(z2, ids, lp, labels), ref)


# ---------------------------------------------------------------------------------------------
# 10. Options at the edges of their valid ranges give finite results; beyond them, a ValueError


def _edge_calls(scale: float, epsilon: float):
    """Every loss (and the sparse-teacher helpers) with its scale options at ``scale``."""
    gen = torch.Generator().manual_seed(10)
    z = 4 * torch.randn(4, 30, generator=gen)
    ids = torch.stack([torch.randperm(30, generator=gen)[:3] for _ in range(4)])
    lp = torch.log_softmax(torch.randn(4, 3, generator=gen), -1) - 0.5
    hidden, weight = torch.randn(4, 8, generator=gen), torch.randn(30, 8, generator=gen)
    zs, zt = 3 * torch.randn(6, 4, generator=gen), 3 * torch.randn(5, 4, generator=gen)
    labels = torch.randint(0, 30, (4,), generator=gen)
    nodes_s, nodes_t = torch.randn(9, 4, generator=gen), torch.randn(9, 3, generator=gen)
    emb_s, emb_t = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    return {
        "topk_kl": (z, lambda x, b: F.topk_kl_loss(x, ids, lp, tail="bucket", temperature=scale,
                                                   teacher_temperature=scale, backend=b)),
        "fused_linear_topk_kl": (hidden, lambda x, b: F.fused_linear_topk_kl_loss(
            x, weight, ids, lp, temperature=scale, softcap=scale, backend=b)),
        "sinkhorn": (zs, lambda x, b: F.sinkhorn_loss(x, zt, temperature=scale, epsilon=epsilon, backend=b)),
        "plackett_luce": (z, lambda x, b: F.plackett_luce_loss(x, z.flip(-1), labels, temperature=scale, backend=b)),
        "token_graph": (nodes_s, lambda x, b: F.token_graph_loss(x, nodes_t, k=3, sigma=scale, backend=b)),
        "token_graph log": (nodes_s, lambda x, b: F.token_graph_loss(x, nodes_t, k=3, sigma=scale, edge="log_kernel",
                                                                     backend=b)),
        "token_contrastive": (emb_s, lambda x, b: F.token_contrastive_loss(x, emb_t, temperature=scale, backend=b)),
    }


@pytest.mark.parametrize("scale, epsilon", [(1e-8, 1e-30), (1e8, 1e30)])
@pytest.mark.parametrize("name", list(_edge_calls(1.0, 0.1)))
def test_valid_range_edges_are_finite(name, scale, epsilon):
    x0, call = _edge_calls(scale, epsilon)[name]
    for backend in ("kernel", "reference"):
        x = x0.clone().requires_grad_()
        loss = call(x, backend)
        assert torch.isfinite(loss).all(), (name, backend, loss)
        assert torch.isfinite(_grad(loss.sum(), x)).all(), (name, backend)
    for temperature in (1e-8, 1e8):
        ids, logprobs = kdloss.sparse.topk_teacher(x0, 3, temperature=temperature)
        assert torch.isfinite(logprobs).all() and (logprobs <= 0).all()
        ids, weights = kdloss.sparse.sample_teacher_targets(x0, 8, temperature=temperature,
                                                            proposal_power=temperature)
        assert torch.isfinite(weights).all()


@pytest.mark.parametrize("call, name", [
    (lambda: F.topk_kl_loss(torch.randn(2, 5), torch.tensor([[0], [1]]), torch.zeros(2, 1), temperature=1e-40),
     "temperature"),
    (lambda: F.topk_kl_loss(torch.randn(2, 5), torch.tensor([[0], [1]]), torch.zeros(2, 1), temperature=1.3e154),
     "temperature"),
    (lambda: F.topk_kl_loss(torch.randn(2, 5), torch.tensor([[0], [1]]), torch.zeros(2, 1),
                            teacher_temperature=1e-39), "teacher_temperature"),
    (lambda: F.fused_linear_topk_kl_loss(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([[0], [1]]),
                                         torch.zeros(2, 1), softcap=3.4e38), "softcap"),
    (lambda: F.sinkhorn_loss(torch.randn(3, 2), torch.randn(3, 2), epsilon=1e-40), "epsilon"),
    (lambda: F.sinkhorn_loss(torch.randn(3, 2), torch.randn(3, 2), temperature=1e-40), "temperature"),
    (lambda: F.sinkhorn_loss(torch.randn(3, 2), torch.randn(3, 2), n_iters=2**40), "n_iters"),
    (lambda: F.plackett_luce_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), temperature=1e-39),
     "temperature"),
    (lambda: F.token_graph_loss(torch.randn(5, 3), torch.randn(5, 2), k=2, sigma=1e-40), "sigma"),
    (lambda: F.token_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=1e-40), "temperature"),
    (lambda: kdloss.sparse.topk_teacher(torch.randn(2, 5), 2, temperature=1e-40), "temperature"),
    (lambda: kdloss.sparse.sample_teacher_targets(torch.randn(2, 5), n_samples=2**40), "n_samples"),
    (lambda: kdloss.sparse.sample_teacher_targets(torch.zeros(2, 5), values="probs"), "teacher row 0"),
    (lambda: kdloss.sparse.sample_teacher_targets(torch.full((2, 5), -math.inf)), "teacher row 0"),
    (lambda: kdloss.sparse.sample_teacher_targets(torch.tensor([[0.0, 1.0], [math.nan, 0.0]])), "teacher row 1"),
    (lambda: F.topk_kl_loss(torch.randn(2, 5), torch.tensor([[0], [1]]), torch.zeros(2, 1),
                            num_items_in_batch=torch.tensor(math.nan)), "num_items_in_batch"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_absurd_options_are_rejected(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ---------------------------------------------------------------------------------------------
# 11. Error types: meta tensors and torch.func


def test_meta_tensors():
    """backend="kernel" on meta tensors raises KernelUnavailableError (the data-dependent checks,
    which would read the data, are skipped on meta)."""
    meta = dict(device="meta")
    z, ids, lp = torch.randn(4, 10, **meta), torch.zeros(4, 2, dtype=torch.long, **meta), torch.randn(4, 2, **meta)
    labels = torch.zeros(4, dtype=torch.long, **meta)
    calls = [
        lambda b: F.topk_kl_loss(z, ids, lp, labels, backend=b),
        lambda b: F.fused_linear_topk_kl_loss(torch.randn(4, 3, **meta), torch.randn(10, 3, **meta), ids, lp,
                                              backend=b),
        lambda b: F.sinkhorn_loss(z, z, backend=b),
        lambda b: F.plackett_luce_loss(z, z, labels, backend=b),
        lambda b: F.margin_mse_loss(z[:, 0], z[:, 1], z[:, 2], backend=b),
    ]
    for call in calls:
        with pytest.raises(kdloss.KernelUnavailableError, match="meta"):
            call("kernel")


def test_torch_func_grad():
    """torch.func transforms run the reference under backend="auto" (the kernels' torch.library
    autograd has no functorch rules) and raise a clear error under backend="kernel"."""
    x, ids, lp = _topk_inputs()
    x = x.detach()
    g = torch.func.grad(lambda z: F.topk_kl_loss(z, ids, lp))(x)
    x_ = x.clone().requires_grad_()
    torch.testing.assert_close(g, _grad(F.topk_kl_loss(x_, ids, lp, backend="kernel"), x_))
    with pytest.raises(kdloss.KernelUnavailableError, match="torch.func"):
        torch.func.grad(lambda z: F.sinkhorn_loss(z, z.detach(), backend="kernel"))(torch.randn(4, 3))
