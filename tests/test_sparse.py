"""kdloss.sparse: top-k teacher extraction and RS-KD sampled targets (spec §3.1, §3.4) — the
sampled targets give an unbiased student gradient, plain top-k does not."""

from __future__ import annotations

import pytest
import torch

from kdloss.functional import topk_kl_loss
from kdloss.sparse import sample_teacher_targets, topk_teacher

from helpers import assert_close_fp64, raises_naming


def test_topk_teacher_returns_full_softmax_logprobs_of_the_top_ids(device):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 40, generator=gen, dtype=torch.float64)).to(device)
    for temperature in (1.0, 2.0):
        ids, lp = topk_teacher(logits, 6, temperature=temperature)
        assert ids.shape == (2, 5, 6) and ids.dtype == torch.int64 and lp.dtype == torch.float64
        full = torch.log_softmax(logits / temperature, -1)
        assert_close_fp64(lp, full.gather(-1, ids))
        assert torch.equal(ids, full.topk(6, dim=-1).indices)
    _, lp32 = topk_teacher(logits.to(torch.bfloat16), 3)
    assert lp32.dtype == torch.float32


def test_topk_teacher_chunks_rows_without_changing_results(monkeypatch):
    import kdloss.sparse as sparse

    logits = torch.randn(37, 50, dtype=torch.float64)
    expected = topk_teacher(logits, 4)
    monkeypatch.setattr(sparse, "_CHUNK_ELEMENTS", 120)  # 2 rows per chunk
    for a, b in zip(topk_teacher(logits, 4), expected, strict=False):
        assert torch.equal(a, b)


def test_topk_teacher_round_trip_with_teacher_temperature():
    """Stored at generation temperature T_g, re-tempered to T: equals the teacher at T renormalised."""
    gen = torch.Generator().manual_seed(1)
    t = 2 * torch.randn(4, 30, generator=gen, dtype=torch.float64)
    z = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    ids, lp = topk_teacher(t, 30, temperature=1.5)
    got = topk_kl_loss(z, ids, lp, teacher_temperature=1.5, temperature=2.0, backend="kernel")
    ids_2, lp_2 = topk_teacher(t, 30, temperature=2.0)
    want = topk_kl_loss(z, ids_2, lp_2, temperature=2.0, teacher_temperature=2.0, backend="kernel")
    assert_close_fp64(got, want)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_sampled_targets_merge_repeats_and_are_unbiased_in_expectation(power):
    gen = torch.Generator().manual_seed(2)
    teacher = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    ids, w = sample_teacher_targets(teacher, n_samples=50, proposal_power=power, generator=gen)
    assert ids.shape == w.shape == (3, 50)
    for row_ids, row_w in zip(ids, w, strict=False):
        nonzero = row_ids[row_w > 0]
        assert nonzero.unique().numel() == nonzero.numel()  # one slot per sampled id
    if power == 1.0:
        assert_close_fp64(w.sum(-1), torch.ones(3, dtype=torch.float64))
    draws = 2000
    big_ids, big_w = sample_teacher_targets(teacher.repeat(draws, 1), n_samples=50, proposal_power=power, generator=gen)
    dense = torch.zeros(3 * draws, 12, dtype=torch.float64).scatter_add_(1, big_ids, big_w)
    mean = dense.reshape(draws, 3, 12).mean(0)
    assert (mean - torch.softmax(teacher, -1)).abs().max().item() < 0.02


def test_rskd_gradient_is_unbiased_while_top_k_is_biased():
    """Spec §3.4: the mean RS-KD gradient over many draws approaches the full-KD gradient q − p;
    top-k with renorm, naive or bucket tails stays away from it."""
    gen = torch.Generator().manual_seed(3)
    vocab, draws = 20, 4000
    teacher = 1.5 * torch.randn(1, vocab, generator=gen, dtype=torch.float64)
    z = torch.randn(1, vocab, generator=gen, dtype=torch.float64)
    full_kd = torch.softmax(z, -1) - torch.softmax(teacher, -1)

    ids, w = sample_teacher_targets(teacher.expand(draws, vocab), n_samples=50, generator=gen)
    zs = z.expand(draws, vocab).clone().requires_grad_()
    per_draw = topk_kl_loss(zs, ids, w.log(), tail="none", reduction="none", backend="kernel")
    (g,) = torch.autograd.grad(per_draw.sum(), zs)
    rskd_error = (g.mean(0) - full_kd[0]).abs().max().item()
    assert rskd_error < 5e-3, rskd_error

    top_ids, top_lp = topk_teacher(teacher, 4)
    for tail in ("renorm", "none", "bucket"):
        zt = z.clone().requires_grad_()
        (g_top,) = torch.autograd.grad(topk_kl_loss(zt, top_ids, top_lp, tail=tail, backend="kernel"), zt)
        bias = (g_top[0] - full_kd[0]).abs().max().item()
        assert bias > 5 * rskd_error, (tail, bias, rskd_error)


@pytest.mark.parametrize("values", ["logprobs", "probs"])
def test_sample_teacher_targets_accepts_probabilities_and_logprobs(values):
    logits = torch.randn(2, 9, dtype=torch.float64)
    given = torch.log_softmax(logits, -1) if values == "logprobs" else torch.softmax(logits, -1)
    a = sample_teacher_targets(logits, 20, generator=torch.Generator().manual_seed(4))
    b = sample_teacher_targets(given, 20, values=values, generator=torch.Generator().manual_seed(4))
    for x, y in zip(a, b, strict=False):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda t: topk_teacher(t, 0), "k"),
        (lambda t: topk_teacher(t, 11), "k"),
        (lambda t: topk_teacher(t.long(), 2), "teacher_logits"),
        (lambda t: topk_teacher(t, 2, temperature=0), "temperature"),
        (lambda t: sample_teacher_targets(t, 0), "n_samples"),
        (lambda t: sample_teacher_targets(t, 5, proposal_power=-1), "proposal_power"),
        (lambda t: sample_teacher_targets(t, 5, values="scores"), "values"),
        (lambda t: sample_teacher_targets(t, 5, generator=3), "generator"),
        (lambda t: sample_teacher_targets(t[:, :0], 5), "teacher"),
    ],
)
def test_bad_inputs(call, name):
    with raises_naming(name):
        call(torch.randn(3, 10))
