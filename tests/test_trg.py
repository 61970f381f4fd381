"""TRG composite: TRGLoss composes its terms and trains, its helpers (feature maps to tokens, token
sampling, the temperature schedule), bad inputs."""

from __future__ import annotations

import pytest
import torch

from kdloss import TRGLoss
from kdloss.functional import token_contextual_loss
from kdloss.trg import feature_map_to_tokens, sample_tokens, temperature_schedule

from helpers import raises_naming


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


@pytest.mark.parametrize("call, match", [
    (lambda: feature_map_to_tokens(torch.randn(1, 2, 5, 4), 2), "patch_size"),
    (lambda: sample_tokens(torch.randn(1, 4, 2), torch.randn(1, 4, 3), 5), "num_samples"),
    (lambda: temperature_schedule(1, 0), "total_steps"),
    (lambda: TRGLoss(4, 6)(torch.randn(1, 4, 5), torch.randn(1, 4, 6)), "student_tokens"),
])
def test_bad_inputs(call, match):
    with raises_naming(match):
        call()
