"""Fused linear head + top-k KL: fp64 parity with the unfused loss on ``hidden @ Wᵀ + b`` (every
variant, reduction, soft-cap, chunking), exact gradients for hidden/weight/bias (gradcheck), no
``[N, V]`` allocation, opcheck, torch.compile, bad inputs."""

from __future__ import annotations

import pytest
import torch

from kdloss import FusedLinearTopKKLLoss
from kdloss._ops import float_arg
from kdloss.functional import fused_linear_topk_kl_loss, topk_kl_loss
from kdloss.reference import linear_logits, teacher_log_targets
from kdloss.sparse import topk_teacher

from helpers import assert_close_fp64, lowp_bound, max_abs, raises_naming

VARIANTS = [("logprobs", "renorm", "full"), ("logprobs", "bucket", "full"), ("logprobs", "none", "full"),
            ("logprobs", "renorm", "topk"), ("logits", "renorm", "full")]


def make_head(rows=23, hidden=12, vocab=150, k=6, device="cpu", dtype=torch.float64, seed=0, values="logprobs"):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    b = 0.3 * torch.randn(vocab, generator=gen, dtype=torch.float64)
    teacher = 3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    ids, lp = topk_teacher(teacher, k)
    vals = lp if values == "logprobs" else teacher.gather(-1, ids)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::4] = -100
    leaves = [x.to(device, dtype).requires_grad_() for x in (h, w, b)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (*leaves, ids.to(device), vals.to(device, acc), labels.to(device))


def grads(out, leaves, weight=None):
    return torch.autograd.grad(out, leaves, grad_outputs=torch.ones_like(out) if weight is None else weight)


@pytest.mark.parametrize("values, tail, support", VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap, chunk_size", [(None, 5), (4.0, 7), (None, None)])
def test_matches_unfused_loss_fp64(device, values, tail, support, reduction, softcap, chunk_size):
    h, w, b, ids, vals, labels = make_head(device=device, seed=1, values=values)
    kw = dict(values=values, tail=tail, student_support=support, temperature=1.7, reduction=reduction)
    weight = torch.rand(23, dtype=torch.float64, device=device) if reduction == "none" else None
    fused = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, softcap=softcap, chunk_size=chunk_size,
                                      backend="kernel", **kw)
    unfused = topk_kl_loss(linear_logits(h, w, b, softcap), ids, vals, labels, backend="kernel", **kw)
    assert_close_fp64(fused, unfused)
    for a, e in zip(grads(fused, (h, w, b), weight), grads(unfused, (h, w, b), weight), strict=False):
        assert_close_fp64(a, e)


@pytest.mark.parametrize("chunk_size", [1, 4, 23, 100])
def test_chunking_and_num_items_do_not_change_results(chunk_size):
    h, w, b, ids, vals, labels = make_head(seed=2)
    base = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, num_items_in_batch=9, chunk_size=3)
    out = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, num_items_in_batch=9, chunk_size=chunk_size)
    assert_close_fp64(out, base)
    for x, y in zip(grads(out, (h, w, b)), grads(base, (h, w, b)), strict=False):
        assert_close_fp64(x, y)


@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradient computed in the forward / recomputed
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gradcheck_hidden_weight_bias(device, reduction, softcap):
    h, w, b, ids, vals, labels = make_head(rows=5, hidden=4, vocab=13, k=3, device=device, seed=3)

    def fn(hh, ww, bb):
        return fused_linear_topk_kl_loss(hh, ww, ids, vals, bias=bb, labels=labels, softcap=softcap, chunk_size=2,
                                         tail="bucket", temperature=1.5, reduction=reduction, backend="kernel")

    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_without_bias_and_with_leading_dims(device):
    h, w, _, ids, vals, labels = make_head(rows=12, device=device, seed=4)
    module = FusedLinearTopKKLLoss(temperature=2.0, chunk_size=5, reduction="none")
    flat = module(h, w, ids, vals, labels=labels)
    shaped = module(h.reshape(3, 4, -1), w, ids.reshape(3, 4, -1), vals.reshape(3, 4, -1), labels=labels.reshape(3, 4))
    assert shaped.shape == (3, 4)
    assert_close_fp64(shaped.reshape(-1), flat)
    gh, gw = torch.autograd.grad(flat.sum(), (h, w))
    assert gh.shape == h.shape and gw.shape == w.shape
    assert "chunk_size=5" in repr(module)


def test_no_grad_forward_and_frozen_weight():
    h, w, b, ids, vals, labels = make_head(seed=5)
    with torch.no_grad():
        nograd = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels)
    assert_close_fp64(nograd, fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels).detach())
    frozen = w.detach()
    (gh,) = torch.autograd.grad(fused_linear_topk_kl_loss(h, frozen, ids, vals, labels=labels), (h,))
    (want,) = torch.autograd.grad(topk_kl_loss(h @ frozen.T, ids, vals, labels), (h,))
    assert_close_fp64(gh, want)


def test_all_rows_ignored_is_zero_with_zero_gradients(device):
    h, w, b, ids, vals, _ = make_head(rows=6, device=device, seed=6)
    labels = torch.full((6,), -100, device=device)
    out = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels)
    assert out.item() == 0.0
    for g in grads(out, (h, w, b)):
        assert torch.count_nonzero(g) == 0


def test_never_allocates_the_full_logits():
    """Peak single allocation is O(chunk × V), far below N × V (CPU allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    rows, vocab = 512, 4000
    h, w, b, ids, vals, labels = make_head(rows=rows, hidden=16, vocab=vocab, k=8, dtype=torch.float32, seed=7)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, chunk_size=32, backend="kernel")
        torch.autograd.grad(out, (h, w, b))
    largest = max(e.cpu_memory_usage for e in prof.key_averages() if e.cpu_memory_usage > 0)
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    assert max(sizes) < rows * vocab * 4 / 4, (max(sizes), largest)


def test_low_precision_error_bound():
    """bf16: error against the fp64 loss no worse than the unfused eager code's plus slack."""
    h, w, b, ids, vals, labels = make_head(rows=64, hidden=32, vocab=700, k=16, seed=8)
    exact = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, temperature=2.0, backend="reference")
    exact_g = grads(exact, (h, w, b))
    low = [x.detach().to(torch.bfloat16).requires_grad_() for x in (h, w, b)]
    kernel = fused_linear_topk_kl_loss(*low[:2], ids, vals.float(), bias=low[2], labels=labels, temperature=2.0,
                                       chunk_size=16, backend="kernel")
    low_n = [x.detach().clone().requires_grad_() for x in low]
    naive = topk_kl_loss(linear_logits(low_n[0], low_n[1], low_n[2]), ids, vals.float(), labels, temperature=2.0,
                         backend="reference")
    assert max_abs(kernel, exact) <= lowp_bound(naive, exact, torch.bfloat16)
    # the weight gradient is accumulated over 4 chunks in bf16: allow one bf16 rounding per chunk
    for name, k_g, n_g, e_g in zip("hwb", grads(kernel, low), grads(naive, low_n), exact_g, strict=False):
        bound = lowp_bound(n_g, e_g, torch.bfloat16) + 4 * 2**-8 * e_g.abs().max().item()
        assert max_abs(k_g, e_g) <= bound, name


@pytest.mark.parametrize("reduction", [0, 1])
def test_opcheck(device, reduction):
    from kdloss._build import require

    require("topk_kl", device.type)
    h, w, b, ids, vals, labels = make_head(rows=7, hidden=5, vocab=20, k=3, device=device, seed=9)
    log_p, log_r = teacher_log_targets(vals, tail="bucket")
    valid = labels != -100
    divisor = valid.sum().double()
    teacher = (ids, log_p, log_r, valid, divisor, float_arg(0.5), float_arg(4.0), True, reduction, float_arg(2.0), 3)
    none = [False, False, False]
    masks = [none, [True, True, True], [True, False, False], [False, True, True]] if reduction else [none]
    for bias in (b, None):
        for mask in masks:
            torch.library.opcheck(torch.ops.kdloss.fused_linear_topk_kl_fwd.default,
                                  (h, w, bias, *teacher, mask, None))
        loss, stats, *_ = torch.ops.kdloss.fused_linear_topk_kl_fwd(h, w, bias, *teacher, none, None)
        grad = torch.rand(loss.shape, dtype=loss.dtype, device=device)
        for mask in ([True, True, True], [False, True, False]):
            torch.library.opcheck(torch.ops.kdloss.fused_linear_topk_kl_bwd.default,
                                  (grad, stats, h.detach(), w.detach(), None if bias is None else b.detach(),
                                   *teacher, mask, None))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    loss_fn = FusedLinearTopKKLLoss(temperature=2.0, chunk_size=8, softcap=10.0)

    def step(h, w, b, ids, vals, labels):
        return loss_fn(h, w, ids, vals, bias=b, labels=labels)

    compiled = torch.compile(step, fullgraph=True)
    h, w, b, ids, vals, labels = make_head(device=device, dtype=torch.float32, seed=10)
    eager = step(h, w, b, ids, vals, labels)
    out = compiled(h, w, b, ids, vals, labels)
    torch.testing.assert_close(out, eager)
    for x, y in zip(grads(out, (h, w, b)), grads(eager, (h, w, b)), strict=False):
        torch.testing.assert_close(x, y)


def _bad_calls():
    h, w, b, ids, vals, labels = make_head(rows=4, hidden=3, vocab=10, k=2, dtype=torch.float32)
    h, w, b = h.detach(), w.detach(), b.detach()
    return [
        (lambda: fused_linear_topk_kl_loss(h.long(), w, ids, vals), "hidden"),
        (lambda: fused_linear_topk_kl_loss(h, w[:, :2], ids, vals), "weight"),
        (lambda: fused_linear_topk_kl_loss(h, w[0], ids, vals), "weight"),
        (lambda: fused_linear_topk_kl_loss(h, w.double(), ids, vals), "weight"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids, vals, bias=b[:3]), "bias"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids, vals, bias=b.double()), "bias"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids[:3], vals[:3]), "teacher_ids"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids + 10, vals), "teacher_ids"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids, vals, softcap=0.0), "softcap"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids, vals, chunk_size=0), "chunk_size"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids, vals, chunk_size=2.5), "chunk_size"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids, vals, tail="zero"), "tail"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids, vals, labels=labels[:2]), "labels"),
        (lambda: FusedLinearTopKKLLoss(softcap=-1.0), "softcap"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_inputs_raise_naming_the_argument(index):
    call, name = _bad_calls()[index]
    with raises_naming(name):
        call()
