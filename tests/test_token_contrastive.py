"""Token contrastive loss (reference only): its definition against cross-entropy on cosine logits, the
teacher-side gradient, the backend contract of a loss without a kernel, bad inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import kdloss
from kdloss import TokenContrastiveLoss
from kdloss.functional import token_contrastive_loss

from helpers import assert_close_fp64, raises_naming


def test_backend_contract_without_a_kernel():
    """No kernel: "kernel" raises, "auto" runs the reference without a fallback warning (there is nothing
    to fall back from) and gives the loss's definition."""
    s, t = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(kdloss.KernelUnavailableError, match="reference only"):
        token_contrastive_loss(s, t, backend="kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = token_contrastive_loss(s, t, temperature=0.25, backend="auto")
    logits = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).T / 0.25
    assert_close_fp64(auto, F.cross_entropy(logits, torch.arange(6)))


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


@pytest.mark.parametrize("call, match", [
    (lambda: token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 4)), "teacher_emb"),
    (lambda: token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 3), temperature=0), "temperature"),
    (lambda: token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 3), similarity="l2"), "similarity"),
])
def test_bad_values(call, match):
    with raises_naming(match):
        call()


def test_bad_types():
    with pytest.raises(TypeError, match="symmetric"):
        token_contrastive_loss(torch.randn(5, 3), torch.randn(5, 3), symmetric=1)


def test_module_matches_functional():
    x = torch.randn(6, 3)
    torch.testing.assert_close(TokenContrastiveLoss(temperature=0.3)(x, x.flip(0)),
                               token_contrastive_loss(x, x.flip(0), temperature=0.3))
