"""Top-k sparse KL (spec §3, decision 3): the reference against independent formulas (dense KD,
DistillKit's recipe), kernel parity, the semantics users were burned by elsewhere, gradcheck,
opcheck, torch.compile, bad inputs. Random-shape parity for every dtype runs in tests/test_fuzz.py
through kdloss/testing/topk_kl.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import kdloss
from kdloss import TopKKLLoss
from kdloss._ops import float_arg
from kdloss.functional import topk_kl_loss
from kdloss.reference import teacher_log_targets, topk_kl_reference

from helpers import assert_close_fp64, cuda_only, raises_naming

REDUCTIONS = ("mean", "sum", "none")
VARIANTS = [  # (values, tail, student_support)
    ("logprobs", "renorm", "full"), ("logprobs", "bucket", "full"), ("logprobs", "none", "full"),
    ("logprobs", "renorm", "topk"), ("logprobs", "none", "topk"), ("logits", "renorm", "full"),
    ("logits", "renorm", "topk"),
]


def make_problem(rows=6, vocab=50, k=8, device="cpu", dtype=torch.float64, seed=0, values="logprobs"):
    """Student logits [rows, V] (leaf), teacher top-k ids and values (fp64 or fp32), dense teacher logits."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    teacher_logits = 2.0 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    ids = teacher_logits.topk(k, dim=-1).indices
    if values == "logprobs":
        vals = torch.log_softmax(teacher_logits, -1).gather(-1, ids)
    else:
        vals = teacher_logits.gather(-1, ids)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (student.to(device, dtype).requires_grad_(), ids.to(device), vals.to(device, acc),
            teacher_logits.to(device))


def grad_of(loss, x, weight=None):
    if weight is None:
        weight = torch.ones_like(loss)
    (g,) = torch.autograd.grad(loss, x, grad_outputs=weight)
    return g


# ---------------------------------------------------------------------------------------------
# The reference against independent formulas


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_reference_with_all_ids_kept_is_dense_kd(temperature):
    """k = V, renorm: T²·KL(softmax(t/T) ‖ softmax(z/T)) per counted row — temperature on both sides."""
    z, _, _, t = make_problem(rows=5, vocab=12, k=12)
    ids = torch.arange(12).expand(5, 12)
    for values, stored in (("logprobs", torch.log_softmax(t, -1).gather(-1, ids)), ("logits", t.gather(-1, ids))):
        out = topk_kl_reference(z, ids, stored, values=values, temperature=temperature, reduction="none")
        dense = F.kl_div(torch.log_softmax(z / temperature, -1), torch.log_softmax(t / temperature, -1),
                         reduction="none", log_target=True).sum(-1) * temperature**2
        assert_close_fp64(out, dense)
        kernel = topk_kl_loss(z, ids, stored, values=values, temperature=temperature, reduction="none",
                              backend="kernel")
        assert_close_fp64(kernel, dense)
        assert_close_fp64(grad_of(kernel, z), grad_of(dense, z))


def distillkit_style(z, ids, logprobs, mask, *, tail, temperature, teacher_temperature=1.0):
    """DistillKit's recipe written out as in spec §3.1/§3.3 (probability domain, dense student
    log-softmax, residual clamped to [0, 1], ×T², mean over masked rows)."""
    a = teacher_temperature / temperature
    p = logprobs.exp()
    log_q = torch.log_softmax(z * (1.0 / temperature), -1).gather(-1, ids)
    if tail == "renorm":
        p_hat = p**a / (p**a).sum(-1, keepdim=True)
        rows = (p_hat * (p_hat.log() - log_q)).sum(-1)
    else:
        r = (1 - p.sum(-1)).clamp(0, 1)
        zsum = (p**a).sum(-1) + r**a
        p_hat, r_hat = p**a / zsum[:, None], r**a / zsum
        r_s = 1 - log_q.exp().sum(-1)
        log_rs = torch.log1p(-(1 - r_s).clamp(1e-8, 1 - 1e-8))
        rows = (p_hat * (p_hat.log() - log_q)).sum(-1) + r_hat * (r_hat.log() - log_rs)
    return (rows * mask).sum() * temperature**2 / mask.sum()


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
@pytest.mark.parametrize("temperature, teacher_temperature", [(1.0, 1.0), (2.0, 1.0), (2.0, 1.5), (0.8, 1.0)])
def test_matches_distillkit_recipe_fp64(tail, temperature, teacher_temperature):
    z, ids, lp, _ = make_problem(rows=9, vocab=40, k=6, seed=3)
    labels = torch.tensor([5, -100, 3, 1, -100, 7, 2, 2, 9])
    mask = (labels != -100).double()
    want = distillkit_style(z, ids, lp, mask, tail=tail, temperature=temperature,
                            teacher_temperature=teacher_temperature)
    want_grad = grad_of(want, z)
    for backend in ("reference", "kernel"):
        got = topk_kl_loss(z, ids, lp, labels, tail=tail, temperature=temperature,
                           teacher_temperature=teacher_temperature, backend=backend)
        assert_close_fp64(got, want)
        assert_close_fp64(grad_of(got, z), want_grad)


def test_closed_form_gradients_of_the_spec():
    """Spec §3.4's table, per variant, at T = 1 (multiply by the mean's 1/N)."""
    z, ids, lp, _ = make_problem(rows=4, vocab=30, k=5, seed=4)
    q = torch.softmax(z.detach(), -1)
    p = lp.exp()
    in_k = torch.zeros_like(q).scatter(1, ids, 1.0).bool()
    p_dense = torch.zeros_like(q).scatter(1, ids, p)
    renorm = p_dense / p.sum(-1, keepdim=True)
    mass = p.sum(-1, keepdim=True)
    r_hat = 1 - mass
    r_s = 1 - (q * in_k).sum(-1, keepdim=True)
    expected = {
        "renorm": q - renorm,
        "none": mass * q - p_dense,
        "bucket": torch.where(in_k, q - p_dense, q * (1 - r_hat / r_s)),
    }
    for tail, want in expected.items():
        got = grad_of(topk_kl_loss(z, ids, lp, tail=tail, reduction="sum", backend="kernel"), z)
        assert_close_fp64(got, want)
    q_k = torch.softmax(z.detach().gather(1, ids), -1)
    want_topk = torch.zeros_like(q).scatter(1, ids, q_k - p / mass)
    got = grad_of(topk_kl_loss(z, ids, lp, student_support="topk", reduction="sum", backend="kernel"), z)
    assert_close_fp64(got, want_topk)


@pytest.mark.parametrize("power", [1.0, 0.5, 2.0])
def test_teacher_power_transform_equals_tempered_softmax(power):
    """p^a renormalised over K equals softmax(a·logits) over K when the values are log-probs."""
    _, ids, lp, t = make_problem(rows=3, vocab=20, k=7, seed=5)
    log_p_hat, log_r = teacher_log_targets(lp, power=power)
    want = torch.log_softmax(power * t.gather(-1, ids), -1)
    assert_close_fp64(log_p_hat, want)
    assert torch.isneginf(log_r).all()
    bucket, tail = teacher_log_targets(lp, tail="bucket", power=power)
    total = torch.logsumexp(torch.cat([bucket, tail[:, None]], -1), -1)
    assert_close_fp64(total, torch.zeros(3, dtype=torch.float64), atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Kernel parity in fp64 (random shapes and every dtype: tests/test_fuzz.py)


@pytest.mark.parametrize("values, tail, support", VARIANTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernel_matches_reference_fp64(device, values, tail, support, reduction):
    z, ids, vals, _ = make_problem(rows=7, vocab=3000, k=9, device=device, seed=6, values=values)
    labels = torch.tensor([1, -100, 4, 0, 9, -100, 2], device=device)
    kw = dict(values=values, tail=tail, student_support=support, temperature=1.7, teacher_temperature=1.2,
              reduction=reduction)
    weight = torch.rand(7, dtype=torch.float64, device=device) if reduction == "none" else None
    a = topk_kl_loss(z, ids, vals, labels, backend="kernel", **kw)
    b = topk_kl_loss(z, ids, vals, labels, backend="reference", **kw)
    assert_close_fp64(a, b)
    assert_close_fp64(grad_of(a, z, weight), grad_of(b, z, weight))


def test_leading_dims_and_module(device):
    z, ids, lp, _ = make_problem(rows=12, vocab=64, k=5, device=device, seed=7)
    labels = torch.arange(12, device=device) % 5 - 1  # some -1 are not ignore_index: invalid
    labels[labels == -1] = -100
    module = TopKKLLoss(temperature=2.0, reduction="none")
    flat = module(z, ids, lp, labels)
    shaped = module(z.reshape(3, 4, 64), ids.reshape(3, 4, 5), lp.reshape(3, 4, 5), labels.reshape(3, 4))
    assert shaped.shape == (3, 4)
    assert_close_fp64(shaped.reshape(12), flat)
    assert "temperature=2.0" in repr(module)


# ---------------------------------------------------------------------------------------------
# Semantics users were burned by elsewhere


def test_neg_inf_padded_teacher_slots_are_probability_zero(device):
    z, ids, lp, _ = make_problem(rows=4, vocab=40, k=6, device=device, seed=8)
    padded_ids = torch.cat([ids, ids[:, :1].expand(4, 3)], dim=1)  # repeated ids, no mass
    padded_lp = torch.cat([lp, torch.full((4, 3), float("-inf"), dtype=lp.dtype, device=device)], dim=1)
    for tail in ("renorm", "bucket", "none"):
        for backend in ("kernel", "reference"):
            a = topk_kl_loss(z, padded_ids, padded_lp, tail=tail, backend=backend)
            b = topk_kl_loss(z, ids, lp, tail=tail, backend=backend)
            assert torch.isfinite(a)
            assert_close_fp64(a, b)
            assert_close_fp64(grad_of(a, z), grad_of(b, z))


def test_teacher_row_without_mass_contributes_nothing(device):
    z, ids, lp, _ = make_problem(rows=3, vocab=30, k=4, device=device, seed=9)
    lp = lp.clone()
    lp[1] = float("-inf")
    for backend in ("kernel", "reference"):
        rows = topk_kl_loss(z, ids, lp, reduction="none", backend=backend)
        g = grad_of(rows.sum(), z)
        assert rows[1].item() == 0.0 and torch.isfinite(rows).all()
        assert torch.count_nonzero(g[1]) == 0 and torch.isfinite(g).all()


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_all_rows_ignored_gives_zero_and_zero_gradient(device, backend):
    z, ids, lp, _ = make_problem(rows=5, vocab=30, k=4, device=device, seed=10)
    z = (z.detach() * float("nan")).requires_grad_()  # ignored rows are never read
    labels = torch.full((5,), -100, device=device)
    for kw in ({}, {"num_items_in_batch": 0}, {"reduction": "sum"}):
        out = topk_kl_loss(z, ids, lp, labels, backend=backend, **kw)
        assert out.item() == 0.0
        assert torch.equal(grad_of(out, z), torch.zeros_like(z))
    empty = topk_kl_loss(z[:0], ids[:0], lp[:0], backend=backend)
    assert empty.item() == 0.0


def test_ignore_index_is_applied_and_aligned(device):
    """A row counts iff its own label (same position) is not ignore_index; custom index honoured."""
    z, ids, lp, _ = make_problem(rows=6, vocab=30, k=4, device=device, seed=11)
    rows = topk_kl_loss(z, ids, lp, reduction="none", backend="kernel")
    labels = torch.tensor([3, 7, 7, 1, 7, 2], device=device)
    out = topk_kl_loss(z, ids, lp, labels, ignore_index=7, backend="kernel")
    keep = labels != 7
    assert_close_fp64(out, rows[keep].sum() / keep.sum())
    none = topk_kl_loss(z, ids, lp, labels, ignore_index=7, reduction="none", backend="kernel")
    assert torch.equal(none[~keep], torch.zeros(3, dtype=z.dtype, device=device))


def test_num_items_in_batch_matches_gradient_accumulation(device):
    """Two micro-batches divided by the global count add up to the full batch's mean."""
    z, ids, lp, _ = make_problem(rows=8, vocab=30, k=4, device=device, seed=12)
    labels = torch.tensor([1, -100, 2, 3, -100, -100, 4, 5], device=device)
    full = topk_kl_loss(z, ids, lp, labels, backend="kernel")
    count = int((labels != -100).sum())
    parts = [topk_kl_loss(z[s], ids[s], lp[s], labels[s], num_items_in_batch=n, backend="kernel")
             for s, n in ((slice(0, 4), count), (slice(4, 8), torch.tensor(count, device=device)))]
    assert_close_fp64(parts[0] + parts[1], full)
    assert_close_fp64(grad_of(parts[0] + parts[1], z), grad_of(full, z))


def test_renorm_loss_is_non_negative_and_zero_at_the_teacher():
    """No hidden hard-label term: a student equal to the teacher gives 0 loss and 0 gradient."""
    _, _, _, t = make_problem(rows=4, vocab=25, k=25, seed=13)
    ids = torch.arange(25).expand(4, 25)
    z = t.clone().requires_grad_()
    labels = torch.tensor([0, 3, 4, 24])
    for temperature in (1.0, 3.0):
        out = topk_kl_loss(z, ids, t.gather(-1, ids), labels, values="logits", temperature=temperature,
                           backend="kernel")
        assert abs(out.item()) < 1e-12
        assert grad_of(out, z).abs().max().item() < 1e-12


@given(rows=st.integers(1, 6), vocab=st.integers(2, 60), k=st.integers(1, 10), temperature=st.sampled_from([0.5, 1.0, 2.5]),
       magnitude=st.sampled_from([0.1, 5.0, 50.0]), seed=st.integers(0, 2**31 - 1))
def test_truncated_kl_with_renorm_is_non_negative(rows, vocab, k, temperature, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    k = min(k, vocab)
    z = magnitude * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    ids = torch.rand(rows, vocab, generator=gen).argsort(-1)[:, :k]
    lp = torch.log_softmax(magnitude * torch.randn(rows, vocab, generator=gen, dtype=torch.float64), -1).gather(-1, ids)
    out = topk_kl_loss(z, ids, lp, temperature=temperature, reduction="none", backend="kernel")
    assert (out >= -1e-12).all(), out


def test_scale_by_t2_and_temperature_in_gradient(device):
    z, ids, lp, _ = make_problem(rows=3, vocab=20, k=5, device=device, seed=14)
    with_t2 = topk_kl_loss(z, ids, lp, temperature=3.0, backend="kernel")
    without = topk_kl_loss(z, ids, lp, temperature=3.0, scale_by_t2=False, backend="kernel")
    assert_close_fp64(with_t2, 9.0 * without)
    assert_close_fp64(grad_of(with_t2, z), 9.0 * grad_of(without, z))


def test_teacher_is_a_constant_and_output_dtype(device):
    z, ids, lp, _ = make_problem(rows=3, vocab=20, k=5, device=device, dtype=torch.bfloat16, seed=15)
    lp = lp.clone().requires_grad_()
    out = topk_kl_loss(z, ids, lp, backend="kernel")
    assert out.dtype == torch.bfloat16
    gz, gt = torch.autograd.grad(out, (z, lp), allow_unused=True)
    assert gz.dtype == torch.bfloat16 and gt is None
    int32 = topk_kl_loss(z, ids.int(), lp.detach(), backend="kernel")
    assert torch.equal(int32, out.detach())


def test_large_vocab_crossing_blocks_and_neg_inf_student_logits():
    """Rows whose maximum moves across the kernel's 2048-element blocks, and −inf vocabulary padding."""
    gen = torch.Generator().manual_seed(16)
    z = torch.randn(4, 9000, generator=gen, dtype=torch.float64)
    z[0, 8999] = 80.0
    z[1, 100] = 80.0
    z[2] += torch.linspace(0, 60, 9000, dtype=torch.float64)
    z[3, 6000:] = float("-inf")
    z.requires_grad_()
    ids = torch.stack([torch.randperm(6000, generator=gen)[:16] for _ in range(4)])
    lp = torch.log_softmax(torch.randn(4, 16, generator=gen, dtype=torch.float64), -1) - 0.5
    for tail in ("renorm", "bucket"):
        a = topk_kl_loss(z, ids, lp, tail=tail, reduction="none", backend="kernel")
        b = topk_kl_loss(z, ids, lp, tail=tail, reduction="none", backend="reference")
        assert_close_fp64(a, b)
        ga, gb = grad_of(a.sum(), z), grad_of(b.sum(), z)
        assert_close_fp64(ga, gb)
        assert torch.count_nonzero(ga[3, 6000:]) == 0


# ---------------------------------------------------------------------------------------------
# Gradients, opcheck, compile


@pytest.mark.parametrize("values, tail, support", VARIANTS)
def test_gradcheck(device, values, tail, support):
    z, ids, vals, _ = make_problem(rows=3, vocab=11, k=4, device=device, seed=17, values=values)
    labels = torch.tensor([2, -100, 5], device=device)

    def fn(x):
        return topk_kl_loss(x, ids, vals, labels, values=values, tail=tail, student_support=support,
                            temperature=1.3, reduction="none", backend="kernel")

    assert torch.autograd.gradcheck(fn, (z,))


def _op_args(device, dtype, reduction, full_support):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z, ids, lp, _ = make_problem(rows=5, vocab=33, k=4, device=device, seed=18)
    log_p, log_r = teacher_log_targets(lp.to(acc), tail="bucket")
    valid = torch.tensor([True, False, True, True, True], device=device)
    divisor = valid.sum().to(acc)
    z = z.detach().to(dtype).requires_grad_()
    return (z, ids, log_p, log_r, valid, divisor, float_arg(0.5), float_arg(4.0), full_support, reduction)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(device, reduction):
    from kdloss._build import require

    require("topk_kl", device.type)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for full_support in (True, False):
            args = _op_args(device, dtype, reduction, full_support)
            torch.library.opcheck(torch.ops.kdloss.topk_kl_fwd.default, args)
            loss, stats = torch.ops.kdloss.topk_kl_fwd(*args)
            grad = torch.rand(loss.shape, dtype=dtype, device=device)
            torch.library.opcheck(torch.ops.kdloss.topk_kl_bwd.default, (grad, stats, args[0].detach(), *args[1:]))


@pytest.mark.parametrize("dynamic, backend", [(False, "kernel"), (True, "kernel"), (False, "auto")])
def test_torch_compile_fullgraph(device, dynamic, backend):
    torch._dynamo.reset()
    loss_fn = TopKKLLoss(temperature=2.0, tail="bucket", backend=backend)

    def step(z, ids, lp, labels, n):
        return loss_fn(z, ids, lp, labels, num_items_in_batch=n)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for rows in (8, 13):
        z, ids, lp, _ = make_problem(rows=rows, vocab=40, k=5, device=device, dtype=torch.float32, seed=rows)
        labels = torch.arange(rows, device=device)
        labels[::3] = -100
        n = torch.tensor(rows, device=device)
        eager = step(z, ids, lp, labels, n)
        out = compiled(z, ids, lp, labels, n)
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(grad_of(out, z), grad_of(eager, z))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_not_last_layer(device, reduction):
    """The loss inside a larger graph: logits = hidden @ W, scaled, plus another term."""
    gen = torch.Generator().manual_seed(19)
    hidden = torch.randn(6, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.randn(30, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    _, ids, lp, _ = make_problem(rows=6, vocab=30, k=4, device=device, seed=20)
    row_weight = torch.rand(6, generator=gen, dtype=torch.float64).to(device)

    def total(backend):
        out = topk_kl_loss(hidden @ weight.T, ids, lp, temperature=1.5, reduction=reduction, backend=backend)
        out = (out * row_weight).sum() if reduction == "none" else 3.0 * out
        return out + (hidden**2).sum() * 0.1

    a, b = total("kernel"), total("reference")
    assert_close_fp64(a, b)
    for ga, gb in zip(torch.autograd.grad(a, (hidden, weight)), torch.autograd.grad(b, (hidden, weight)), strict=False):
        assert_close_fp64(ga, gb)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _bad_calls():
    z = torch.randn(4, 10)
    ids = torch.tensor([[0, 4, 9], [1, 2, 3], [7, 8, 5], [6, 0, 2]])
    lp = torch.log_softmax(torch.randn(4, 3), -1)
    dup = torch.tensor([[1, 1, 2]] * 4)
    labels = torch.zeros(4, dtype=torch.long)
    return [
        (lambda: topk_kl_loss(z.long(), ids, lp), "student_logits"),
        (lambda: topk_kl_loss(z[:, :0], ids[:, :0], lp[:, :0]), "student_logits"),
        (lambda: topk_kl_loss(z, ids.float(), lp), "teacher_ids"),
        (lambda: topk_kl_loss(z, ids[:3], lp[:3]), "teacher_ids"),
        (lambda: topk_kl_loss(z, ids[:, :0], lp[:, :0]), "teacher_ids"),
        (lambda: topk_kl_loss(z, ids, lp[:, :2]), "teacher_values"),
        (lambda: topk_kl_loss(z, ids, lp.long()), "teacher_values"),
        (lambda: topk_kl_loss(z, ids + 10, lp), "teacher_ids"),
        (lambda: topk_kl_loss(z, ids - 10, lp), "teacher_ids"),
        (lambda: topk_kl_loss(z, dup, lp), "teacher_ids"),
        (lambda: topk_kl_loss(z, ids, lp, labels[:3]), "labels"),
        (lambda: topk_kl_loss(z, ids, lp, labels.float()), "labels"),
        (lambda: topk_kl_loss(z, ids, lp, labels + 10), "labels"),
        (lambda: topk_kl_loss(z, ids, lp, values="probs"), "values"),
        (lambda: topk_kl_loss(z, ids, lp, tail="uniform"), "tail"),
        (lambda: topk_kl_loss(z, ids, lp, values="logits", tail="bucket"), "tail"),
        (lambda: topk_kl_loss(z, ids, lp, student_support="topk", tail="bucket"), "tail"),
        (lambda: topk_kl_loss(z, ids, lp, student_support="sparse"), "student_support"),
        (lambda: topk_kl_loss(z, ids, lp, temperature=0.0), "temperature"),
        (lambda: topk_kl_loss(z, ids, lp, temperature=float("nan")), "temperature"),
        (lambda: topk_kl_loss(z, ids, lp, teacher_temperature=-1.0), "teacher_temperature"),
        (lambda: topk_kl_loss(z, ids, lp, scale_by_t2=1), "scale_by_t2"),
        (lambda: topk_kl_loss(z, ids, lp, ignore_index=1.5), "ignore_index"),
        (lambda: topk_kl_loss(z, ids, lp, reduction="batchmean"), "reduction"),
        (lambda: topk_kl_loss(z, ids, lp, reduction="sum", num_items_in_batch=3), "num_items_in_batch"),
        (lambda: topk_kl_loss(z, ids, lp, num_items_in_batch=-1), "num_items_in_batch"),
        (lambda: topk_kl_loss(z, ids, lp, num_items_in_batch=torch.ones(2)), "num_items_in_batch"),
        (lambda: topk_kl_loss(z, ids, lp, backend="triton"), "backend"),
        (lambda: topk_kl_loss(z, ids, lp, torch.zeros(4, dtype=torch.long, device="meta")), "device"),
        (lambda: TopKKLLoss(tail="zero"), "tail"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_inputs_raise_naming_the_argument(index):
    call, name = _bad_calls()[index]
    with raises_naming(name):
        call()


def test_kernel_rejects_out_of_range_ids_on_direct_op_calls():
    from kdloss._build import require

    require("topk_kl", "cpu")
    args = list(_op_args("cpu", torch.float32, 1, True))
    args[1] = args[1] + 100
    with pytest.raises(ValueError, match="ids must lie"):
        torch.ops.kdloss.topk_kl_fwd(*args)


# ---------------------------------------------------------------------------------------------
# One pass: the gradient computed in the forward, strided [B, T, V] logits, repeated ids


def _fwd_grad_args(device, dtype, reduction, full_support, compute_grad, batched=False):
    args = list(_op_args(device, dtype, reduction, full_support))
    if batched:  # rows of a [B, T, V] label-shift slice: batch stride of T + 1 rows
        z = args[0].detach()
        full = torch.cat([z, z[:1]]).reshape(2, 3, z.shape[-1])
        args[0] = full[:, :-1].requires_grad_()
        args[1:5] = [a[:4] for a in args[1:5]]
        args[5] = args[4].sum().to(args[5].dtype)
    return (*args, compute_grad, False)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_fwd_grad(device, reduction):
    from kdloss._build import require

    require("topk_kl", device.type)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for full_support, compute_grad, batched in [(True, True, False), (False, True, True), (True, False, True)]:
            args = _fwd_grad_args(device, dtype, reduction, full_support, compute_grad, batched)
            torch.library.opcheck(torch.ops.kdloss.topk_kl_fwd_grad.default, args)
            loss, stats = torch.ops.kdloss.topk_kl_fwd(*args[:-2])
            grad = torch.rand(loss.shape, dtype=loss.dtype, device=device)
            torch.library.opcheck(torch.ops.kdloss.topk_kl_bwd.default, (grad, stats, args[0].detach(), *args[1:-2]))


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_fwd_grad_matches_two_pass_ops(device, reduction, tail):
    """The gradient of topk_kl_fwd_grad (upstream 1) is topk_kl_bwd's with an upstream gradient of 1."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        for batched in (False, True):
            args = _fwd_grad_args(device, dtype, reduction, True, True, batched)
            if tail == "renorm":
                args = (*args[:3], torch.full_like(args[3], -math.inf), *args[4:])
            loss, stats, grad = torch.ops.kdloss.topk_kl_fwd_grad(*args)
            loss2, stats2 = torch.ops.kdloss.topk_kl_fwd(*args[:-2])
            torch.testing.assert_close(loss, loss2, rtol=0, atol=0)
            assert grad.shape == args[0].shape
            one = torch.ones(loss.shape, dtype=loss.dtype, device=device)
            expected = torch.ops.kdloss.topk_kl_bwd(one, stats2, args[0].detach(), *args[1:-2])
            torch.testing.assert_close(grad.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("full_support", [True, False])
@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_in_place_gradient_equals_the_out_of_place_one(full_support, tail):
    """CPU topk_kl_fwd_grad_ (the fused head's chunks) writes topk_kl_fwd_grad's gradient over the logits,
    bitwise, with the same loss and stats: kept logits read before they are overwritten, repeated ids,
    a row of NaN, and for the bucket tail a student confident on its kept ids (the tail mass re-read)."""
    from kdloss._build import require

    require("topk_kl", "cpu")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for reduction in (0, 1, 2):
            args = list(_fwd_grad_args(torch.device("cpu"), dtype, reduction, full_support, True))
            finite = (args[0].detach().clone(), *args[1:-2])
            torch.library.opcheck(torch.ops.kdloss.topk_kl_fwd_grad_.default, finite)
            z = args[0].detach().clone()
            z[3, args[1][3, 0]] = 30.0  # most of row 3's student mass on a kept id
            z[2, 7] = math.nan
            ids = args[1].clone()
            ids[0, 1] = ids[0, 0]  # a repeated id
            if tail == "renorm":
                args[3] = torch.full_like(args[3], -math.inf)
            args[0], args[1] = z, ids
            loss, stats, grad = torch.ops.kdloss.topk_kl_fwd_grad(*args)
            logits = z.clone()
            loss2, stats2 = torch.ops.kdloss.topk_kl_fwd_grad_(logits, *args[1:-2])
            torch.testing.assert_close(loss2, loss, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(stats2, stats, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(logits, grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("precompute_grad", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_precomputed_gradient_rescaled(device, precompute_grad, reduction):
    """gradcheck's upstream gradients are not 1: the saved gradient is rescaled (per row for "none")."""
    z, ids, vals, _ = make_problem(rows=3, vocab=11, k=4, device=device, seed=23)
    labels = torch.tensor([2, -100, 5], device=device)

    def fn(x):
        return topk_kl_loss(x, ids, vals, labels, tail="bucket", temperature=1.3, reduction=reduction,
                            backend="kernel", precompute_grad=precompute_grad)

    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("weight", [1.0, 2.5, 0.0])
def test_precomputed_gradient_scaled_by_the_upstream_gradient(device, weight):
    z, ids, vals, _ = make_problem(rows=5, vocab=40, k=6, device=device, seed=24)
    kw = dict(temperature=2.0, backend="kernel")
    a = topk_kl_loss(z, ids, vals, precompute_grad=True, **kw)
    b = topk_kl_loss(z, ids, vals, backend="reference", temperature=2.0)
    w = torch.tensor(weight, dtype=torch.float64, device=device)
    assert_close_fp64(grad_of(a, z, w), grad_of(b, z, w))


def test_shifted_slice_read_in_place_with_the_contiguous_result(device):
    """``full[:, :-1]`` of [B, T+1, V] logits: no copy, same loss and gradient as its contiguous copy."""
    from kdloss.topk_kl import kernel_rows

    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(25)
        full = torch.randn(3, 9, 257, generator=gen).to(device, dtype).requires_grad_()
        ids = torch.randint(0, 257, (3, 8, 64), generator=gen).to(device)
        ids = torch.arange(64, device=device) * 4 + ids % 4  # distinct per row
        lp = torch.log_softmax(torch.randn(3, 8, 64, generator=gen), -1).to(device)
        labels = torch.randint(0, 257, (3, 8), generator=gen).to(device)
        labels[0, 2] = -100
        shifted = full[:, :-1]
        view = kernel_rows(shifted)
        assert view.data_ptr() == full.data_ptr() and view.shape == (3, 8, 257)
        copy = shifted.detach().contiguous().requires_grad_()
        for precompute_grad in (True, False):
            a = topk_kl_loss(shifted, ids, lp, labels, temperature=2.0, backend="kernel",
                             precompute_grad=precompute_grad)
            b = topk_kl_loss(copy, ids, lp, labels, temperature=2.0, backend="kernel", precompute_grad=precompute_grad)
            assert torch.equal(a, b)
            g_full, g_copy = grad_of(a, full), grad_of(b, copy)
            assert torch.equal(g_full[:, :-1], g_copy) and torch.count_nonzero(g_full[:, -1]) == 0


def test_forward_without_grad_writes_nothing_of_size_n_by_v():
    z, ids, vals, _ = make_problem(rows=64, vocab=4096, k=8, dtype=torch.float32, seed=26)
    dense_bytes = z.numel() * z.element_size()

    def largest_allocation(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max((e.cpu_memory_usage for e in prof.events()), default=0)

    with torch.no_grad():
        assert largest_allocation(lambda: topk_kl_loss(z, ids, vals, backend="kernel")) < dense_bytes
    assert largest_allocation(lambda: topk_kl_loss(z.detach(), ids, vals, backend="kernel")) < dense_bytes
    assert largest_allocation(lambda: topk_kl_loss(z, ids, vals, backend="kernel")) >= dense_bytes  # can fail


def test_large_gradient_buffer_huge_page_path_is_correct():
    """A gradient over 8 MiB comes from the kernel's huge-page-advised allocation: values and lifetime."""
    z, ids, vals, _ = make_problem(rows=80, vocab=32000, k=16, dtype=torch.float32, seed=27)
    a = topk_kl_loss(z, ids, vals, temperature=2.0, backend="kernel")
    g = grad_of(a, z)
    b = topk_kl_loss(z.double(), ids, vals.double(), temperature=2.0, backend="reference")
    torch.testing.assert_close(g.double(), grad_of(b, z).double(), rtol=1e-4, atol=1e-9)
    g.add_(1.0)  # an ordinary, writable tensor
    assert g.is_contiguous() and g.shape == z.shape


def test_freed_large_gradient_block_is_reused_and_released():
    """A freed gradient block stays idle for the next step (no fresh pages); a live gradient is never
    handed out twice; a reused block's values are the new step's; kdloss.empty_cache() frees it."""
    z, ids, vals, _ = make_problem(rows=80, vocab=32000, k=16, dtype=torch.float32, seed=31)
    z2 = (z.detach() * 0.5).requires_grad_()
    exact = grad_of(topk_kl_loss(z2.double(), ids, vals.double(), temperature=2.0, backend="reference"), z2)
    kdloss.empty_cache()
    g1 = grad_of(topk_kl_loss(z, ids, vals, temperature=2.0, backend="kernel"), z)
    g_live = grad_of(topk_kl_loss(z2, ids, vals, temperature=2.0, backend="kernel"), z2)
    assert g_live.data_ptr() != g1.data_ptr()  # g1 is alive: its block is not reused
    torch.testing.assert_close(g_live.double(), exact.double(), rtol=1e-4, atol=1e-9)
    first = g1.data_ptr()
    del g1
    g2 = grad_of(topk_kl_loss(z2, ids, vals, temperature=2.0, backend="kernel"), z2)
    assert g2.data_ptr() == first  # the idle block, reused
    torch.testing.assert_close(g2, g_live, rtol=0, atol=0)  # every entry written anew
    del g2, g_live
    assert kdloss.empty_cache() >= z.numel() * z.element_size()
    assert kdloss.empty_cache() == 0


def test_gradient_block_cache_switched_off_by_the_environment():
    code = (
        "import torch, kdloss\n"
        "z = torch.randn(80, 32000, requires_grad=True)\n"
        "ids = torch.arange(16).repeat(80, 1) * 2000\n"
        "vals = torch.randn(80, 16).log_softmax(-1)\n"
        "g, = torch.autograd.grad(kdloss.topk_kl_loss(z, ids, vals, backend='kernel'), [z])\n"
        "del g\n"
        "print(kdloss.empty_cache())\n"
    )
    env = {**os.environ, "KDLOSS_GRAD_CACHE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "0"


def _repeated_ids_problem(device, dtype=torch.float64):
    z, ids, vals, _ = make_problem(rows=4, vocab=30, k=5, device=device, dtype=dtype, seed=28)
    ids = ids.clone()
    ids[:, 3] = ids[:, 1]  # a repeated id with teacher mass in every row
    ids[2, 4] = ids[2, 1]  # three slots for one id
    return z, ids, vals


@pytest.mark.parametrize("tail", ["renorm", "none"])
@pytest.mark.parametrize("precompute_grad", [True, False])
def test_repeated_ids_count_once_per_slot_without_validation(device, tail, precompute_grad):
    """validate=False (and torch.compile, where no data check runs): a repeated id counts once per slot —
    the reference's gather semantics — with its gradient entries summed (race-free on CUDA)."""
    z, ids, vals = _repeated_ids_problem(device)
    kw = dict(tail=tail, temperature=1.7, reduction="sum")
    a = topk_kl_loss(z, ids, vals, backend="kernel", validate=False, precompute_grad=precompute_grad, **kw)
    b = topk_kl_reference(z, ids, vals, **kw)
    assert_close_fp64(a, b)
    assert_close_fp64(grad_of(a, z), grad_of(b, z))


def test_repeated_ids_rejected_by_the_kernel_and_under_compile_summed():
    z, ids, vals = _repeated_ids_problem("cpu", torch.float32)
    with pytest.raises(ValueError, match="teacher_ids must be unique"):
        topk_kl_loss(z, ids, vals, backend="kernel")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: topk_kl_loss(x, ids, vals, backend="kernel"), fullgraph=True)
    out = compiled(z)
    expected = topk_kl_reference(z.double(), ids, vals.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(out, z).double(), grad_of(expected, z).double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("position", [0, 1, 7, 8, 4095])
def test_nan_logit_anywhere_gives_nan(device, position):
    for dtype in (torch.float32, torch.bfloat16):
        z, ids, vals, _ = make_problem(rows=3, vocab=4096, k=8, device=device, dtype=dtype, seed=29)
        z = z.detach().clone()
        z[1, position] = float("nan")
        z.requires_grad_()
        out = topk_kl_loss(z, ids, vals, reduction="none", backend="kernel")
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
        assert torch.isnan(grad_of(out.sum(), z)[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bucket_tail_finite_when_the_kept_student_mass_rounds_to_one(device, dtype):
    """Σ_K q rounds to 1 in fp32: log r_s is clamped at log 1e-8 (finite), the tail term's gradient is 0."""
    z = torch.full((2, 100), -40.0, dtype=torch.float64)
    z[:, :4] = 10.0
    z = z.to(device, dtype).requires_grad_()
    ids = torch.arange(4, device=device).expand(2, 4)
    lp = torch.log(torch.tensor([0.3, 0.3, 0.2, 0.1], device=device)).expand(2, 4)
    out = topk_kl_loss(z, ids, lp, tail="bucket", backend="kernel")
    ref = topk_kl_reference(z.detach().double(), ids, lp.double(), tail="bucket")
    assert torch.isfinite(out) and torch.isfinite(grad_of(out, z)).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# CUDA-specific (run on a GPU; skipped only where none exists)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [50257, 32001, 151936])
def test_cuda_one_pass_matches_cpu_on_shifted_and_misaligned_rows(dtype, vocab):
    gen = torch.Generator().manual_seed(30)
    full = (2 * torch.randn(2, 5, vocab, generator=gen)).to(dtype)
    ids = torch.randint(0, vocab, (2, 4, 64), generator=gen)
    ids[..., 5] = ids[..., 2]  # a repeated id: summed, race-free
    lp = torch.log_softmax(torch.randn(2, 4, 64, generator=gen), -1)
    results = []
    for device in ("cpu", "cuda"):
        f = full.to(device).requires_grad_()
        for precompute_grad in (True, False):
            out = topk_kl_loss(f[:, :-1], ids.to(device), lp.to(device), tail="bucket", temperature=2.0,
                               backend="kernel", validate=False, precompute_grad=precompute_grad)
            results.append((out.cpu(), grad_of(out, f).cpu()))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for out, grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=tol, atol=tol)
        torch.testing.assert_close(grad, results[0][1], rtol=tol, atol=tol)


@cuda_only
def test_cuda_upstream_gradient_in_the_accumulation_dtype():
    """An upstream gradient not representable in bf16 scales the bf16 gradient as on the CPU."""
    z, ids, lp, _ = make_problem(rows=8, vocab=3000, k=16, dtype=torch.bfloat16, seed=31)
    w = torch.tensor(1.0 + 2.0**-12)
    grads = []
    for device in ("cpu", "cuda"):
        x = z.detach().to(device).requires_grad_()
        for precompute_grad in (True, False):
            out = topk_kl_loss(x, ids.to(device), lp.to(device), backend="kernel", precompute_grad=precompute_grad)
            grads.append(grad_of(out, x, w.to(device)).cpu())
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-2, atol=1e-6)


@cuda_only
def test_cuda_one_pass_no_host_sync_with_validate_false():
    z, ids, lp, _ = make_problem(rows=64, vocab=32000, k=64, device="cuda", dtype=torch.bfloat16, seed=32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = topk_kl_loss(z, ids, lp, backend="kernel", validate=False, precompute_grad=True)
        torch.autograd.grad(out, z)
    finally:
        torch.cuda.set_sync_debug_mode(0)



@pytest.mark.parametrize("reduction", [0, 1])
def test_rescale_op_skips_rows_with_a_factor_of_one(device, reduction):
    """kdloss::topk_kl_rescale_ (the CUDA backward's in-place scaling): rows times their factor, rounded
    once; a row whose factor is exactly 1 is left bitwise as it is (on CUDA: not even read)."""
    from kdloss._build import require

    require("topk_kl", device.type)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        grad = torch.randn(2, 3, 1001, dtype=torch.float64).to(device, dtype)  # odd V: an unaligned row tail
        factor = torch.tensor([1.0, 0.25, -3.0, 1.0, 1e-3, 1.0], dtype=acc, device=device)
        if reduction == 1:
            factor = torch.tensor(0.125, dtype=acc, device=device)
        rows = factor.reshape(2, 3, 1) if reduction == 0 else factor
        expected = (grad.to(acc) * rows).to(dtype)
        out = grad.clone()
        torch.ops.kdloss.topk_kl_rescale_(out, factor, reduction)
        assert torch.equal(out, expected)
        torch.library.opcheck(torch.ops.kdloss.topk_kl_rescale_.default, (grad.clone(), factor, reduction))


@cuda_only
def test_cuda_one_pass_default_scales_in_place_and_refuses_a_second_backward():
    z, ids, lp, _ = make_problem(rows=33, vocab=5003, k=16, device="cuda", dtype=torch.float32, seed=34)
    out = topk_kl_loss(z, ids, lp, backend="kernel", temperature=2.0)  # precompute_grad None: one pass
    expected = topk_kl_loss(z, ids, lp, backend="kernel", temperature=2.0, precompute_grad=False)
    (g_two_pass,) = torch.autograd.grad(0.5 * expected, z)
    (g,) = torch.autograd.grad(0.5 * out, z, retain_graph=True)
    torch.testing.assert_close(g, g_two_pass, rtol=1e-5, atol=1e-8)
    with pytest.raises(RuntimeError, match="retain_graph"):
        torch.autograd.grad(out, z)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("values, tail, support", [VARIANTS[0], VARIANTS[1], VARIANTS[3]])
def test_cuda_matches_cpu_kernel(dtype, values, tail, support):
    z, ids, lp, _ = make_problem(rows=37, vocab=50257, k=64, dtype=dtype, seed=21)
    labels = torch.arange(37) % 7
    labels[::5] = -100
    kw = dict(values=values, tail=tail, student_support=support, temperature=2.0)
    gz = z.detach().cuda().requires_grad_()
    a = topk_kl_loss(z, ids, lp, labels, backend="kernel", **kw)
    b = topk_kl_loss(gz, ids.cuda(), lp.cuda(), labels.cuda(), backend="kernel", **kw)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(b.cpu(), a, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_of(b, gz).cpu(), grad_of(a, z), rtol=tol, atol=tol)


@cuda_only
def test_cuda_deterministic_and_no_host_sync_in_backward():
    z, ids, lp, _ = make_problem(rows=300, vocab=32000, k=64, device="cuda", dtype=torch.bfloat16, seed=22)
    first = topk_kl_loss(z, ids, lp, backend="kernel")
    g_first = grad_of(first, z)
    for _ in range(3):
        out = topk_kl_loss(z, ids, lp, backend="kernel")
        assert torch.equal(out, first) and torch.equal(grad_of(out, z), g_first)
    out = topk_kl_loss(z, ids, lp, backend="kernel")
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.autograd.grad(out, z)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_math_constants_documented():
    assert math.isclose(kdloss.reference.topk_kl.TAIL_CLAMP, 1e-8)


def test_float16_defaults_to_two_pass_so_the_unscaled_gradient_cannot_overflow():
    """T = 1e-6 makes the gradient for an upstream 1 reach 1e6, beyond float16's range; with the mean
    over rows and a small upstream factor the true gradient is finite. The one-pass path would hold
    inf before scaling (found by the sanitizer job's fuzz run); the default for float16 is two-pass."""
    from kdloss.testing import check_case

    case = {"rows": 1, "split": False, "vocab": 2049, "k": 1, "pad": 0, "values": "logprobs", "tail": "renorm",
            "support": "full", "temperature": 1e-06, "teacher_temperature": 1.0, "scale_by_t2": False,
            "labels": None, "num_items": None, "reduction": "mean", "layout": "contiguous", "magnitude": 0.1,
            "confident": False, "student_pad": 0, "quantised": False, "seed": 0, "shifted": False,
            "precompute_grad": None}
    result = check_case("topk_kl", case, "cpu", torch.float16)
    assert result.ok, f"{result}\n" + "\n".join(result.details)


@pytest.mark.parametrize("precompute_grad", [None, False])
@pytest.mark.parametrize("vocab, k, tail, support, seed", [(2, 1, "bucket", "full", 21), (136, 3, "none", "topk", 13)])
def test_float32_large_temperature_gradient_within_the_bound(vocab, k, tail, support, seed, precompute_grad):
    """T = 1000 with T²: student and teacher are both close to uniform, and a kept slot's gradient
    T·(κ·q − p̂) is a small difference scaled up by T. With q rounded through an fp32 log q ≈ −log V it
    was 3-6.5x over the bound (both paths: the two-pass one reads l back from the saved stats); the kept
    slots' arithmetic now runs in double, and the saved shift carries the rounding of l."""
    from kdloss.testing import check_case

    case = {"rows": 1, "split": False, "vocab": vocab, "k": k, "pad": 0, "values": "logprobs", "tail": tail,
            "support": support, "temperature": 1000.0, "teacher_temperature": 1.0, "scale_by_t2": True,
            "labels": None, "num_items": None, "reduction": "sum", "layout": "contiguous", "magnitude": 1.0,
            "confident": False, "student_pad": 0, "quantised": False, "seed": seed, "shifted": False,
            "precompute_grad": precompute_grad}
    result = check_case("topk_kl", case, "cpu", torch.float32)
    assert result.ok, f"{result}\n" + "\n".join(result.details)


@pytest.mark.parametrize("support", ["topk", "full"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("precompute_grad", [True, False])
def test_float32_large_temperature_kept_gradient_to_rounding(support, reduction, precompute_grad):
    """T = 1000 with T², teacher temperature 1.5: a kept slot's gradient is T·(κ·q − p̂), and an fp32
    ``log p̂`` alone puts a relative |log p̂|·2⁻²⁴ on p̂, which T turned into an error of ~3e-6 on
    gradients of ~0.07 (the fused head's fuzz case failed by 1.16x). The CPU kernels read the teacher
    targets in double: the gradient is now the exact one for the fp32 logits, rounded once."""
    gen = torch.Generator().manual_seed(0)
    z = 0.5 * torch.randn(4, 25, generator=gen)
    top = torch.randn(4, 25, generator=gen, dtype=torch.float64).log_softmax(-1).topk(21)
    options = dict(values="logprobs", tail="renorm", student_support=support, temperature=1000.0,
                   teacher_temperature=1.5, scale_by_t2=True, reduction=reduction)
    kernel = z.clone().requires_grad_()
    exact = z.double().requires_grad_()
    out = topk_kl_loss(kernel, top.indices, top.values.float(), backend="kernel", precompute_grad=precompute_grad,
                       **options)
    ref = topk_kl_loss(exact, top.indices, top.values.float().double(), backend="reference", **options)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    out.backward(upstream.float())
    ref.backward(upstream)
    error = (kernel.grad.double() - exact.grad).abs().max().item()
    assert error <= 4 * 2**-24 * exact.grad.abs().max().item(), error


def test_saved_stats_keep_the_log_sum_exp():
    """The saved pair (m, l) represents the row's log-sum-exp m/T + l (what the vocabulary-parallel head
    combines): at T = 1000 to about double accuracy, as the shift m carries the rounding of l."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(64, 7, generator=gen)
    ids = torch.zeros(64, 1, dtype=torch.int64)
    no_mass = torch.full((64, 1), -math.inf)
    args = (z, ids, no_mass, no_mass[:, 0], torch.ones(64, dtype=torch.bool), torch.ones(()),
            float_arg(1e-3), float_arg(1.0), True, 0)
    _, stats = torch.ops.kdloss.topk_kl_fwd(*args)
    lse = torch.logsumexp(z.double() / 1000.0, dim=-1)
    error = (stats[:, 0].double() / 1000.0 + stats[:, 1].double() - lse).abs().max().item()
    assert error < 1e-9, error  # an fp32 l alone errs by up to ~1e-7 here
    assert (stats[:, 0] - z.amax(-1)).abs().max().item() <= 1e-3  # still the largest logit, moved by T·δl
