"""Fused linear head + top-k KL: fp64 parity with the unfused loss on ``hidden @ Wᵀ + b`` (every
variant, reduction, soft-cap, chunking), exact gradients for hidden/weight/bias (gradcheck), no
``[N, V]`` allocation, opcheck, torch.compile, bad inputs."""

from __future__ import annotations

import pytest
import torch

from kdloss import FusedLinearTopKKLLoss
from kdloss._ops import float_arg
from kdloss.functional import fused_linear_topk_kl_loss, topk_kl_loss
from kdloss.fused_linear_topk_kl import default_chunk_size
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


def test_zero_rows_give_zero_gradients():
    """No chunk runs: the weight gradient (whose first chunk would overwrite the buffer) is zero-filled."""
    h, w, b, ids, vals, _ = make_head(rows=4, seed=19)
    h0 = h.detach()[:0].requires_grad_()
    out = fused_linear_topk_kl_loss(h0, w, ids[:0], vals[:0], bias=b, reduction="sum")
    gh, gw, gb = torch.autograd.grad(out, (h0, w, b))
    assert out.item() == 0.0 and gh.shape == (0, 12)
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


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


# ----------------------------------------------------------------------------------------------
# Gradients only where wanted, held once; chunks chosen by bytes; fp32 weight-gradient accumulation

#: which of (hidden, weight, bias) require a gradient: trained head, frozen head, LoRA/tied (weight only),
#: hidden + weight with a bias that does not train, bias only
GRAD_MASKS = [(True, True, True), (True, False, False), (False, True, False), (True, True, False),
              (False, False, True)]


def _leaves_with(mask, **kw):
    h, w, b, ids, vals, labels = make_head(**kw)
    leaves = [x.detach().requires_grad_(want) for x, want in zip((h, w, b), mask, strict=True)]
    return leaves, ids, vals, labels


@pytest.mark.parametrize("mask", GRAD_MASKS)
@pytest.mark.parametrize("reduction, softcap", [("mean", None), ("sum", 3.0), ("none", None)])
def test_gradients_only_for_inputs_that_need_them(device, mask, reduction, softcap):
    """Each wanted gradient matches the fp64 reference; the others stay None (never computed)."""
    leaves, ids, vals, labels = _leaves_with(mask, device=device, seed=11)
    kw = dict(labels=labels, softcap=softcap, reduction=reduction, temperature=1.5)
    weight = torch.rand(23, dtype=torch.float64, device=device) if reduction == "none" else None
    out = fused_linear_topk_kl_loss(*leaves[:2], ids, vals, bias=leaves[2], chunk_size=5, backend="kernel", **kw)
    ref_leaves = [x.detach().requires_grad_(x.requires_grad) for x in leaves]
    ref = fused_linear_topk_kl_loss(*ref_leaves[:2], ids, vals, bias=ref_leaves[2], backend="reference", **kw)
    assert_close_fp64(out, ref)
    (out if weight is None else (out * weight).sum()).backward()
    (ref if weight is None else (ref * weight).sum()).backward()
    for name, x, r, want in zip("hwb", leaves, ref_leaves, mask, strict=True):
        if want:
            assert_close_fp64(x.grad, r.grad)
        else:
            assert x.grad is None, name


def _positive_allocations(fn) -> list[int]:
    """Sizes (bytes) of the CPU allocations each op made itself while ``fn`` ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


@pytest.mark.parametrize("mask, weight_grads", [((True, True, False), 1), ((True, False, False), 0),
                                                ((False, True, True), 1)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weight_gradient_allocated_once_and_only_when_wanted(mask, weight_grads, reduction):
    """A [V, H] buffer is allocated exactly once when the weight trains (no accumulation buffer plus a
    scaled copy) and never for a frozen head, whether the gradient is made in the forward or the backward."""
    rows, width, vocab = 64, 48, 3000
    leaves, ids, vals, labels = _leaves_with(mask, rows=rows, hidden=width, vocab=vocab, k=8, dtype=torch.float32,
                                             seed=12)
    weight_bytes = vocab * width * 4

    def step():
        out = fused_linear_topk_kl_loss(*leaves[:2], ids, vals, bias=leaves[2], labels=labels, chunk_size=4,
                                        reduction=reduction, backend="kernel")
        torch.autograd.grad(out.sum(), [x for x in leaves if x.requires_grad])

    sizes = _positive_allocations(step)
    assert sum(size >= weight_bytes for size in sizes) == weight_grads, sorted(sizes)[-4:]


def test_no_grad_forward_allocates_no_gradient():
    rows, width, vocab = 256, 96, 3000
    h, w, b, ids, vals, labels = make_head(rows=rows, hidden=width, vocab=vocab, k=8, dtype=torch.float32, seed=13)
    with torch.no_grad():
        sizes = _positive_allocations(
            lambda: fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, chunk_size=4, backend="kernel"))
    assert max(sizes) < rows * width * 4, max(sizes)  # not even the hidden gradient


def test_upstream_gradient_scales_and_retain_graph_recomputes():
    """The forward's gradients are scaled in place by the upstream gradient; a second backward through
    the same graph (retain_graph) recomputes them instead of reusing the scaled buffers."""
    h, w, b, ids, vals, labels = make_head(seed=14)
    out = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, chunk_size=6, backend="kernel")
    first = torch.autograd.grad(3.0 * out, (h, w, b), retain_graph=True)
    second = torch.autograd.grad(-0.5 * out, (h, w, b))
    ref = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, backend="reference")
    expected = torch.autograd.grad(ref, (h, w, b))
    for a, c, e in zip(first, second, expected, strict=True):
        assert_close_fp64(a, 3.0 * e)
        assert_close_fp64(c, -0.5 * e)


def test_gradient_accumulation_into_grad():
    h, w, b, ids, vals, labels = make_head(seed=15)
    for _ in range(2):
        fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, chunk_size=6).backward()
    ref = [x.detach().requires_grad_() for x in (h, w, b)]
    fused_linear_topk_kl_loss(*ref[:2], ids, vals, bias=ref[2], labels=labels, backend="reference").backward()
    for x, r in zip((h, w, b), ref, strict=True):
        assert_close_fp64(x.grad, 2 * r.grad)


@pytest.mark.parametrize("mask", GRAD_MASKS[1:])
def test_torch_compile_fullgraph_partial_gradients(device, mask):
    torch._dynamo.reset()

    def step(h, w, b, ids, vals, labels):
        return fused_linear_topk_kl_loss(h, w, ids, vals, labels, bias=b, chunk_size=8, softcap=10.0, temperature=2.0)

    compiled = torch.compile(step, fullgraph=True)
    leaves, ids, vals, labels = _leaves_with(mask, device=device, dtype=torch.float32, seed=16)
    wanted = [x for x in leaves if x.requires_grad]
    eager = step(*leaves, ids, vals, labels)
    out = compiled(*leaves, ids, vals, labels)
    torch.testing.assert_close(out, eager)
    for x, y in zip(torch.autograd.grad(out, wanted), torch.autograd.grad(eager, wanted), strict=True):
        torch.testing.assert_close(x, y)


def test_chunk_size_rule():
    """Rows per chunk from a byte budget of logits + logit gradient (CPU without a soft-cap: the logits
    alone, the gradient is written over them); ≥ 1024 rows on CUDA."""
    assert default_chunk_size(151936, torch.bfloat16, "cuda") == 1024  # 512 MiB would give 883: the floor
    assert default_chunk_size(32000, torch.bfloat16, "cuda") == 4160  # 512 MiB / (2 · 32000 · 2 B), to 64s
    assert default_chunk_size(32000, torch.float32, "cpu") == 256  # 32 MiB / 128000 B = 262
    assert default_chunk_size(32000, torch.float32, "cpu", softcap=True) == 128  # 32 MiB / 256000 B = 131
    assert default_chunk_size(151936, torch.float32, "cpu") == 64  # 55 by bytes: the CPU floor
    assert default_chunk_size(1000, torch.float32, "cpu", chunk_bytes=80_000) == 20  # no floor with a budget
    assert default_chunk_size(1000, torch.float32, "cpu", chunk_bytes=80_000, softcap=True) == 10
    assert default_chunk_size(10**6, torch.float32, "cuda", chunk_bytes=1) == 1


def test_chunk_bytes_option():
    h, w, b, ids, vals, labels = make_head(seed=17)  # fp64, V = 150: 1200 B per row (CPU: the logits alone)
    by_rows = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, chunk_size=3)
    by_bytes = fused_linear_topk_kl_loss(h, w, ids, vals, bias=b, labels=labels, chunk_bytes=3 * 1200)
    assert_close_fp64(by_bytes, by_rows)
    module = FusedLinearTopKKLLoss(chunk_bytes=1 << 20)
    assert module.options.rows_per_chunk(150, torch.float64, torch.device("cpu")) == 832  # 873, to 64s
    with raises_naming("chunk_bytes"):
        FusedLinearTopKKLLoss(chunk_size=4, chunk_bytes=1 << 20)


def test_fp32_weight_gradient_accumulation_for_bf16():
    """bf16 weight, one row per chunk (48 accumulations): fp32 accumulation rounds the sum once, the
    default rounds it to bf16 after every chunk; the gradient is returned in bf16 either way."""
    h, w, _, ids, vals, labels = make_head(rows=48, hidden=16, vocab=200, k=8, seed=18)
    low_h, low_w = h.detach().to(torch.bfloat16), w.detach().to(torch.bfloat16)
    # the exact gradient of the bf16-rounded inputs
    ref_w = low_w.double().requires_grad_()
    ref = fused_linear_topk_kl_loss(low_h.double(), ref_w, ids, vals, labels=labels.clamp(min=0), backend="reference")
    (exact,) = torch.autograd.grad(ref, (ref_w,))
    errors = {}
    for dtype in (None, torch.float32):
        leaf = low_w.clone().requires_grad_()
        out = fused_linear_topk_kl_loss(low_h, leaf, ids, vals.float(), labels=labels.clamp(min=0), chunk_size=1,
                                        weight_grad_dtype=dtype, backend="kernel")
        (grad,) = torch.autograd.grad(out, (leaf,))
        assert grad.dtype == torch.bfloat16
        errors[dtype] = (grad.double() - exact).abs().max().item()
    assert errors[torch.float32] <= 2**-7 * exact.abs().max().item(), errors
    assert errors[torch.float32] < errors[None], errors


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
        (lambda: fused_linear_topk_kl_loss(h, w, ids, vals, chunk_bytes=0), "chunk_bytes"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids, vals, weight_grad_dtype="float32"), "weight_grad_dtype"),
        (lambda: fused_linear_topk_kl_loss(h, w, ids, vals, weight_grad_dtype=torch.bfloat16), "weight_grad_dtype"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_inputs_raise_naming_the_argument(index):
    call, name = _bad_calls()[index]
    with raises_naming(name):
        call()


def test_validate_false_skips_the_data_checks_and_counts_repeated_ids_per_slot():
    """validate=False (hot loops): no host-synchronising id checks; a repeated id counts once per slot,
    as the unfused loss counts it with validation off; ids outside [0, V) still raise on CPU."""
    h, w, _, ids, vals, labels = make_head(seed=41)
    ids = ids.clone()
    ids[:, 2] = ids[:, 1]
    with raises_naming("teacher_ids"):
        fused_linear_topk_kl_loss(h, w, ids, vals, labels=labels)
    fused = fused_linear_topk_kl_loss(h, w, ids, vals, labels=labels, validate=False, backend="kernel")
    unfused = topk_kl_loss(h @ w.T, ids, vals, labels, validate=False, backend="kernel")
    assert_close_fp64(fused, unfused)
    gf = torch.autograd.grad(fused, (h, w))
    gu = torch.autograd.grad(unfused, (h, w))
    for a, b in zip(gf, gu, strict=True):
        assert_close_fp64(a, b)
    module = FusedLinearTopKKLLoss(validate=False)
    assert_close_fp64(module(h, w, ids, vals, labels), fused)
    bad = ids.clone()
    bad[0, 0] = w.shape[0]
    with pytest.raises(ValueError, match="teacher_ids"):
        fused_linear_topk_kl_loss(h, w, bad, vals, labels=labels, validate=False, backend="kernel")
    with raises_naming("validate"):
        fused_linear_topk_kl_loss(h, w, ids, vals, validate=1)


# Cases of a long fuzz run (kdloss.fuzz) that were over the error bound on CPU, with what was wrong.
_FUZZ = {"pad": 0, "values": "logprobs", "teacher_temperature": 1.0, "labels": None, "num_items": None,
         "softcap": None, "chunk_size": None, "quantised": False}
_FUZZ_REGRESSIONS = {
    # float16, T = 1e-6: the forward's gradient for an upstream 1 (~1e6) was held in float16: inf before
    # the upstream factor brought it back into range; float16 logits now take the two-pass backward
    "fp16-small-T-v4": (torch.float16, dict(rows=1, hidden=1, vocab=4, k=1, tail="renorm", support="full",
                                            temperature=1e-6, scale_by_t2=False, reduction="sum", bias=False,
                                            magnitude=0.3, seed=0)),
    "fp16-small-T-v2": (torch.float16, dict(rows=1, hidden=1, vocab=2, k=1, tail="renorm", support="full",
                                            temperature=1e-6, scale_by_t2=False, reduction="sum", bias=False,
                                            magnitude=0.3, seed=2)),
    # float16, T = 1e-6, after the upstream factor: the logit gradient (4e5) still overflowed float16 on
    # its way to a finite weight gradient (4178 = 4e5 · |h|); the backward now scales it by a power of two
    "fp16-small-T-logit-gradient": (torch.float16, dict(rows=1, hidden=1, vocab=2, k=1, tail="renorm",
                                                        support="full", temperature=1e-6, scale_by_t2=False,
                                                        reduction="sum", bias=False, magnitude=0.3, seed=58)),
    # float32, T = 1000 with T²: q ≈ p̂ ≈ uniform, the gradient T·(κ·q − p̂) a small difference scaled by T;
    # q was rounded through fp32 log q (1.2x and 4.7x over); the kept slots' arithmetic is now in double
    "fp32-large-T-topk-none": (torch.float32, dict(rows=2, hidden=1, vocab=136, k=3, tail="none", support="topk",
                                                   temperature=1000.0, scale_by_t2=True, reduction="none",
                                                   bias=False, magnitude=0.3, seed=0)),
    "fp32-large-T-bucket": (torch.float32, dict(rows=1, hidden=1, vocab=2, k=1, tail="bucket", support="full",
                                                temperature=1000.0, scale_by_t2=True, reduction="sum", bias=False,
                                                magnitude=0.3, seed=1)),
    # bfloat16, T = 1e-6: two kept logits 0.0095 apart both round to 2.765625 (correctly rounded, as the
    # kernel's one-rounding GEMM gives them): a tie the eager reference's double rounding (h·Wᵀ, then
    # + b) happened to break; the reference's head is now F.linear, one rounding, like nn.Linear
    "bf16-small-T-tie": (torch.bfloat16, dict(rows=11, hidden=24, vocab=277, k=11, tail="renorm", support="topk",
                                              temperature=1e-6, scale_by_t2=False, reduction="sum", bias=True,
                                              magnitude=3.0, seed=228696)),
}


@pytest.mark.parametrize("name", sorted(_FUZZ_REGRESSIONS))
def test_fuzz_regressions_within_the_error_bound(name):
    from kdloss.testing import check_case

    dtype, case = _FUZZ_REGRESSIONS[name]
    result = check_case("fused_linear_topk_kl", {**_FUZZ, **case}, "cpu", dtype)
    assert result.ok, f"{result}\n" + "\n".join(result.details)


def test_float16_second_backward_applies_the_upstream_factor_first():
    """retain_graph: a second backward of a float16 head at T = 1e-6 recomputes with the backward op (the
    upstream factor 0.01 before the float16 rounding): finite although the gradient for an upstream 1
    exceeds 65504, equal to the first, and close to the fp64 gradient."""
    gen = torch.Generator().manual_seed(0)
    h64, w64 = 0.3 * torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(8, 4, generator=gen) / 2
    ids, lp = topk_teacher(-(h64 @ w64.double().T), 2)  # the teacher's top ids are the student's last
    h, w = (x.half().requires_grad_() for x in (h64, w64))
    out = fused_linear_topk_kl_loss(h, w, ids, lp.float(), temperature=1e-6, scale_by_t2=False, reduction="sum",
                                    backend="kernel")
    first = torch.autograd.grad(0.01 * out, (h, w), retain_graph=True)
    second = torch.autograd.grad(0.01 * out, (h, w))
    exact_leaves = [x.detach().double().requires_grad_() for x in (h, w)]
    ref = fused_linear_topk_kl_loss(*exact_leaves, ids, lp, temperature=1e-6, scale_by_t2=False, reduction="sum",
                                    backend="reference")
    expected = torch.autograd.grad(0.01 * ref, exact_leaves)
    assert max(e.abs().max().item() for e in expected) / 0.01 > 65504  # unscaled, it would overflow
    for a, c, e in zip(first, second, expected, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, c)
        assert max_abs(a, e) <= 2e-3 * e.abs().max().item()
