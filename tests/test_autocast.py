"""Every loss inside ``torch.autocast``, eager and ``torch.compile(fullgraph=True)``, with its inputs
produced inside the autocast region (a matmul there gives bf16/fp16 tensors): the loss comes back
in fp32 — like autocast's fp32 ops (``F.cross_entropy``) — and equals the fp32 computation on the
same low-precision inputs to fp32 rounding; gradients come back in each input's own dtype (the
low-precision activations and leaves in theirs, fp32 weights in fp32). Outside autocast a bf16
input still gives a bf16 loss. CPU bf16 here; CUDA fp16/bf16 where a GPU exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import kdloss
from kdloss.functional import (
    fused_linear_topk_kl_loss,
    margin_mse_from_embeddings,
    margin_mse_loss,
    plackett_luce_loss,
    sinkhorn_loss,
    token_contextual_loss,
    token_contrastive_loss,
    token_graph_loss,
    topk_kl_loss,
)
from kdloss.sparse import topk_teacher

from helpers import CUDA

RTOL, ATOL = 2e-5, 1e-6  # fp32 rounding (the kernels sum in a fixed order; references differ slightly)


@dataclass
class Case:
    """``leaves``: the tensors gradients are taken for (low-precision activations and fp32
    weights); ``produce(leaves)`` runs inside autocast and returns the loss's differentiable
    inputs (low precision there); ``loss(*inputs, backend=...)`` is the kdloss call."""

    leaves: dict
    produce: Callable
    loss: Callable
    reference: bool = True  # the loss has a reference backend to compare as well
    kernel: bool = True  # the loss has a compiled kernel
    low: int | None = None  # how many leading inputs autocast makes low-precision (None: all)


def _gen():
    return torch.Generator().manual_seed(0)


def _project(x, w):
    """``x @ wᵀ``: under autocast a low-precision activation from a low-precision x and an fp32 w."""
    return x @ w.T


def margin_mse_case(device, dtype):
    g = _gen()
    leaves = {"x": torch.randn(6, 8, generator=g).to(device, dtype), "w": torch.randn(4, 8, generator=g).to(device)}
    teacher = torch.randn(6, 4, generator=g).to(device)

    def produce(p):
        scores = _project(p["x"], p["w"])
        return scores[:, 0], scores[:, 1:]

    return Case(leaves, produce, lambda pos, neg, **kw: margin_mse_loss(pos, neg, teacher, **kw))


def margin_mse_embeddings_case(device, dtype):
    g = _gen()
    leaves = {"x": torch.randn(4, 5, 6, generator=g).to(device, dtype), "w": torch.randn(8, 6, generator=g).to(device)}
    teacher = torch.randn(4, 4, generator=g).to(device)

    def produce(p):
        emb = _project(p["x"], p["w"])  # [B, 1 + 1 + n, D]
        return emb[:, 0], emb[:, 1], emb[:, 2:]

    return Case(leaves, produce, lambda q, pos, negs, **kw: margin_mse_from_embeddings(q, pos, negs, teacher, **kw))


def topk_kl_case(device, dtype):
    g = _gen()
    leaves = {"h": torch.randn(10, 8, generator=g).to(device, dtype),
              "w": torch.randn(40, 8, generator=g).to(device)}
    ids, logp = topk_teacher(2 * torch.randn(10, 40, generator=g), 5)
    labels = torch.randint(0, 40, (10,), generator=g)
    labels[::3] = -100
    ids, logp, labels = ids.to(device), logp.to(device), labels.to(device)
    return Case(leaves, lambda p: (_project(p["h"], p["w"]),),
                lambda z, **kw: topk_kl_loss(z, ids, logp, labels, temperature=2.0, **kw))


def fused_linear_topk_kl_case(device, dtype):
    """The hidden states come out of autocast in low precision; the head weight stays fp32."""
    g = _gen()
    leaves = {"x": torch.randn(10, 6, generator=g).to(device, dtype),
              "body": torch.randn(8, 6, generator=g).to(device),
              "head": torch.randn(40, 8, generator=g).to(device)}
    ids, logp = topk_teacher(2 * torch.randn(10, 40, generator=g), 5)
    labels = torch.randint(0, 40, (10,), generator=g)
    labels[::3] = -100
    ids, logp, labels = ids.to(device), logp.to(device), labels.to(device)

    def loss(hidden, head, **kw):
        return fused_linear_topk_kl_loss(hidden, head, ids, logp, labels=labels, chunk_size=4, temperature=2.0, **kw)

    return Case(leaves, lambda p: (_project(p["x"], p["body"]), p["head"]), loss, low=1)


def sinkhorn_case(device, dtype):
    g = _gen()
    leaves = {"x": torch.randn(6, 5, generator=g).to(device, dtype), "w": torch.randn(4, 5, generator=g).to(device)}
    teacher = 2 * torch.randn(7, 4, generator=g).to(device)
    return Case(leaves, lambda p: (_project(p["x"], p["w"]),),
                lambda z, **kw: sinkhorn_loss(z, teacher, n_iters=5, **kw))


def plackett_luce_case(device, dtype):
    g = _gen()
    leaves = {"x": torch.randn(8, 5, generator=g).to(device, dtype), "w": torch.randn(6, 5, generator=g).to(device)}
    teacher = 2 * torch.randn(8, 6, generator=g).to(device)
    labels = torch.randint(0, 6, (8,), generator=g)
    labels[1] = -100
    labels = labels.to(device)
    return Case(leaves, lambda p: (_project(p["x"], p["w"]),),
                lambda z, **kw: plackett_luce_loss(z, teacher, labels, **kw))


def token_contextual_case(device, dtype):
    g = _gen()
    leaves = {"x": torch.randn(2, 7, 5, generator=g).to(device, dtype), "w": torch.randn(6, 5, generator=g).to(device)}
    teacher = torch.randn(2, 7, 9, generator=g).to(device)
    return Case(leaves, lambda p: (_project(p["x"], p["w"]),),
                lambda s, **kw: token_contextual_loss(s, teacher, **kw))


def token_graph_case(device, dtype):
    g = _gen()
    leaves = {"x": torch.randn(12, 5, generator=g).to(device, dtype), "w": torch.randn(6, 5, generator=g).to(device)}
    teacher = torch.randn(12, 9, generator=g).to(device)
    return Case(leaves, lambda p: (_project(p["x"], p["w"]),),
                lambda s, **kw: token_graph_loss(s, teacher, k=3, sigma=4.0, **kw))


def token_contrastive_case(device, dtype):
    """Both sides are trainable projections (TRG trains the teacher-side head)."""
    g = _gen()
    leaves = {"xs": torch.randn(9, 5, generator=g).to(device, dtype), "ws": torch.randn(4, 5, generator=g).to(device),
              "xt": torch.randn(9, 7, generator=g).to(device, dtype), "wt": torch.randn(4, 7, generator=g).to(device)}
    return Case(leaves, lambda p: (_project(p["xs"], p["ws"]), _project(p["xt"], p["wt"])),
                lambda s, t, **kw: token_contrastive_loss(s, t, **kw), kernel=False)


CASES = {
    "margin_mse": margin_mse_case,
    "margin_mse_from_embeddings": margin_mse_embeddings_case,
    "topk_kl": topk_kl_case,
    "fused_linear_topk_kl": fused_linear_topk_kl_case,
    "sinkhorn": sinkhorn_case,
    "plackett_luce": plackett_luce_case,
    "token_contextual": token_contextual_case,
    "token_graph": token_graph_case,
    "token_contrastive": token_contrastive_case,
}

LOW = [("cpu", torch.bfloat16)] + [
    pytest.param("cuda", dt, marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))
    for dt in (torch.float16, torch.bfloat16)
]


def _backends(case: Case):
    return [b for b, ok in (("kernel", case.kernel), ("reference", case.reference)) if ok]


def _leaf_grads(loss, leaves: dict) -> dict:
    names = list(leaves)
    return dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names]), strict=True))


def _fp32_loss(case: Case, inputs, backend):
    """The same loss outside autocast on the same (low-precision) inputs upcast to fp32."""
    return case.loss(*[t.detach().float() for t in inputs], backend=backend)


def _leaves(case: Case) -> dict:
    return {name: t.detach().clone().requires_grad_() for name, t in case.leaves.items()}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device_type, dtype", LOW)
def test_eager_loss_is_fp32_and_gradients_keep_each_dtype(name, device_type, dtype):
    case = CASES[name](device_type, dtype)
    for backend in _backends(case):
        leaves = _leaves(case)
        with torch.autocast(device_type, dtype=dtype):
            inputs = case.produce(leaves)
            loss = case.loss(*inputs, backend=backend)
        low = inputs[:case.low]
        assert all(t.dtype == dtype for t in low), "autocast should have produced low-precision inputs"
        assert loss.dtype == torch.float32, (backend, loss.dtype)
        torch.testing.assert_close(loss, _fp32_loss(case, inputs, backend), rtol=RTOL, atol=ATOL)
        input_grads = torch.autograd.grad(loss, inputs, retain_graph=True)
        assert [g.dtype for g in input_grads] == [t.dtype for t in inputs], backend
        for (name_, leaf), grad in zip(leaves.items(), _leaf_grads(loss, leaves).values(), strict=True):
            assert grad.dtype == leaf.dtype, (backend, name_, grad.dtype, leaf.dtype)
            assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device_type, dtype", LOW)
def test_compiled_loss_is_fp32_and_gradients_keep_each_dtype(name, device_type, dtype):
    case = CASES[name](device_type, dtype)
    backend = _backends(case)[0]
    torch._dynamo.reset()

    def step(leaves):
        inputs = case.produce(leaves)
        # clones, not views: AOTAutograd's replay of views of intermediates returned as outputs is fragile
        return case.loss(*inputs, backend=backend), [t.detach().clone() for t in inputs]

    compiled = torch.compile(step, fullgraph=True)
    leaves = _leaves(case)
    with torch.autocast(device_type, dtype=dtype):
        loss, inputs = compiled(leaves)
        eager_loss, _ = step(_leaves(case))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, eager_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss, _fp32_loss(case, inputs, backend), rtol=RTOL, atol=ATOL)
    for (name_, leaf), grad in zip(leaves.items(), _leaf_grads(loss, leaves).values(), strict=True):
        assert grad.dtype == leaf.dtype, (name_, grad.dtype, leaf.dtype)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", list(CASES))
def test_outside_autocast_a_bf16_input_gives_a_bf16_loss(name):
    case = CASES[name]("cpu", torch.bfloat16)
    for backend in _backends(case):
        leaves = {n: t.to(torch.bfloat16) for n, t in _leaves(case).items()}
        inputs = case.produce(leaves)
        loss = case.loss(*inputs, backend=backend)
        assert loss.dtype == torch.bfloat16
        # the only difference autocast makes is the final rounding of the same fp32 loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = case.loss(*inputs, backend=backend)
        assert inside.dtype == torch.float32 and torch.equal(loss, inside.to(torch.bfloat16))


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_fused_head_bf16_hidden_with_fp32_weight_outside_autocast(backend):
    """The mixed pair autocast produces also works without autocast: fp32 logits (the hidden upcast
    chunk by chunk), so an fp32 loss equal to the all-fp32 computation; gradients in each input's dtype."""
    case = fused_linear_topk_kl_case("cpu", torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = case.produce(case.leaves)[0].detach().requires_grad_()
    head = case.leaves["head"].detach().clone().requires_grad_()
    loss = case.loss(hidden, head, backend=backend)
    assert loss.dtype == torch.float32
    hidden32 = hidden.detach().float().requires_grad_()
    expected = case.loss(hidden32, head, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    grad_hidden, grad_head = torch.autograd.grad(loss, (hidden, head))
    exp_hidden, exp_head = torch.autograd.grad(expected, (hidden32, head))
    assert grad_hidden.dtype == torch.bfloat16 and grad_head.dtype == torch.float32
    torch.testing.assert_close(grad_head, exp_head, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grad_hidden, exp_hidden.to(torch.bfloat16), rtol=0, atol=0)


def test_fused_head_rejects_other_mixed_dtypes():
    case = fused_linear_topk_kl_case("cpu", torch.bfloat16)
    hidden = torch.randn(10, 8)
    with pytest.raises(ValueError, match="weight"):
        case.loss(hidden, case.leaves["head"].to(torch.bfloat16))  # fp32 hidden, bf16 weight
    with pytest.raises(ValueError, match="weight"):
        case.loss(hidden.double(), case.leaves["head"])  # fp64 hidden, fp32 weight


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_inputs_inside_autocast_give_the_fp32_result(name):
    """fp32 tensors reaching a loss inside autocast (e.g. a model kept in fp32 around a bf16 region):
    kdloss's own matrix products (fused-head chunks, kNN search, reference similarities) are not
    rerouted to bf16, so the result is the one computed outside autocast."""
    case = CASES[name]("cpu", torch.float32)
    for backend in _backends(case):
        inputs = case.produce(_leaves(case))
        outside = case.loss(*inputs, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = case.loss(*inputs, backend=backend)
        assert inside.dtype == torch.float32
        assert torch.equal(inside, outside), (backend, inside, outside)
        grads_inside = torch.autograd.grad(inside, inputs, retain_graph=True)
        for got, expected in zip(grads_inside, torch.autograd.grad(outside, inputs), strict=True):
            assert got.dtype == torch.float32 and torch.equal(got, expected), backend


def test_trg_module_under_autocast_returns_fp32_and_fp32_projection_grads():
    torch.manual_seed(0)
    trg = kdloss.TRGLoss(student_dim=6, teacher_dim=9, embed_dim=4, num_samples=5, k=2, sigma=4.0)
    x = torch.randn(2, 7, 5, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(2, 7, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trg(x @ w.T, teacher, generator=torch.Generator().manual_seed(1))
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trg.parameters())
