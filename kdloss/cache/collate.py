"""Batching cached sequences for training: padding, label alignment, the vocabulary policy."""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ._arrays import as_array

__all__ = ["TopKCollator", "apply_vocab_policy", "VOCAB_POLICIES"]

VOCAB_POLICIES = ("error", "drop")
IDS_DTYPES = ("auto", "int64", "int32", "uint16")


def _loss_accepts(dtype: torch.dtype) -> bool:
    """Whether :func:`kdloss.functional.topk_kl_loss` takes teacher ids of ``dtype`` as they are."""
    from .._validation import INDEX_DTYPES

    return dtype in INDEX_DTYPES


def apply_vocab_policy(ids: np.ndarray, values: np.ndarray, student_vocab_size: int, policy: str,
                       values_kind: str = "logprobs", where: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Handles teacher ids the student's vocabulary does not have (``id >= student_vocab_size``).

    Args:
        ids, values: ``[R, k]`` teacher ids and values (not modified).
        student_vocab_size: the student's vocabulary size.
        policy: ``"error"`` raises ``ValueError`` if any such id carries probability (such ids
            in zero-probability ``-inf`` slots are replaced by 0 under either policy);
            ``"drop"`` gives those slots zero probability (value ``-inf``, id 0) and, for
            log-probs, rescales the kept slots so that the row's total top-k mass is unchanged
            (the dropped mass is spread over the kept ids in proportion). For logits, dropping
            alone renormalises (the loss takes a softmax over the kept logits).
        values_kind: ``"logprobs"`` or ``"logits"``.
        where: text naming the sequence, for the error message.

    Returns:
        ``(ids, values, empty_rows)``: new arrays, and a bool ``[R]`` mask of rows whose every
        slot was dropped (they carry no target; the collator ignores them).

    Example::

        ids, values, empty = apply_vocab_policy(seq.ids.numpy(), seq.values.numpy(), 151665, "drop")
    """
    beyond = ids >= student_vocab_size
    outside = beyond & (values != -np.inf)
    no_rows = np.zeros(ids.shape[0], dtype=bool)
    if not beyond.any():
        return ids, values, no_rows
    if policy == "error" and outside.any():
        raise ValueError(f"teacher id {int(ids[outside].max())} >= the student's vocab_size {student_vocab_size}"
                         f"{where}: the teacher's vocabulary is larger; pass vocab_policy='drop' to drop such "
                         "ids and renormalise, if the vocabularies agree below the student's size")
    ids = np.where(beyond, 0, ids)  # slots without probability keep none, under an id the student has
    if not outside.any():
        return ids, values, no_rows
    kept_values = np.where(outside, -np.inf, values)
    empty = np.all(kept_values == -np.inf, axis=1)
    if values_kind == "logprobs":
        with np.errstate(divide="ignore", invalid="ignore"):
            total = _logsumexp(values.astype(np.float64))
            kept = _logsumexp(kept_values.astype(np.float64))
            shift = np.where(empty | ~np.isfinite(total), 0.0, total - kept)
        kept_values = (kept_values + shift[:, None]).astype(np.float32)
    return ids, kept_values.astype(np.float32), empty


def _logsumexp(values: np.ndarray) -> np.ndarray:
    top = values.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return (np.log(np.exp(values - top).sum(axis=1)) + top[:, 0])


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class TopKCollator:
    """``collate_fn`` for a ``DataLoader`` over a :class:`~kdloss.cache.TopKCache`: pads and aligns.

    Shift convention: stored row t is the teacher's distribution of ``tokens[t + 1]`` (it comes
    from the teacher's logits at position t). The batch keeps that alignment with the student's
    logits at position t, and gives both label conventions:

    * ``labels [B, L]``: Hugging Face convention, ``labels[t] = input_ids[t]`` (-100 at padding);
      a HF model given ``labels=`` shifts them itself;
    * ``shift_labels [B, L]``: ``shift_labels[t] = input_ids[t + 1]``, -100 where position t has no
      next token, no teacher row, or (``vocab_policy="drop"``) no teacher slot left. Pass it as
      ``labels=`` to :func:`~kdloss.functional.topk_kl_loss` together with the student's logits
      ``[B, L, V]``, ``teacher_ids`` and ``teacher_values``.

    Args:
        pad_token_id: token used to pad ``input_ids`` (default 0; masked out by ``attention_mask``).
        student_vocab_size: the student's vocabulary size, for ``vocab_policy``; None skips the check
            (the loss still rejects out-of-range ids).
        vocab_policy: ``"error"`` (default) or ``"drop"``, see :func:`apply_vocab_policy`.
        values_kind: ``"logprobs"`` (default) or ``"logits"``: what the values are, for ``"drop"``
            (``cache.metadata["values"]``).
        ids_dtype: dtype of ``teacher_ids``: ``"auto"`` (default: uint16 when the loss accepts it and
            the ids fit, else int32), ``"int64"``, ``"int32"`` or ``"uint16"``.
        max_length: truncate sequences to this many tokens (None: no truncation).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        ignore_index: label value of positions that do not count (-100).

    Returns (``collator(items)``): a dict with ``input_ids``, ``attention_mask``, ``labels``,
    ``shift_labels`` (int64 ``[B, L]``), ``teacher_ids [B, L, k]`` and ``teacher_values [B, L, k]``
    float32. Padded positions hold id 0 with value 0 and -inf elsewhere (a valid one-point
    teacher, so nothing non-finite appears; they are ignored through ``shift_labels``).

    Example::

        loader = DataLoader(TopKCache("cache/"), batch_size=8, shuffle=True, num_workers=2,
                            collate_fn=TopKCollator(student_vocab_size=V))
        for batch in loader:
            logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = kdloss.topk_kl_loss(logits, batch["teacher_ids"], batch["teacher_values"],
                                       batch["shift_labels"], **cache.loss_kwargs())
    """

    def __init__(self, *, pad_token_id: int = 0, student_vocab_size: int | None = None, vocab_policy: str = "error",
                 values_kind: str = "logprobs", ids_dtype: str = "auto", max_length: int | None = None,
                 pad_to_multiple_of: int | None = None, ignore_index: int = -100) -> None:
        self.pad_token_id = _check_int(pad_token_id, "pad_token_id", 0)
        self.student_vocab_size = None if student_vocab_size is None else _check_int(
            student_vocab_size, "student_vocab_size", 1)
        if vocab_policy not in VOCAB_POLICIES:
            raise ValueError(f"vocab_policy must be one of {VOCAB_POLICIES}, got {vocab_policy!r}")
        if values_kind not in ("logprobs", "logits"):
            raise ValueError(f"values_kind must be 'logprobs' or 'logits', got {values_kind!r}")
        if ids_dtype not in IDS_DTYPES:
            raise ValueError(f"ids_dtype must be one of {IDS_DTYPES}, got {ids_dtype!r}")
        self.vocab_policy, self.values_kind, self.ids_dtype = vocab_policy, values_kind, ids_dtype
        self.max_length = None if max_length is None else _check_int(max_length, "max_length", 1)
        self.pad_to_multiple_of = None if pad_to_multiple_of is None else _check_int(
            pad_to_multiple_of, "pad_to_multiple_of", 1)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = int(ignore_index)

    def _item(self, item, position: int):
        if isinstance(item, dict):
            tokens, ids, values = item["tokens"], item["ids"], item["values"]
            index = item.get("index", position)
        else:
            tokens, ids, values = item[0], item[1], item[2]
            index = item[3] if len(item) > 3 else position
        tokens = as_array(tokens, "tokens", "int").astype(np.int64)
        ids = as_array(ids, "ids", "int")
        values = as_array(values, "values", "float").astype(np.float32)
        if tokens.ndim != 1 or ids.ndim != 2 or values.shape != ids.shape or ids.shape[0] not in (
                tokens.shape[0], tokens.shape[0] - 1):
            raise ValueError(f"batch item {position}: expected tokens [T], ids and values [T or T - 1, k], got "
                             f"{tokens.shape}, {ids.shape}, {values.shape}")
        return tokens, ids, values, index

    def _ids_dtype(self, largest: int) -> np.dtype:
        if self.ids_dtype == "auto":
            if largest < 1 << 16 and _loss_accepts(torch.uint16):
                return np.dtype(np.uint16)
            return np.dtype(np.int32)
        if self.ids_dtype == "uint16" and largest >= 1 << 16:
            raise ValueError(f"ids_dtype='uint16' cannot hold teacher id {largest}")
        return np.dtype(self.ids_dtype)

    def __call__(self, items) -> dict[str, torch.Tensor]:
        if len(items) == 0:
            raise ValueError("cannot collate an empty batch")
        parsed = [self._item(item, position) for position, item in enumerate(items)]
        k = parsed[0][1].shape[1]
        if any(ids.shape[1] != k for _, ids, _, _ in parsed):
            raise ValueError("all batch items must have the same k")
        if self.max_length is not None:
            parsed = [(t[: self.max_length], i[: self.max_length], v[: self.max_length], n) for t, i, v, n in parsed]
        length = max(tokens.shape[0] for tokens, _, _, _ in parsed)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(parsed)
        input_ids = np.full((batch, length), self.pad_token_id, dtype=np.int64)
        attention = np.zeros((batch, length), dtype=np.int64)
        shift_labels = np.full((batch, length), self.ignore_index, dtype=np.int64)
        teacher_ids = np.zeros((batch, length, k), dtype=np.int64)
        teacher_values = np.full((batch, length, k), -np.inf, dtype=np.float32)
        teacher_values[..., 0] = 0.0
        for row, (tokens, ids, values, index) in enumerate(parsed):
            count, rows = tokens.shape[0], ids.shape[0]
            if self.student_vocab_size is not None:
                ids, values, empty = apply_vocab_policy(
                    ids, values, self.student_vocab_size, self.vocab_policy, self.values_kind,
                    where=f" (batch item {row}, cache sequence {index})")
            else:
                empty = np.zeros(rows, dtype=bool)
            input_ids[row, :count] = tokens
            attention[row, :count] = 1
            teacher_ids[row, :rows] = ids
            teacher_values[row, :rows] = values
            # row t targets tokens[t + 1]: only positions with both a next token and a teacher row count
            labelled = min(rows, count - 1)
            shift_labels[row, :labelled] = np.where(empty[:labelled], self.ignore_index, tokens[1: labelled + 1])
        labels = np.where(attention == 1, input_ids, self.ignore_index)
        ids_dtype = self._ids_dtype(int(teacher_ids.max()))
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels),
            "shift_labels": torch.from_numpy(shift_labels),
            "teacher_ids": torch.from_numpy(teacher_ids.astype(ids_dtype)),
            "teacher_values": torch.from_numpy(teacher_values),
        }
