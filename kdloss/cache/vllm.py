"""Turning vLLM ``prompt_logprobs`` into cache rows (no vLLM import: the output is read by duck typing)."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

__all__ = ["VLLMTopK", "from_vllm_prompt_logprobs"]

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")


class VLLMTopK(NamedTuple):
    """Top-k rows from vLLM: ``ids [R, k]`` int64, ``values [R, k]`` float32, the ``temperature``
    they were generated at, and ``values_kind`` (``"logprobs"`` or ``"logits"``), to pass to
    :class:`~kdloss.cache.TopKCacheWriter` (``temperature=``, ``values=``).

    Example::

        ids, values, temperature, values_kind = from_vllm_prompt_logprobs(prompt_logprobs, 64)
    """

    ids: np.ndarray
    values: np.ndarray
    temperature: float
    values_kind: str


def _entry_value(entry) -> tuple[float, int | None]:
    """(log-prob, rank) of one dict value: a vLLM ``Logprob`` object, a float, or a (logprob, rank) pair."""
    if isinstance(entry, numbers.Real):
        return float(entry), None
    if isinstance(entry, (tuple, list)) and len(entry) == 2:
        return float(entry[0]), None if entry[1] is None else int(entry[1])
    logprob = getattr(entry, "logprob", None)
    if logprob is None:
        raise TypeError(f"prompt_logprobs entries must be vLLM Logprob objects or floats, got {type(entry).__name__}")
    rank = getattr(entry, "rank", None)
    return float(logprob), None if rank is None else int(rank)


def _positions(prompt_logprobs):
    """Per position, a list of (token id, log-prob, rank); works on vLLM's list-of-dicts and FlatLogprobs."""
    if hasattr(prompt_logprobs, "start_indices") and hasattr(prompt_logprobs, "token_ids"):
        flat = prompt_logprobs
        for start, end in zip(flat.start_indices, flat.end_indices, strict=True):
            yield [(int(flat.token_ids[i]), float(flat.logprobs[i]),
                    None if flat.ranks[i] is None else int(flat.ranks[i])) for i in range(start, end)]
        return
    for position in prompt_logprobs:
        if position is None:
            yield []
            continue
        yield [(int(token), *_entry_value(entry)) for token, entry in position.items()]


def from_vllm_prompt_logprobs(prompt_logprobs, k: int, *, temperature: float = 1.0,
                              logprobs_mode: str = "raw_logprobs") -> VLLMTopK:
    """vLLM ``RequestOutput.prompt_logprobs`` → ``(ids [R, k], values [R, k])`` in cache order.

    vLLM returns, for each prompt position, a dict ``{token_id: Logprob(logprob, rank, ...)}``
    (``None`` for the first token, which has no context), holding the top ``prompt_logprobs``
    tokens plus the actual prompt token when it is not among them. Position t's entry is the
    distribution of token t, i.e. the teacher's logits at position t - 1; dropping the first
    (empty) position gives ``R = T - 1`` rows where row j belongs to logits position j, the
    cache's convention. Slots are ordered by vLLM's rank; the extra prompt token (rank > k) is
    left out; positions with fewer than k entries get ``-inf`` slots (id 0).

    Args:
        prompt_logprobs: the list of per-position dicts (or ``None``), or vLLM's ``FlatLogprobs``.
        k: slots per row (the ``prompt_logprobs=`` count requested from vLLM).
        temperature: the request's sampling temperature.
        logprobs_mode: the ``LLM(logprobs_mode=...)`` vLLM ran with. ``"raw_*"`` values are those
            of the unmodified model (temperature 1.0 is recorded); ``"processed_*"`` ones come after
            vLLM applied ``temperature`` (recorded as given).

    Returns:
        :class:`VLLMTopK` with ``temperature`` set as described and ``values_kind`` ``"logprobs"``
        or ``"logits"`` from ``logprobs_mode``.

    Example::

        out = llm.generate({"prompt_token_ids": tokens}, SamplingParams(prompt_logprobs=64, max_tokens=1))[0]
        rows = from_vllm_prompt_logprobs(out.prompt_logprobs, 64)
        writer.add(tokens, rows.ids, rows.values, temperature=rows.temperature)
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
    positions = list(_positions(prompt_logprobs))
    if positions and not positions[0]:
        positions = positions[1:]
    ids = np.zeros((len(positions), k), dtype=np.int64)
    values = np.full((len(positions), k), -np.inf, dtype=np.float32)
    for row, entries in enumerate(positions):
        if not entries:
            raise ValueError(f"prompt_logprobs position {row + 1} is empty (only the first position may be)")
        ranked = all(rank is not None for _, _, rank in entries)
        if ranked:
            chosen = sorted((e for e in entries if e[2] <= k), key=lambda e: e[2])
        else:
            chosen = sorted(entries, key=lambda e: -e[1])[:k]
        for slot, (token, logprob, _) in enumerate(chosen[:k]):
            ids[row, slot], values[row, slot] = token, logprob
    recorded = 1.0 if logprobs_mode.startswith("raw") else float(temperature)
    kind = "logits" if logprobs_mode.endswith("logits") else "logprobs"
    return VLLMTopK(ids, values, recorded, kind)
