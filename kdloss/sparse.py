"""Building sparse teacher targets for :func:`kdloss.functional.topk_kl_loss`.

* :func:`topk_teacher` — the teacher's top-k ids and full-softmax log-probs, for an online teacher
  or to build an offline cache (what DistillKit stores);
* :func:`sample_teacher_targets` — RS-KD's sampled targets: ids drawn with replacement from the
  teacher, weighted so that their expectation is the teacher distribution (an unbiased target and
  hence an unbiased student gradient; plain top-k is biased).

Both run under ``torch.no_grad`` and never keep more than a bounded slice of the ``[N, V]`` logits
in fp32 at once.
"""

from __future__ import annotations

import torch

from ._validation import accumulation_dtype, check_int, check_option, check_scale, check_tensor

__all__ = ["topk_teacher", "sample_teacher_targets"]

#: Elements of the fp32 working copy processed at once (64 MiB).
_CHUNK_ELEMENTS = 1 << 24
#: Most draws per position of :func:`sample_teacher_targets` (RS-KD uses 50; beyond 2**16 the targets
#: are as good as the exact distribution, and the output would be larger than any dense teacher row).
MAX_SAMPLES = 1 << 16
TEACHER_VALUES = ("logits", "logprobs", "probs")


def _row_chunks(rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _check_logits(teacher: torch.Tensor, name: str) -> int:
    check_tensor(teacher, name)
    if teacher.dim() < 1 or teacher.shape[-1] == 0:
        raise ValueError(f"{name} must be [..., V] with V >= 1, got shape {tuple(teacher.shape)}")
    return teacher.shape[-1]


@torch.no_grad()
def topk_teacher(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely ids and their log-probabilities under ``softmax(logits / T)``.

    Args:
        teacher_logits: ``[..., V]`` teacher logits, any float dtype.
        k: ids kept per position, ``1 <= k <= V``.
        temperature: generation temperature T (default 1.0). Pass the same value as
            ``teacher_temperature=`` to :func:`~kdloss.functional.topk_kl_loss`, which then
            re-tempers the stored log-probs to the distillation temperature.

    Returns:
        ``(ids [..., k] int64, logprobs [..., k])`` — log-probs of the full-vocabulary softmax
        (not renormalised over k; DistillKit's storage format), fp32 (fp64 for fp64 logits),
        sorted by decreasing probability.
    """
    vocab = _check_logits(teacher_logits, "teacher_logits")
    k = check_int(k, "k", low=1)
    if k > vocab:
        raise ValueError(f"k must be <= V = {vocab}, got {k}")
    inv_t = 1.0 / check_scale(temperature, "temperature")
    lead = teacher_logits.shape[:-1]
    flat = teacher_logits.reshape(-1, vocab)
    acc = accumulation_dtype(teacher_logits.dtype)
    ids = torch.empty(flat.shape[0], k, dtype=torch.int64, device=flat.device)
    logprobs = torch.empty(flat.shape[0], k, dtype=acc, device=flat.device)
    for start, end in _row_chunks(flat.shape[0], vocab):
        scaled = _shifted(flat[start:end].to(acc)) * inv_t
        top = scaled.topk(k, dim=-1)
        ids[start:end] = top.indices
        logprobs[start:end] = top.values - torch.logsumexp(scaled, dim=-1, keepdim=True)
    return ids.reshape(*lead, k), logprobs.reshape(*lead, k)


def _shifted(values: torch.Tensor) -> torch.Tensor:
    """``values`` minus their row maximum (rows whose maximum is not finite are left as they are):
    scaling by 1/T or a power after the shift keeps a tiny T from turning every entry into ±inf."""
    top = values.amax(dim=-1, keepdim=True)
    return values - torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def _teacher_logprobs(chunk: torch.Tensor, values: str, inv_t: float, acc: torch.dtype) -> torch.Tensor:
    base = chunk.to(acc)
    if values == "probs":
        base = torch.log(base)
    # log_softmax(base / T): a softmax of logits, or the power transform p^(1/T) of (log-)probs
    return torch.log_softmax(_shifted(base) * inv_t, dim=-1)


def _check_samplable(log_p: torch.Tensor, start: int) -> None:
    """Every row must define a distribution: some finite positive mass, no NaN, no +inf."""
    bad = torch.isnan(log_p).any(dim=-1)
    if bool(bad.any()):
        row = start + int(bad.nonzero()[0, 0])
        raise ValueError(
            f"teacher row {row} has no distribution to sample from (all zero / -inf, or NaN / +inf values); "
            "every position needs some finite positive teacher mass"
        )


@torch.no_grad()
def sample_teacher_targets(
    teacher: torch.Tensor,
    n_samples: int = 50,
    proposal_power: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    values: str = "logits",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RS-KD sampled targets: ``n_samples`` ids drawn with replacement from the
    proposal ``q ∝ p^proposal_power``, each draw weighing ``(p/q) / n_samples``, so that the
    expected target equals the teacher distribution ``p = softmax(teacher / T)``.

    Args:
        teacher: ``[..., V]`` teacher logits (``values="logits"``, default), log-probabilities
            (``"logprobs"``) or probabilities (``"probs"``).
        n_samples: draws per position (default 50, RS-KD's setting).
        proposal_power: τ of the proposal ``q ∝ p^τ`` (default 1.0: sample from the teacher, all
            weights ``count / n_samples``; τ < 1 flattens the proposal).
        generator: optional ``torch.Generator`` on the teacher's device, for reproducible draws.
        values: how to read ``teacher``.
        temperature: the teacher temperature T. Pass the same value as both ``temperature=`` and
            ``teacher_temperature=`` to ``topk_kl_loss`` so the targets are used as drawn.

    Returns:
        ``(ids [..., n_samples] int64, weights [..., n_samples])``: each sampled id appears once
        with its total weight; the remaining slots repeat an id with weight 0. Weights are fp32
        (fp64 for fp64 teachers) and sum to 1 for τ = 1. Use them as
        ``topk_kl_loss(student_logits, ids, weights.log(), tail="none")``.

    Raises:
        ValueError: a position whose teacher defines no distribution (all probabilities 0, all
            logits −inf, or a NaN / +inf value), ``n_samples`` outside ``[1, 65536]``, or a
            temperature / proposal power outside ``[1e-8, 1e8]``.
    """
    vocab = _check_logits(teacher, "teacher")
    n_samples = check_int(n_samples, "n_samples", low=1, high=MAX_SAMPLES)
    power = check_scale(proposal_power, "proposal_power")
    check_option(values, "values", TEACHER_VALUES)
    inv_t = 1.0 / check_scale(temperature, "temperature")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    lead = teacher.shape[:-1]
    flat = teacher.reshape(-1, vocab)
    acc = accumulation_dtype(teacher.dtype)
    ids = torch.empty(flat.shape[0], n_samples, dtype=torch.int64, device=flat.device)
    weights = torch.empty(flat.shape[0], n_samples, dtype=acc, device=flat.device)
    for start, end in _row_chunks(flat.shape[0], vocab):
        log_p = _teacher_logprobs(flat[start:end], values, inv_t, acc)
        _check_samplable(log_p, start)
        log_q = log_p if power == 1.0 else torch.log_softmax(_shifted(log_p) * power, dim=-1)
        draws = torch.multinomial(log_q.exp(), n_samples, replacement=True, generator=generator)
        draws = draws.sort(dim=-1).values
        draw_weight = (log_p.gather(-1, draws) - log_q.gather(-1, draws)).exp() / n_samples
        ids[start:end] = draws
        weights[start:end] = _merge_repeats(draws, draw_weight)
    return ids.reshape(*lead, n_samples), weights.reshape(*lead, n_samples)


def _merge_repeats(sorted_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sums the weights of equal ids (adjacent in each sorted row) into the first of them."""
    position = torch.arange(sorted_ids.shape[-1], device=sorted_ids.device).expand_as(sorted_ids)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    run_start = torch.where(starts, position, torch.zeros_like(position)).cummax(dim=-1).values
    return torch.zeros_like(weight).scatter_add_(-1, run_start, weight)
