"""Margin-MSE (spec §4): kernels vs the fp64 reference, sentence-transformers parity, gradients,
opcheck, torch.compile, bad inputs, determinism."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdloss
from kdloss import MarginMSELoss
from kdloss.functional import margin_mse_from_embeddings, margin_mse_loss
from kdloss.reference import margin_mse_from_embeddings_reference, margin_mse_reference

from helpers import assert_close_fp64, assert_within_lowp_bound, cuda_only, non_contiguous, raises_naming

REDUCTIONS = ["mean", "sum", "none"]
TEACHER_FORMATS = ["scores", "margins", "margins_1d"]


def make_teacher(fmt: str, batch: int, n_neg: int, dtype=torch.float32, device="cpu", gen=None):
    """Teacher labels in one of the three accepted formats (margins_1d needs n_neg == 1)."""
    if fmt == "scores":
        return 3 * torch.randn(batch, n_neg + 1, generator=gen, dtype=dtype).to(device)
    if fmt == "margins":
        return 2 * torch.randn(batch, n_neg, generator=gen, dtype=dtype).to(device)
    return 2 * torch.randn(batch, generator=gen, dtype=dtype).to(device)


def scores(batch, n_neg, dtype, device, gen=None, neg_1d=False):
    pos = (2 * torch.randn(batch, generator=gen, dtype=torch.float64)).to(device, dtype)
    neg_shape = (batch,) if neg_1d else (batch, n_neg)
    neg = (2 * torch.randn(*neg_shape, generator=gen, dtype=torch.float64)).to(device, dtype)
    return pos.requires_grad_(), neg.requires_grad_()


def embeddings(batch, n_neg, dim, dtype, device, gen=None, neg_2d=False):
    def rnd(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) / dim**0.25
        return x.to(device, dtype).requires_grad_()

    negs = rnd(batch, dim) if neg_2d else rnd(batch, n_neg, dim)
    return rnd(batch, dim), rnd(batch, dim), negs


def grads(out, inputs, weight=None):
    """Gradients of ⟨out, weight⟩ (weight defaults to ones), so reduction="none" is checked too."""
    weight = torch.ones_like(out) if weight is None else weight
    return torch.autograd.grad(out, inputs, grad_outputs=weight)


def formula(pos, neg, teacher_margins, reduction):
    """The spec §4.1 formula written out independently of the package (fp64)."""
    neg = neg if neg.dim() == 2 else neg[:, None]
    sq = ((pos[:, None] - neg) - teacher_margins) ** 2
    return {"mean": sq.mean(), "sum": sq.sum(), "none": sq}[reduction]


# ---------------------------------------------------------------------------------------------
# Reference and parity


@pytest.mark.parametrize("fmt", TEACHER_FORMATS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_matches_spec_formula(fmt, reduction):
    gen = torch.Generator().manual_seed(0)
    n_neg = 1 if fmt == "margins_1d" else 4
    pos, neg = scores(9, n_neg, torch.float64, "cpu", gen)
    teacher = make_teacher(fmt, 9, n_neg, torch.float64, gen=gen)
    margins = {"scores": lambda t: t[:, :1] - t[:, 1:], "margins": lambda t: t,
               "margins_1d": lambda t: t[:, None]}[fmt](teacher)
    expected = formula(pos.detach(), neg.detach(), margins, reduction)
    assert_close_fp64(margin_mse_reference(pos, neg, teacher, reduction=reduction), expected, atol=1e-13)


# [B] teacher margins exist only with one negative ([B] student_neg)
SCORE_CASES = [(fmt, neg_1d) for fmt in TEACHER_FORMATS for neg_1d in (False, True)
               if fmt != "margins_1d" or neg_1d]


@pytest.mark.parametrize("fmt, neg_1d", SCORE_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_scores_kernel_matches_reference_fp64(device, fmt, reduction, neg_1d):
    gen = torch.Generator().manual_seed(1)
    n_neg = 1 if neg_1d else 7
    pos, neg = scores(33, n_neg, torch.float64, device, gen, neg_1d=neg_1d)
    teacher = make_teacher(fmt, 33, n_neg, torch.float64, device, gen)
    out = margin_mse_loss(pos, neg, teacher, reduction=reduction, backend="kernel")
    ref = margin_mse_reference(pos, neg, teacher, reduction=reduction)
    assert_close_fp64(out, ref)
    weight = torch.rand(ref.shape, generator=gen, dtype=torch.float64).to(device)
    for g, r in zip(grads(out, (pos, neg), weight), grads(ref, (pos, neg), weight), strict=False):
        assert_close_fp64(g, r)


@pytest.mark.parametrize("fmt", TEACHER_FORMATS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_embedding_kernel_matches_reference_fp64(device, fmt, reduction):
    gen = torch.Generator().manual_seed(2)
    n_neg = 1 if fmt == "margins_1d" else 5
    q, p, negs = embeddings(17, n_neg, 45, torch.float64, device, gen, neg_2d=fmt == "margins_1d")
    teacher = make_teacher(fmt, 17, n_neg, torch.float64, device, gen)
    out = margin_mse_from_embeddings(q, p, negs, teacher, reduction=reduction, backend="kernel")
    ref = margin_mse_from_embeddings_reference(q, p, negs, teacher, reduction=reduction)
    assert_close_fp64(out, ref)
    weight = torch.rand(ref.shape, generator=gen, dtype=torch.float64).to(device)
    for g, r in zip(grads(out, (q, p, negs), weight), grads(ref, (q, p, negs), weight), strict=False):
        assert_close_fp64(g, r)


def _naive_lowp_scores(pos, neg, teacher_margins, reduction):
    """What eager user code does in the low-precision dtype (ST: MSELoss on [B, n] margins)."""
    margins = pos[:, None] - neg
    return torch.nn.functional.mse_loss(margins, teacher_margins.to(margins.dtype), reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_scores_low_precision_error_bound(device, dtype, reduction):
    gen = torch.Generator().manual_seed(3)
    pos64, neg64 = scores(256, 8, torch.float64, "cpu", gen)
    teacher = make_teacher("margins", 256, 8, torch.float32, gen=gen)
    pos, neg = (x.detach().to(device, dtype).requires_grad_() for x in (pos64, neg64))
    weight = torch.rand(256, 8, generator=gen, dtype=torch.float64) if reduction == "none" else None

    def run(fn, a, b):
        out = fn(a, b)
        w = torch.ones_like(out) if weight is None else weight.to(out.device, out.dtype)
        return out, torch.autograd.grad(out, (a, b), w)

    exact, exact_g = run(lambda a, b: margin_mse_reference(a, b, teacher.double(), reduction=reduction), pos64, neg64)
    kern, kern_g = run(lambda a, b: margin_mse_loss(a, b, teacher.to(device), reduction=reduction,
                                                    backend="kernel"), pos, neg)
    naive, naive_g = run(lambda a, b: _naive_lowp_scores(a, b, teacher.to(device), reduction), pos, neg)
    assert kern.dtype == dtype
    assert_within_lowp_bound(kern.cpu(), naive.cpu(), exact, dtype, "loss")
    for k, n_, e, name in zip(kern_g, naive_g, exact_g, ("grad_pos", "grad_neg"), strict=False):
        assert_within_lowp_bound(k.cpu(), n_.cpu(), e, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_low_precision_error_bound(device, dtype):
    gen = torch.Generator().manual_seed(4)
    q64, p64, n64 = embeddings(64, 4, 384, torch.float64, "cpu", gen)
    teacher = make_teacher("scores", 64, 4, torch.float32, gen=gen)
    low = [x.detach().to(device, dtype).requires_grad_() for x in (q64, p64, n64)]

    def naive(q, p, negs):  # sentence-transformers: pairwise_dot_score in the model's dtype
        s_pos = (q * p).sum(-1)
        s_neg = (q[:, None] * negs).sum(-1)
        t = teacher.to(q.device)
        return torch.nn.functional.mse_loss(s_pos[:, None] - s_neg, (t[:, :1] - t[:, 1:]).to(q.dtype))

    exact = margin_mse_from_embeddings_reference(q64, p64, n64, teacher.double())
    exact_g = torch.autograd.grad(exact, (q64, p64, n64))
    kern = margin_mse_from_embeddings(*low, teacher.to(device), backend="kernel")
    kern_g = torch.autograd.grad(kern, low)
    naive_out = naive(*low)
    naive_g = torch.autograd.grad(naive_out, low)
    assert_within_lowp_bound(kern.cpu(), naive_out.cpu(), exact, dtype, "loss")
    for k, n_, e, name in zip(kern_g, naive_g, exact_g, ("grad_query", "grad_positive", "grad_negatives"), strict=False):
        assert_within_lowp_bound(k.cpu(), n_.cpu(), e, dtype, name)


# ---------------------------------------------------------------------------------------------
# Property tests (hypothesis): shapes, layouts, formats, reductions


@given(
    batch=st.integers(1, 40),
    n_neg=st.integers(1, 64),
    fmt=st.sampled_from(["scores", "margins"]),
    reduction=st.sampled_from(REDUCTIONS),
    contiguous=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_scores_property(batch, n_neg, fmt, reduction, contiguous, seed):
    gen = torch.Generator().manual_seed(seed)
    pos, neg = scores(batch, n_neg, torch.float64, "cpu", gen)
    teacher = make_teacher(fmt, batch, n_neg, torch.float64, gen=gen)
    if not contiguous:
        pos, neg, teacher = non_contiguous(pos), non_contiguous(neg), non_contiguous(teacher)
    out = margin_mse_loss(pos, neg, teacher, reduction=reduction, backend="kernel")
    ref = margin_mse_reference(pos, neg, teacher, reduction=reduction)
    assert_close_fp64(out, ref)
    for g, r in zip(grads(out, (pos, neg)), grads(ref, (pos, neg)), strict=False):
        assert_close_fp64(g, r)


@given(
    batch=st.integers(1, 24),
    n_neg=st.integers(1, 64),
    dim=st.integers(1, 70),
    reduction=st.sampled_from(REDUCTIONS),
    layout=st.sampled_from(["contiguous", "strided_last", "slice_of_stack"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_embedding_property(batch, n_neg, dim, reduction, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    q, p, negs = embeddings(batch, n_neg, dim, torch.float64, "cpu", gen)
    if layout == "strided_last":
        q, p, negs = non_contiguous(q), non_contiguous(p), non_contiguous(negs)
    elif layout == "slice_of_stack":  # one [B, n+2, D] tensor holding every column (row-strided views)
        stack = torch.cat([q.detach()[:, None], p.detach()[:, None], negs.detach()], 1).requires_grad_()
        q, p, negs = stack[:, 0], stack[:, 1], stack[:, 2:]
    teacher = make_teacher("scores", batch, n_neg, torch.float64, gen=gen)
    inputs = (q, p, negs) if layout != "slice_of_stack" else (stack,)
    out = margin_mse_from_embeddings(q, p, negs, teacher, reduction=reduction, backend="kernel")
    ref = margin_mse_from_embeddings_reference(q, p, negs, teacher, reduction=reduction)
    assert_close_fp64(out, ref)
    for g, r in zip(grads(out, inputs), grads(ref, inputs), strict=False):
        assert_close_fp64(g, r)


# ---------------------------------------------------------------------------------------------
# sentence-transformers parity


class _NoModel(torch.nn.Module):
    """Stands in for a SentenceTransformer: compute_loss_from_embeddings never calls the model."""


def _st_loss():
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss as STMarginMSELoss

    return STMarginMSELoss(_NoModel())


ST_CASES = [(n, fmt) for n in (1, 3) for fmt in TEACHER_FORMATS if fmt != "margins_1d" or n == 1]


@pytest.mark.parametrize("n_neg, fmt", ST_CASES)
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_sentence_transformers_parity(n_neg, fmt, backend):
    gen = torch.Generator().manual_seed(5)
    q, p, negs = embeddings(12, n_neg, 32, torch.float64, "cpu", gen)
    labels = make_teacher(fmt, 12, n_neg, torch.float64, gen=gen)
    st_inputs = [q, p, *negs.unbind(1)]
    expected = _st_loss().compute_loss_from_embeddings(st_inputs, labels)
    actual = margin_mse_from_embeddings(q, p, negs, labels, backend=backend)
    assert_close_fp64(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, (q, p, negs)), torch.autograd.grad(expected, (q, p, negs)), strict=False):
        assert_close_fp64(a, e)
    # the same through precomputed scores (cross-encoder style)
    s_pos, s_neg = (q * p).sum(-1), torch.einsum("bd,bnd->bn", q, negs)
    assert_close_fp64(margin_mse_loss(s_pos, s_neg, labels, backend=backend), expected)


def test_sentence_transformers_label_precedence_n1():
    """With one negative, [B, 2] labels are raw scores and [B, 1] labels are margins (as in ST)."""
    gen = torch.Generator().manual_seed(6)
    pos, neg = scores(5, 1, torch.float64, "cpu", gen)
    two = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    as_scores = margin_mse_loss(pos, neg[:, 0], two, backend="kernel")
    expected = ((pos - neg[:, 0]) - (two[:, 0] - two[:, 1])).pow(2).mean()
    assert_close_fp64(as_scores, expected)
    one = two[:, :1]
    assert_close_fp64(margin_mse_loss(pos, neg, one, backend="kernel"),
                      ((pos - neg[:, 0]) - one[:, 0]).pow(2).mean())


# ---------------------------------------------------------------------------------------------
# Gradients, opcheck, compile


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("fmt", ["scores", "margins"])
def test_gradcheck(device, reduction, fmt):
    gen = torch.Generator().manual_seed(7)
    pos, neg = scores(6, 3, torch.float64, device, gen)
    teacher = make_teacher(fmt, 6, 3, torch.float64, device, gen)
    assert torch.autograd.gradcheck(
        lambda a, b: margin_mse_loss(a, b, teacher, reduction=reduction, backend="kernel"), (pos, neg)
    )
    q, p, negs = embeddings(4, 3, 5, torch.float64, device, gen)
    assert torch.autograd.gradcheck(
        lambda a, b, c: margin_mse_from_embeddings(a, b, c, teacher[:4], reduction=reduction, backend="kernel"),
        (q, p, negs),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(device, reduction):
    from kdloss._build import require
    from kdloss._ops import REDUCTION_CODES

    require("margin_mse", device.type)
    code = REDUCTION_CODES[reduction]
    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        pos, neg = (x.detach().to(dtype).requires_grad_() for x in scores(5, 3, torch.float64, device, gen))
        q, p, negs = (x.detach().to(dtype).requires_grad_() for x in embeddings(5, 3, 9, torch.float64, device, gen))
        for is_scores in (True, False):
            teacher = make_teacher("scores" if is_scores else "margins", 5, 3, acc, device, gen)
            grad = torch.rand((5, 3) if code == 0 else (), dtype=dtype, device=device)
            torch.library.opcheck(torch.ops.kdloss.margin_mse_fwd.default, (pos, neg, teacher, is_scores, code))
            torch.library.opcheck(torch.ops.kdloss.margin_mse_bwd.default,
                                  (grad, pos.detach(), neg.detach(), teacher, is_scores, code))
            torch.library.opcheck(torch.ops.kdloss.margin_mse_emb_fwd.default, (q, p, negs, teacher, is_scores, code))
            torch.library.opcheck(torch.ops.kdloss.margin_mse_emb_bwd.default,
                                  (grad, q.detach(), p.detach(), negs.detach(), teacher, is_scores, code))


@pytest.mark.parametrize("dynamic, backend", [(False, "kernel"), (True, "kernel"), (False, "auto")])
def test_torch_compile_fullgraph(device, dynamic, backend):
    torch._dynamo.reset()
    loss_fn = MarginMSELoss(backend=backend)
    gen = torch.Generator().manual_seed(9)

    def step(pos, neg, q, p, negs, teacher):
        return loss_fn(pos, neg, teacher) + loss_fn.from_embeddings(q, p, negs, teacher)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for batch in (8, 13):  # a second shape exercises recompilation / dynamic shapes
        pos, neg = scores(batch, 4, torch.float32, device, gen)
        q, p, negs = embeddings(batch, 4, 16, torch.float32, device, gen)
        teacher = make_teacher("scores", batch, 4, torch.float32, device, gen)
        inputs = (pos, neg, q, p, negs)
        eager = step(*inputs, teacher)
        eager_g = torch.autograd.grad(eager, inputs)
        out = compiled(*inputs, teacher)
        out_g = torch.autograd.grad(out, inputs)
        torch.testing.assert_close(out, eager)
        for a, b in zip(out_g, eager_g, strict=False):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_not_last_layer(device, reduction):
    """The loss feeds further computation (×2 and a weighted sum): upstream gradients must be used."""
    gen = torch.Generator().manual_seed(10)
    q, p, negs = embeddings(6, 3, 8, torch.float64, device, gen)
    teacher = make_teacher("margins", 6, 3, torch.float64, device, gen)
    weight = torch.rand(6, 3, generator=gen, dtype=torch.float64).to(device) if reduction == "none" else 1.0

    def layer_scores():  # the scores come from a layer below the loss
        return (q * p).sum(-1), torch.einsum("bd,bnd->bn", q, negs)

    def via_scores():
        return margin_mse_loss(*layer_scores(), teacher, reduction=reduction, backend="kernel")

    def via_embeddings():
        return margin_mse_from_embeddings(q, p, negs, teacher, reduction=reduction, backend="kernel")

    for fn in (via_scores, via_embeddings):
        out = (fn() * 2 * weight).sum()
        ref_out = (margin_mse_reference(*layer_scores(), teacher, reduction=reduction) * 2 * weight).sum()
        assert_close_fp64(out, ref_out)
        for a, b in zip(torch.autograd.grad(out, (q, p, negs)), torch.autograd.grad(ref_out, (q, p, negs)), strict=False):
            assert_close_fp64(a, b)


# ---------------------------------------------------------------------------------------------
# Edge cases and contract


def test_empty_batch_is_zero_not_nan(device):
    pos = torch.zeros(0, device=device, requires_grad=True)
    neg = torch.zeros(0, 3, device=device, requires_grad=True)
    teacher = torch.zeros(0, 4, device=device)
    for reduction in ("mean", "sum"):
        out = margin_mse_loss(pos, neg, teacher, reduction=reduction, backend="kernel")
        assert out.item() == 0.0
        gp, gn = torch.autograd.grad(out, (pos, neg))
        assert gp.shape == (0,) and gn.shape == (0, 3)
    assert margin_mse_loss(pos, neg, teacher, reduction="none", backend="kernel").shape == (0, 3)
    q = torch.zeros(0, 8, device=device, requires_grad=True)
    assert margin_mse_from_embeddings(q, q, torch.zeros(0, 3, 8, device=device), teacher, backend="kernel").item() == 0.0


def test_teacher_is_a_constant(device):
    gen = torch.Generator().manual_seed(11)
    pos, neg = scores(4, 2, torch.float32, device, gen)
    teacher = make_teacher("scores", 4, 2, torch.float32, device, gen).requires_grad_()
    margin_mse_loss(pos, neg, teacher, backend="kernel").backward()
    assert teacher.grad is None and pos.grad is not None


def test_mixed_teacher_dtype_and_output_dtype(device):
    gen = torch.Generator().manual_seed(12)
    pos, neg = scores(8, 2, torch.bfloat16, device, gen)
    for teacher_dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
        teacher = make_teacher("scores", 8, 2, teacher_dtype, device, gen)
        out = margin_mse_loss(pos, neg, teacher, backend="kernel")
        ref = margin_mse_reference(pos, neg, teacher)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out)
        assert out.item() == ref.item()


def test_module_matches_functional(device):
    gen = torch.Generator().manual_seed(13)
    pos, neg = scores(8, 3, torch.float32, device, gen)
    teacher = make_teacher("margins", 8, 3, torch.float32, device, gen)
    for reduction in REDUCTIONS:
        module = MarginMSELoss(reduction=reduction)
        torch.testing.assert_close(module(pos, neg, teacher),
                                   margin_mse_loss(pos, neg, teacher, reduction=reduction))
    assert "reduction='none'" in repr(module)


def test_cpu_results_independent_of_thread_count():
    gen = torch.Generator().manual_seed(14)
    pos, neg = scores(20000, 8, torch.float32, "cpu", gen)
    q, p, negs = embeddings(512, 8, 64, torch.float32, "cpu", gen)
    t_s = make_teacher("scores", 20000, 8, gen=gen)
    t_e = t_s[:512]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            a = margin_mse_loss(pos, neg, t_s, backend="kernel")
            b = margin_mse_from_embeddings(q, p, negs, t_e, backend="kernel")
            results.append((a, b, *torch.autograd.grad(a + b, (pos, neg, q, p, negs))))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for x, y in zip(results[0], other, strict=False):
            assert torch.equal(x, y)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda P, N, T: margin_mse_loss(P[:, None], N, T), "student_pos must have rank 1"),
        (lambda P, N, T: margin_mse_loss(P, N[None], T), "student_neg must have rank 1 or 2"),
        (lambda P, N, T: margin_mse_loss(P, N[:3], T), r"student_neg must be \[B\] or \[B, n\] with B = 4"),
        (lambda P, N, T: margin_mse_loss(P, N, T[:, :2]), r"teacher must be \[B, n\+1\]"),
        (lambda P, N, T: margin_mse_loss(P, N, T[0]), r"teacher must be \[B, n\+1\]"),
        (lambda P, N, T: margin_mse_loss(P, N, T.long()), "teacher must be a floating-point tensor"),
        (lambda P, N, T: margin_mse_loss(P.int(), N, T), "student_pos must be a floating-point tensor"),
        (lambda P, N, T: margin_mse_loss(P, N.double(), T), "student_neg must have the dtype of student_pos"),
        (lambda P, N, T: margin_mse_loss(P, N, T, reduction="batchmean"), "reduction must be one of"),
        (lambda P, N, T: margin_mse_loss(P, N, T, backend="triton"), "backend must be one of"),
        (lambda P, N, T: margin_mse_loss(P, N, T.to("meta")), "teacher must have the device of student_pos"),
        (lambda P, N, T: margin_mse_loss(P.tolist(), N, T), "student_pos must be a torch.Tensor"),
        (lambda P, N, T: margin_mse_loss(P, N[:, :0], T[:, :1]), "at least one negative"),
        (lambda P, N, T: MarginMSELoss(reduction="avg"), "reduction must be one of"),
    ],
)
def test_bad_score_inputs(call, match):
    pos, neg = torch.randn(4), torch.randn(4, 3)
    teacher = torch.randn(4, 4)
    with raises_naming(match):
        call(pos, neg, teacher)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda Q, P, N, T: margin_mse_from_embeddings(Q[0], P, N, T), "query must have rank 2"),
        (lambda Q, P, N, T: margin_mse_from_embeddings(Q, P[:, :5], N, T), "positive must have the shape of query"),
        (lambda Q, P, N, T: margin_mse_from_embeddings(Q, P, N[..., :5], T), r"negatives must be \[B, D\] or \[B, n, D\]"),
        (lambda Q, P, N, T: margin_mse_from_embeddings(Q, P, N[None], T), "negatives must have rank 2 or 3"),
        (lambda Q, P, N, T: margin_mse_from_embeddings(Q, P.half(), N, T), "positive must have the dtype of query"),
        (lambda Q, P, N, T: margin_mse_from_embeddings(Q, P, N, T[:, :2]), r"teacher must be \[B, n\+1\]"),
        (lambda Q, P, N, T: margin_mse_from_embeddings(Q, P, N.to("meta"), T), "negatives must have the device of query"),
    ],
)
def test_bad_embedding_inputs(call, match):
    q, p, negs = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 3, 8)
    with raises_naming(match):
        call(q, p, negs, torch.randn(4, 4))


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_auto_backend_falls_back_with_one_warning_and_kernel_raises():
    result = _run_python(
        """
        import warnings, torch, kdloss
        from kdloss.functional import margin_mse_loss
        from kdloss.reference import margin_mse_reference
        pos, neg, t = torch.randn(4), torch.randn(4, 2), torch.randn(4, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = margin_mse_loss(pos, neg, t)
            b = margin_mse_loss(pos, neg, t)
        msgs = [str(w.message) for w in caught if "kdloss" in str(w.message)]
        assert len(msgs) == 1 and "KDLOSS_DISABLE_KERNELS" in msgs[0], msgs
        assert torch.equal(a, margin_mse_reference(pos, neg, t)) and torch.equal(a, b)
        try:
            margin_mse_loss(pos, neg, t, backend="kernel")
        except kdloss.KernelUnavailableError as exc:
            assert "unavailable" in str(exc) or "no usable kernel" in str(exc)
        else:
            raise AssertionError("backend='kernel' did not raise")
        print("OK")
        """,
        KDLOSS_DISABLE_KERNELS="1",
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


def test_build_failure_falls_back_without_breaking_import(tmp_path):
    """A broken source tree: import works, auto falls back, the reason is reported."""
    import shutil

    csrc = tmp_path / "csrc"
    shutil.copytree(kdloss._build.csrc_dir(), csrc)
    (csrc / "cpu" / "margin_mse.cpp").write_text("#error deliberately broken\n")
    result = _run_python(
        """
        import warnings, torch, kdloss
        from kdloss.functional import margin_mse_loss
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = margin_mse_loss(torch.randn(3), torch.randn(3), torch.randn(3))
        assert any("deliberately broken" in str(w.message) or "Error building" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        assert torch.isfinite(out)
        print("OK")
        """,
        KDLOSS_CSRC_DIR=str(csrc),
        KDLOSS_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------
# CUDA-specific (run on a GPU; skipped only where none exists)


@cuda_only
def test_cuda_deterministic_and_no_host_sync_in_backward():
    gen = torch.Generator().manual_seed(16)
    pos, neg = scores(100000, 8, torch.float32, "cuda", gen)
    teacher = make_teacher("scores", 100000, 8, torch.float32, "cuda", gen)
    first = margin_mse_loss(pos, neg, teacher, backend="kernel")
    for _ in range(3):
        assert torch.equal(margin_mse_loss(pos, neg, teacher, backend="kernel"), first)
    out = margin_mse_loss(pos, neg, teacher, backend="kernel")
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.autograd.grad(out, (pos, neg))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_ahead_of_time_cmake_build_is_preferred(tmp_path):
    """`python -m kdloss.build --aot` output is loaded instead of a JIT build (nothing compiled)."""
    out, cache = tmp_path / "lib", tmp_path / "cache"
    build = subprocess.run([sys.executable, "-m", "kdloss.build", "--aot", "--device", "cpu", "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (out / "libkdloss_cpu.so").exists() and (out / "manifest.json").exists()
    result = _run_python(
        """
        import os, torch
        from kdloss import _build
        from kdloss.functional import margin_mse_loss
        from kdloss.reference import margin_mse_reference
        assert _build.load("margin_mse", "cpu"), _build.failure("margin_mse", "cpu")
        pos, neg, t = torch.randn(5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3)
        torch.testing.assert_close(margin_mse_loss(pos, neg, t, backend="kernel"), margin_mse_reference(pos, neg, t))
        assert not os.path.exists(os.environ["KDLOSS_CACHE_DIR"]), "a JIT build ran"
        print("OK")
        """,
        KDLOSS_PREBUILT_DIR=str(out),
        KDLOSS_CACHE_DIR=str(cache),
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr + result.stdout
