"""Plackett-Luce distillation (spec §2): kernels vs the fp64 reference, the paper's ascending-sort /
prefix-logcumsumexp form, tie rule, hypothesis properties, gradients, opcheck, torch.compile, bad
inputs, determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdloss import PlackettLuceLoss
from kdloss._ops import float_arg
from kdloss.functional import plackett_luce_loss, plackett_luce_ranking
from kdloss.reference import plackett_luce_reference

from helpers import assert_close_fp64, assert_within_lowp_bound, cuda_only, non_contiguous, raises_naming

REDUCTIONS = ["mean", "sum", "none"]


def logits(*shape, scale=2.0, dtype=torch.float64, device="cpu", gen=None, grad=True):
    x = (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device, dtype)
    return x.requires_grad_(grad)


def labels_for(shape, classes, gen=None, device="cpu", ignore=0.0):
    y = torch.randint(0, classes, shape, generator=gen)
    if ignore:
        y[torch.rand(shape, generator=gen) < ignore] = -100
    return y.to(device)


def grads(out, inputs, weight=None):
    weight = torch.ones_like(out) if weight is None else weight
    return torch.autograd.grad(out, inputs, grad_outputs=weight)


def paper_form(student, teacher, labels, temperature=1.0):
    """The PLD paper's App. C code path, written independently: ascending teacher sort, the label
    removed and appended last, prefix logcumsumexp, weights softmax(t_perm / τ), .sum(-1).mean().
    Tie order is unspecified there, so compare on tie-free teachers only. [N, C] inputs, fp64."""
    rows, classes = student.shape
    perms = []
    for i in range(rows):
        ascending = torch.argsort(teacher[i])
        rest = ascending[ascending != labels[i]]
        perms.append(torch.cat([rest, labels[i : i + 1]]))
    perm = torch.stack(perms)
    s_perm = student.gather(1, perm)
    weights = torch.softmax(teacher.gather(1, perm) / temperature, dim=-1)
    per_pos = torch.logcumsumexp(s_perm, dim=-1) - s_perm
    return (weights * per_pos).sum(-1).mean()


def loop_form(student, teacher, label, temperature=1.0):
    """One row in plain Python: π* built with sorted(key=(−t, index)), suffix sums term by term."""
    s, t = student.tolist(), teacher.tolist()
    classes = len(s)
    rest = sorted((c for c in range(classes) if c != label), key=lambda c: (-t[c], c))
    order = [label] + rest
    z = torch.tensor(t, dtype=torch.float64) / temperature
    alpha = torch.softmax(z, 0).tolist()
    total = 0.0
    for k, c in enumerate(order):
        tail = torch.tensor([s[d] for d in order[k:]], dtype=torch.float64)
        total += alpha[c] * (torch.logsumexp(tail, 0).item() - s[c])
    return total


# ---------------------------------------------------------------------------------------------
# Definition: paper code form, tie rule


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_matches_paper_code_form_on_tie_free_inputs(backend, temperature):
    gen = torch.Generator().manual_seed(0)
    for classes in (2, 10, 100, 1000):  # 1000 > 256: the radix-sort path
        s = logits(7, classes, gen=gen)
        t = logits(7, classes, scale=3.0, gen=gen, grad=False)
        assert torch.unique(t, dim=None).numel() == t.numel()  # no ties anywhere
        y = labels_for((7,), classes, gen)
        out = plackett_luce_loss(s, t, y, temperature=temperature, backend=backend)
        expected = paper_form(s, t, y, temperature)
        assert_close_fp64(out, expected)
        for a, b in zip(grads(out, (s,)), grads(expected, (s,)), strict=False):
            assert_close_fp64(a, b)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_tie_rule_stable_lower_index_first(backend):
    """Ties in teacher logits: lower class index ranks first; the label always goes first."""
    gen = torch.Generator().manual_seed(1)
    for classes, dtype in ((6, torch.float64), (9, torch.float32), (300, torch.float32), (300, torch.float64)):
        t = torch.randint(-2, 3, (5, classes), generator=gen).to(dtype)  # heavy ties, ±0
        t[0, :3] = torch.tensor([0.0, -0.0, 0.0])
        s = logits(5, classes, gen=gen, dtype=dtype)
        y = labels_for((5,), classes, gen)
        out = plackett_luce_loss(s, t, y, reduction="none", backend=backend)
        for i in range(5):
            expected = loop_form(s[i].detach().double(), t[i].double(), int(y[i]))
            tol = 1e-12 if dtype == torch.float64 else 1e-4
            assert abs(out[i].item() - expected) <= tol * (1 + abs(expected)), (classes, i)


def test_tie_order_changes_the_value_as_documented():
    """A tied example where the two tie orders give different losses: kdloss picks lower index first."""
    s = torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[3.0, 1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    got = plackett_luce_loss(s, t, y, backend="kernel")
    swapped = plackett_luce_loss(s[:, [0, 2, 1]], t[:, [0, 2, 1]], y, backend="kernel")
    assert got.item() != pytest.approx(swapped.item())
    assert got.item() == pytest.approx(loop_form(s[0], t[0], 0), abs=1e-14)


def test_ranking_helper_and_teacher_permutation_semantics():
    gen = torch.Generator().manual_seed(2)
    t = torch.randint(-3, 4, (4, 5, 50), generator=gen).double()
    s = logits(4, 5, 50, gen=gen)
    y = labels_for((4, 5), 50, gen, ignore=0.2)
    ranking = plackett_luce_ranking(t)
    assert ranking.dtype == torch.int64 and ranking.shape == t.shape
    assert torch.equal(ranking, torch.sort(t, dim=-1, descending=True, stable=True).indices)
    for backend in ("kernel", "reference"):
        base = plackett_luce_loss(s, t, y, reduction="none", backend=backend)
        cached = plackett_luce_loss(s, t, y, reduction="none", backend=backend, teacher_permutation=ranking)
        assert torch.equal(base, cached) or torch.allclose(base, cached, rtol=0, atol=1e-14)
    # any permutation is taken as the ranking (label still first): reversed order ≠ teacher order
    reverse = ranking.flip(-1)
    a = plackett_luce_loss(s, t, y, reduction="none", backend="kernel", teacher_permutation=reverse)
    b = plackett_luce_reference(s, t, y, reduction="none", teacher_permutation=reverse)
    assert_close_fp64(a, b)
    for ga, gb in zip(grads(a, (s,)), grads(b, (s,)), strict=False):
        assert_close_fp64(ga, gb)


# ---------------------------------------------------------------------------------------------
# fp64 parity kernel vs reference


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead, classes", [((33,), 7), ((3, 5), 64), ((9,), 300), ((2, 2), 1), ((4,), 2)])
@pytest.mark.parametrize("use_perm", [False, True])
def test_kernel_matches_reference_fp64(device, reduction, lead, classes, use_perm):
    gen = torch.Generator().manual_seed(3)
    s = logits(*lead, classes, gen=gen, device=device)
    t = logits(*lead, classes, gen=gen, device=device, grad=False)
    t[..., : classes // 2] = t[..., : classes // 2].round()  # some ties
    y = labels_for(lead, classes, gen, device, ignore=0.25)
    perm = plackett_luce_ranking(t) if use_perm else None
    for temperature in (1.0, 0.7):
        out = plackett_luce_loss(s, t, y, temperature=temperature, reduction=reduction, teacher_permutation=perm,
                                 backend="kernel")
        ref = plackett_luce_reference(s, t, y, temperature=temperature, ignore_index=-100, reduction=reduction,
                                      teacher_permutation=perm)
        assert_close_fp64(out, ref)
        weight = torch.rand(ref.shape, generator=gen, dtype=torch.float64).to(device)
        for a, b in zip(grads(out, (s,), weight), grads(ref, (s,), weight), strict=False):
            assert_close_fp64(a, b)


def test_custom_ignore_index_and_strided_inputs(device):
    gen = torch.Generator().manual_seed(4)
    s = non_contiguous(logits(12, 40, gen=gen, device=device))
    t = non_contiguous(logits(12, 40, gen=gen, device=device, grad=False))
    y = labels_for((12,), 40, gen, device)
    y[::3] = 7  # ignore_index = 7 drops rows whose label is 7
    out = plackett_luce_loss(s, t, y, ignore_index=7, backend="kernel")
    ref = plackett_luce_reference(s, t, y, temperature=1.0, ignore_index=7, reduction="mean")
    assert_close_fp64(out, ref)
    assert_close_fp64(grads(out, (s,))[0], grads(ref, (s,))[0])


# ---------------------------------------------------------------------------------------------
# Low precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_error_bound(device, dtype, reduction):
    from kdloss.testing import get

    spec = get("plackett_luce")
    case = {"lead": [64], "classes": 500, "ties": False, "ignore": 0.1, "permutation": False, "temperature": 1.0,
            "reduction": reduction, "layout": "contiguous", "magnitude": 5.0, "seed": 5}
    built = spec.build(case, device, dtype)
    (s,) = built.inputs
    weight = torch.rand(64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def run(fn, x, consts):
        out = fn(case, x, **consts)
        w = weight.to(out.device, out.dtype) if reduction == "none" else torch.ones_like(out)
        return out, torch.autograd.grad(out, (x,), w)[0]

    exact_consts = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in built.constants.items()}
    exact, exact_g = run(spec.reference, s.detach().cpu().double().requires_grad_(), exact_consts)
    kern, kern_g = run(spec.kernel, s, built.constants)
    naive, naive_g = run(spec.naive, s.detach().clone().requires_grad_(), built.constants)
    assert kern.dtype == dtype and kern_g.dtype == dtype
    assert_within_lowp_bound(kern.cpu(), naive.cpu(), exact, dtype, "loss")
    assert_within_lowp_bound(kern_g.cpu(), naive_g.cpu(), exact_g, dtype, "grad")


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("temperature, reduction, seed", [(1.0, "none", 1), (4.0, "mean", 0), (4.0, "none", 1)])
def test_large_vocabulary_within_the_error_rule(device, ties, temperature, reduction, seed):
    """C = 32000 in fp32: every sum over the classes (the teacher's normaliser, the suffix sums, the
    prefix scan of the backward, the row loss) would err by ~√C·eps relative if it chained fp32
    additions — 2-4× over the bound before they were widened."""
    from kdloss.testing import check_case

    case = {"lead": [3], "classes": 32000, "ties": ties, "ignore": 0.0, "permutation": False,
            "temperature": temperature, "reduction": reduction, "layout": "contiguous", "magnitude": 5.0, "seed": seed}
    result = check_case("plackett_luce", case, device, torch.float32)
    assert result.ok, "\n".join(result.details)


def test_fp64_reference_gradient_accurate_at_large_logits():
    """Fuzz case (seed 1): logits of ~4000 over 32000 classes. torch.logcumsumexp (and its gradient)
    rounds at the scale of its running value at every step; unshifted, the float64 reference's gradient
    erred by 2e-10 (the kernel's by 5e-14, against an 80-bit computation), 1.09x the fp64 bound.
    The reference shifts the logits by their row maximum first."""
    from kdloss.testing import check_case

    case = {"lead": [5], "classes": 32000, "ties": False, "ignore": 0.0, "permutation": False,
            "temperature": 100.0, "reduction": "sum", "layout": "contiguous", "magnitude": 1000.0, "seed": 1}
    result = check_case("plackett_luce", case, "cpu", torch.float64)
    assert result.ok and result.ratio < 0.01, "\n".join(result.details)


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis)


@given(rows=st.integers(1, 6), classes=st.integers(1, 40), shift=st.floats(-50, 50), seed=st.integers(0, 2**31 - 1),
       temperature=st.sampled_from([1.0, 2.5]))
def test_translation_invariance_in_student(rows, classes, shift, seed, temperature):
    gen = torch.Generator().manual_seed(seed)
    s, t = logits(rows, classes, gen=gen, grad=False), logits(rows, classes, gen=gen, grad=False)
    y = labels_for((rows,), classes, gen)
    a = plackett_luce_loss(s, t, y, temperature=temperature, reduction="none", backend="kernel")
    b = plackett_luce_loss(s + shift, t, y, temperature=temperature, reduction="none", backend="kernel")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-11)


@given(rows=st.integers(1, 6), classes=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       neg_inf=st.booleans())
def test_equals_cross_entropy_for_one_hot_teacher_weights(rows, classes, seed, neg_inf):
    """α = (1, 0, …, 0): the teacher puts all mass on the label (−inf or a 1e4 gap elsewhere)."""
    gen = torch.Generator().manual_seed(seed)
    s = logits(rows, classes, gen=gen)
    y = labels_for((rows,), classes, gen)
    t = torch.full((rows, classes), float("-inf") if neg_inf else -1e4, dtype=torch.float64)
    t[torch.arange(rows), y] = 0.0
    out = plackett_luce_loss(s, t, y, backend="kernel")
    ce = torch.nn.functional.cross_entropy(s, y)
    assert_close_fp64(out, ce)
    assert_close_fp64(grads(out, (s,))[0], grads(ce, (s,))[0])


@given(rows=st.integers(1, 6), classes=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_equals_listmle_for_uniform_weights(rows, classes, seed):
    """α_k = 1/C (constant teacher): ListMLE of the ranking (label, then classes by index), / C."""
    gen = torch.Generator().manual_seed(seed)
    s = logits(rows, classes, gen=gen, grad=False)
    y = labels_for((rows,), classes, gen)
    t = torch.full((rows, classes), 0.25, dtype=torch.float64)
    out = plackett_luce_loss(s, t, y, reduction="none", backend="kernel")
    for i in range(rows):
        order = [int(y[i])] + [c for c in range(classes) if c != int(y[i])]
        x = s[i, order]
        listmle = sum((torch.logsumexp(x[k:], 0) - x[k]).item() for k in range(classes))  # −log P_PL(π | s)
        assert out[i].item() == pytest.approx(listmle / classes, rel=1e-12, abs=1e-12)


@given(rows=st.integers(1, 6), classes=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       reduction=st.sampled_from(REDUCTIONS), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_gradient_rows_sum_to_zero(rows, classes, seed, reduction, dtype):
    gen = torch.Generator().manual_seed(seed)
    s, t = logits(rows, classes, dtype=dtype, gen=gen), logits(rows, classes, dtype=dtype, gen=gen, grad=False)
    y = labels_for((rows,), classes, gen, ignore=0.2)
    out = plackett_luce_loss(s, t, y, reduction=reduction, backend="kernel")
    (g,) = grads(out, (s,))
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert g.sum(-1).abs().max().item() <= tol * (1 + g.abs().max().item())
    assert torch.all(g[y == -100] == 0)


@given(classes=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_finite_for_large_logits(classes, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    scale = 1e4 if dtype != torch.float16 else 1e3  # fp16: the loss itself must stay below 65504
    s = logits(5, classes, scale=scale, dtype=dtype, gen=gen)
    t = logits(5, classes, scale=scale, dtype=dtype, gen=gen, grad=False)
    y = labels_for((5,), classes, gen)
    out = plackett_luce_loss(s, t, y, reduction="none", backend="kernel")
    (g,) = grads(out, (s,))
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


@given(rows=st.integers(0, 9), seed=st.integers(0, 2**31 - 1), reduction=st.sampled_from(REDUCTIONS))
def test_single_class_gives_zero(rows, seed, reduction):
    gen = torch.Generator().manual_seed(seed)
    s = logits(rows, 1, gen=gen)
    t = logits(rows, 1, gen=gen, grad=False)
    out = plackett_luce_loss(s, t, torch.zeros(rows, dtype=torch.long), reduction=reduction, backend="kernel")
    (g,) = grads(out, (s,))
    assert torch.all(out == 0) and torch.all(g == 0)


# ---------------------------------------------------------------------------------------------
# Gradients, opcheck, compile


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(7)
    s = logits(3, 2, 9, gen=gen)
    t = logits(3, 2, 9, gen=gen, grad=False)
    y = labels_for((3, 2), 9, gen, ignore=0.2)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda x: plackett_luce_loss(x, t, y, temperature=1.3, reduction=reduction, backend="kernel"), (s,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    gen = torch.Generator().manual_seed(8)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = logits(6, 11, dtype=dtype, gen=gen, device=device)
    t = logits(6, 11, dtype=acc, gen=gen, device=device, grad=False)
    y = labels_for((6,), 11, gen, device)
    y[2] = -100
    perm = plackett_luce_ranking(t)
    for code in (0, 1, 2):
        for p in (None, perm):
            torch.library.opcheck(torch.ops.kdloss.plackett_luce_fwd.default, (s, t, y, p, float_arg(1.5), -100, code))
        _, order = torch.ops.kdloss.plackett_luce_fwd(s.detach(), t, y, None, float_arg(1.5), -100, code)
        grad = torch.rand((6,) if code == 0 else (), dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.kdloss.plackett_luce_bwd.default,
                              (grad, s.detach(), t, y, order, float_arg(1.5), -100, code))


@pytest.mark.parametrize("dynamic, backend", [(False, "kernel"), (True, "kernel"), (False, "auto")])
def test_torch_compile_fullgraph(device, dynamic, backend):
    torch._dynamo.reset()
    loss_fn = PlackettLuceLoss(temperature=2.0, backend=backend)
    gen = torch.Generator().manual_seed(9)

    def step(s, t, y, perm):
        return loss_fn(s, t, y) + 0.5 * loss_fn(s, t, y, teacher_permutation=perm)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for rows in (8, 13):
        s = logits(rows, 30, dtype=torch.float32, gen=gen, device=device)
        t = logits(rows, 30, dtype=torch.float32, gen=gen, device=device, grad=False)
        y = labels_for((rows,), 30, gen, device, ignore=0.2)
        perm = plackett_luce_ranking(t)
        eager = step(s, t, y, perm)
        eager_g = torch.autograd.grad(eager, (s,))
        out = compiled(s, t, y, perm)
        out_g = torch.autograd.grad(out, (s,))
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(out_g[0], eager_g[0])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_not_last_layer(device, reduction):
    """Logits from a linear layer; the loss is scaled and (for "none") weighted per row."""
    gen = torch.Generator().manual_seed(10)
    feats = logits(2, 5, 16, gen=gen, device=device)
    weight_mat = logits(16, 12, gen=gen, device=device)
    t = logits(2, 5, 12, gen=gen, device=device, grad=False)
    y = labels_for((2, 5), 12, gen, device, ignore=0.2)
    row_w = torch.rand(2, 5, generator=gen, dtype=torch.float64).to(device) if reduction == "none" else 1.0

    def total(backend):
        out = plackett_luce_loss(feats @ weight_mat, t, y, reduction=reduction, backend=backend)
        return (3.0 * out * row_w).sum() + (feats**2).sum()

    a, b = total("kernel"), total("reference")
    assert_close_fp64(a, b)
    for ga, gb in zip(torch.autograd.grad(a, (feats, weight_mat)), torch.autograd.grad(b, (feats, weight_mat)), strict=False):
        assert_close_fp64(ga, gb)


# ---------------------------------------------------------------------------------------------
# Edge cases and contract


def test_all_ignored_and_empty_give_zero_not_nan(device):
    for rows in (0, 4):
        s = torch.randn(rows, 5, device=device, requires_grad=True)
        t = torch.randn(rows, 5, device=device)
        y = torch.full((rows,), -100, device=device)
        for reduction in ("mean", "sum"):
            out = plackett_luce_loss(s, t, y, reduction=reduction, backend="kernel")
            (g,) = torch.autograd.grad(out, s)
            assert out.item() == 0.0 and torch.all(g == 0)
        none = plackett_luce_loss(s, t, y, reduction="none", backend="kernel")
        assert none.shape == (rows,) and torch.all(none == 0)


def test_teacher_is_constant_output_dtype_and_mixed_teacher_dtype(device):
    gen = torch.Generator().manual_seed(11)
    s = logits(8, 20, dtype=torch.bfloat16, gen=gen, device=device)
    y = labels_for((8,), 20, gen, device)
    for tdtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
        t = logits(8, 20, dtype=tdtype, gen=gen, device=device)  # requires grad: must stay untouched
        out = plackett_luce_loss(s, t, y, backend="kernel")
        ref = plackett_luce_reference(s, t, y)
        assert out.dtype == torch.bfloat16 and out.item() == ref.item()
        out.backward()
        assert t.grad is None and s.grad is not None


def test_module_matches_functional(device):
    gen = torch.Generator().manual_seed(12)
    s = logits(8, 10, dtype=torch.float32, gen=gen, device=device)
    t = logits(8, 10, dtype=torch.float32, gen=gen, device=device, grad=False)
    y = labels_for((8,), 10, gen, device)
    for reduction in REDUCTIONS:
        module = PlackettLuceLoss(temperature=4.0, reduction=reduction)
        torch.testing.assert_close(module(s, t, y),
                                   plackett_luce_loss(s, t, y, temperature=4.0, reduction=reduction))
    assert "temperature=4.0" in repr(module) and "reduction='none'" in repr(module)


def test_cpu_results_independent_of_thread_count():
    gen = torch.Generator().manual_seed(13)
    s = logits(300, 700, dtype=torch.float32, gen=gen)
    t = logits(300, 700, dtype=torch.float32, gen=gen, grad=False)
    y = labels_for((300,), 700, gen, ignore=0.1)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = plackett_luce_loss(s, t, y, backend="kernel")
            results.append((out, *torch.autograd.grad(out, (s,))))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=False):
            assert torch.equal(a, b)


S, T, Y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: plackett_luce_loss(S.tolist(), T, Y), "student_logits must be a torch.Tensor"),
        (lambda: plackett_luce_loss(S.long(), T, Y), "student_logits must be a floating-point tensor"),
        (lambda: plackett_luce_loss(S[0, 0], T[0, 0], Y[0]), r"student_logits must be \[\.\.\., C\] with C >= 1"),
        (lambda: plackett_luce_loss(S, T.long(), Y), "teacher_logits must be a floating-point tensor"),
        (lambda: plackett_luce_loss(S, T[:, :5], Y), "teacher_logits must have the shape of student_logits"),
        (lambda: plackett_luce_loss(S, T, Y.float()), "labels must be an integer tensor"),
        (lambda: plackett_luce_loss(S, T, Y.bool()), "labels must be an integer tensor"),
        (lambda: plackett_luce_loss(S, T, [0, 1, 2, 3]), "labels must be a torch.Tensor"),
        (lambda: plackett_luce_loss(S, T, Y[:3]), "labels must have the leading shape"),
        (lambda: plackett_luce_loss(S, T, Y + 3), r"labels must lie in \[0, 6\)"),
        (lambda: plackett_luce_loss(S, T, Y - 1), r"labels must lie in \[0, 6\)"),
        (lambda: plackett_luce_loss(S[:, :0], T[:, :0], Y), "C >= 1"),
        (lambda: plackett_luce_loss(S, T, Y, temperature=0.0), "temperature must be"),
        (lambda: plackett_luce_loss(S, T, Y, temperature=float("inf")), "temperature must be"),
        (lambda: plackett_luce_loss(S, T, Y, temperature="1"), "temperature must be"),
        (lambda: plackett_luce_loss(S, T, Y, ignore_index=1.5), "ignore_index must be an int"),
        (lambda: plackett_luce_loss(S, T, Y, reduction="batchmean"), "reduction must be one of"),
        (lambda: plackett_luce_loss(S, T, Y, backend="triton"), "backend must be one of"),
        (lambda: plackett_luce_loss(S, T.to("meta"), Y), "teacher_logits must have the device of student_logits"),
        (lambda: plackett_luce_loss(S, T, Y.to("meta")), "labels must have the device of student_logits"),
        (lambda: plackett_luce_loss(S, T, Y, teacher_permutation=torch.argsort(T).float()),
         "teacher_permutation must be an integer tensor"),
        (lambda: plackett_luce_loss(S, T, Y, teacher_permutation=torch.argsort(T)[:2]),
         "teacher_permutation must have the shape"),
        (lambda: plackett_luce_loss(S, T, Y, teacher_permutation=torch.zeros(4, 6, dtype=torch.long)),
         "teacher_permutation must hold each class index"),
        (lambda: plackett_luce_loss(S, T, Y, teacher_permutation=torch.argsort(T) + 1),
         "teacher_permutation must hold each class index"),
        (lambda: plackett_luce_loss(S, T, Y, teacher_permutation=torch.zeros(4, 6, dtype=torch.long),
                                    backend="reference"), "teacher_permutation must hold each class index"),
        (lambda: plackett_luce_loss(S, T, Y, teacher_permutation=[0]), "teacher_permutation must be a torch.Tensor"),
        (lambda: plackett_luce_ranking(T.long()), "teacher_logits must be a floating-point tensor"),
        (lambda: PlackettLuceLoss(reduction="avg"), "reduction must be one of"),
        (lambda: PlackettLuceLoss(temperature=-1.0), "temperature must be"),
    ],
)
def test_bad_inputs(call, match):
    with raises_naming(match):
        call()


def test_kernel_rechecks_values_for_direct_op_calls():
    """The CPU kernel validates labels and permutations itself (what torch.compile graphs rely on)."""
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="labels must lie"):
        torch.ops.kdloss.plackett_luce_fwd(s, t, torch.tensor([0, 5, 1]), None, float_arg(1.0), -100, 1)
    bad_perm = torch.zeros(3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher_permutation must hold"):
        torch.ops.kdloss.plackett_luce_fwd(s, t, torch.tensor([0, 1, 1]), bad_perm, float_arg(1.0), -100, 1)
    with pytest.raises(ValueError, match="order must hold"):
        torch.ops.kdloss.plackett_luce_bwd(torch.ones(()), s, t, torch.tensor([0, 1, 1]),
                                           torch.zeros(3, 5, dtype=torch.int32), float_arg(1.0), -100, 1)
    with pytest.raises(ValueError, match="teacher_logits must be"):
        torch.ops.kdloss.plackett_luce_fwd(s, t.double(), torch.tensor([0, 1, 1]), None, float_arg(1.0), -100, 1)


# ---------------------------------------------------------------------------------------------
# CUDA-specific (run on a GPU; skipped only where none exists)


@cuda_only
@pytest.mark.parametrize("classes", [10, 1000, 5000, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_matches_cpu_kernel(classes, dtype):
    gen = torch.Generator().manual_seed(15)
    s = logits(37, classes, dtype=torch.float64, gen=gen, grad=False)
    t = logits(37, classes, dtype=torch.float64, gen=gen, grad=False)
    t[:, : classes // 3] = t[:, : classes // 3].round()
    y = labels_for((37,), classes, gen, ignore=0.1)
    for use_perm in (False, True):
        for reduction in REDUCTIONS:
            outs = []
            for dev in ("cpu", "cuda"):
                x = s.to(dev, dtype).requires_grad_()
                tt = t.to(dev, dtype)
                perm = plackett_luce_ranking(tt) if use_perm else None
                out = plackett_luce_loss(x, tt, y.to(dev), reduction=reduction, teacher_permutation=perm,
                                         backend="kernel")
                outs.append((out, *grads(out, (x,))))
            tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 2e-2)
            for a, b in zip(*outs, strict=False):
                torch.testing.assert_close(b.cpu(), a, rtol=tol, atol=tol)


@cuda_only
def test_cuda_deterministic():
    gen = torch.Generator().manual_seed(16)
    s = logits(256, 4000, dtype=torch.float32, gen=gen, device="cuda")
    t = logits(256, 4000, dtype=torch.float32, gen=gen, device="cuda", grad=False)
    y = labels_for((256,), 4000, gen, "cuda")
    first = plackett_luce_loss(s, t, y, backend="kernel")
    g0 = torch.autograd.grad(first, s)[0]
    for _ in range(3):
        out = plackett_luce_loss(s, t, y, backend="kernel")
        assert torch.equal(out, first) and torch.equal(torch.autograd.grad(out, s)[0], g0)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint16, torch.int32, torch.uint8])
def test_any_integer_dtype_for_labels_and_permutation(dtype):
    s, t = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    y = torch.tensor([0, 3, 8, 2, 5])
    ranking = plackett_luce_ranking(t)
    expected = plackett_luce_loss(s, t, y, teacher_permutation=ranking)
    got = plackett_luce_loss(s, t, y.to(dtype), teacher_permutation=ranking.to(dtype), backend="kernel")
    assert_close_fp64(got, expected)


def test_without_labels_the_teacher_ranking_is_the_target():
    s, t = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)
    for backend in ("kernel", "reference"):
        assert_close_fp64(plackett_luce_loss(s, t, backend=backend), plackett_luce_loss(s, t, t.argmax(-1)))


def test_num_items_in_batch_replaces_the_counted_rows():
    s = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    t, y = torch.randn(6, 7, dtype=torch.float64), torch.tensor([1, -100, 2, 3, -100, 4])
    for backend in ("kernel", "reference"):
        got = plackett_luce_loss(s, t, y, num_items_in_batch=torch.tensor(10), backend=backend)
        assert_close_fp64(got, plackett_luce_loss(s, t, y, reduction="sum") / 10)
        assert plackett_luce_loss(s, t, y, num_items_in_batch=0, backend=backend).item() == 0.0
