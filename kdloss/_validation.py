"""Argument checks shared by every public entry point.

Every check names the argument it rejects. A value of the wrong type raises ``TypeError``; a value of
the right type that is out of range, of the wrong shape or inconsistent with another argument raises
``ValueError``. The numeric checks use chained comparisons (not ``math.isfinite``) so that the
symbolic numbers ``torch.compile`` passes through trace.

Data-dependent checks (ids in range, labels in range) need one host sync; they run eagerly and are
skipped while ``torch.compile`` traces (the kernels still refuse out-of-range ids on their own).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "REDUCTIONS",
    "accumulation_dtype",
    "check_bool",
    "check_index_tensor",
    "check_int",
    "check_label_values",
    "check_labels",
    "check_num_items",
    "check_option",
    "check_real",
    "check_same_device",
    "check_same_dtype",
    "check_scale",
    "check_tensor",
    "comparable",
    "has_data",
    "mean_divisor",
]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: Integer dtypes accepted for ids and labels (any that can hold the value); kernels read them as is or
#: after a cheap widening of the small ``[..., k]`` / ``[...]`` tensors.
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint16, torch.int8, torch.uint8)
BACKENDS = ("auto", "kernel", "reference")
REDUCTIONS = ("mean", "sum", "none")
_INT64_RANGE = (-(2**63), 2**63 - 1)
#: The closed range of every positive scale option: temperatures, the graph bandwidth σ, the soft-cap.
#: Inside it the kernels' float32 intermediates stay finite for logits (or distances) up to ~1e30 in
#: magnitude: logit differences over T (≤ 1e38), 1/T and T² (1e±16); beyond it they overflow to inf or
#: flush to 0, and a loss can turn into inf − inf or 0·inf = NaN.
SCALE_RANGE = (1e-8, 1e8)


def _type_name(value) -> str:
    return type(value).__name__


def _check_dense(value: torch.Tensor, name: str) -> None:
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if value.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")


def check_tensor(value, name: str, *, ndim: int | Iterable[int] | None = None) -> torch.Tensor:
    """``value`` must be a dense floating-point tensor (fp32/fp64/bf16/fp16) of rank ``ndim``.

    Raises ``TypeError`` for a non-tensor, a sparse or nested tensor or a non-float dtype, and
    ``ValueError`` for a wrong rank.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(value)}")
    _check_dense(value, name)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), "
            f"got dtype {value.dtype}"
        )
    _check_rank(value, name, ndim)
    return value


def check_index_tensor(value, name: str, *, ndim: int | Iterable[int] | None = None) -> torch.Tensor:
    """``value`` must be a dense integer tensor (int64/int32/int16/uint16/int8/uint8) of rank ``ndim``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(value)}")
    _check_dense(value, name)
    if value.dtype not in INDEX_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in INDEX_DTYPES)
        raise TypeError(f"{name} must be an integer tensor ({allowed}), got dtype {value.dtype}")
    _check_rank(value, name, ndim)
    return value


def _check_rank(value: torch.Tensor, name: str, ndim) -> None:
    if ndim is None:
        return
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if value.dim() not in allowed:
        ranks = " or ".join(str(r) for r in allowed)
        raise ValueError(f"{name} must have rank {ranks}, got shape {tuple(value.shape)}")


def check_option(value, name: str, allowed: Iterable[str]) -> str:
    """``value`` must be one of the ``allowed`` option strings."""
    allowed = tuple(allowed)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(map(repr, allowed))}; got {_type_name(value)}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_bool(value, name: str) -> bool:
    """``value`` must be a ``bool`` (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` must be an integer (not a bool) in ``[low, high]`` and within int64."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    low = _INT64_RANGE[0] if low is None else low
    high = _INT64_RANGE[1] if high is None else high
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value}")
    return int(value) if isinstance(value, numbers.Integral) else value


def check_real(value, name: str, *, low: float = -math.inf, high: float = math.inf, low_open: bool = True,
               high_open: bool = True) -> float:
    """``value`` must be a real number (not a bool) in the interval from ``low`` to ``high``.

    The bounds are excluded unless ``low_open``/``high_open`` is False; the defaults accept every
    finite number and reject ±inf and NaN (every comparison with NaN is false).
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    above = low < value if low_open else low <= value
    below = value < high if high_open else value <= high
    if not (above and below):
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {left}{low}, {high}{right}, got {value!r}")
    return float(value) if isinstance(value, numbers.Real) else value


def check_scale(value, name: str) -> float:
    """``value`` must be a real number in :data:`SCALE_RANGE` (a temperature, σ or soft-cap)."""
    return check_real(value, name, low=SCALE_RANGE[0], high=SCALE_RANGE[1], low_open=False, high_open=False)


def has_data(tensor: torch.Tensor) -> bool:
    """Whether data-dependent checks can read ``tensor``: not while ``torch.compile`` traces, and never
    on the meta device (shapes only)."""
    return not torch.compiler.is_compiling() and tensor.device.type != "meta"


def _check_same(attribute: str, tensors: dict[str, torch.Tensor]):
    items = list(tensors.items())
    first_name, first = items[0]
    expected = getattr(first, attribute)
    for name, tensor in items[1:]:
        if getattr(tensor, attribute) != expected:
            raise ValueError(
                f"{name} must have the {attribute} of {first_name} ({expected}), got {getattr(tensor, attribute)}"
            )
    return expected


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors must live on one device; returns it."""
    return _check_same("device", tensors)


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """All tensors must share one dtype; returns it."""
    return _check_same("dtype", tensors)


def check_labels(labels, lead: tuple, owner: str, *, classes: int | None = None, ignore_index: int = -100):
    """``labels`` (None or an integer tensor) must have the leading shape ``lead`` of ``owner``.

    With ``classes``, values must lie in ``[0, classes)`` or equal ``ignore_index`` (one host sync;
    skipped while compiling).
    """
    if labels is None:
        return None
    check_index_tensor(labels, "labels")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(f"labels must have the leading shape {tuple(lead)} of {owner}, got {tuple(labels.shape)}")
    if classes is not None:
        check_label_values(labels, classes, ignore_index)
    return labels


def check_label_values(labels, classes: int, ignore_index: int) -> None:
    """Values of ``labels`` (None allowed) must lie in ``[0, classes)`` or equal ``ignore_index``.

    One host sync; skipped while ``torch.compile`` traces.
    """
    if labels is None or labels.numel() == 0 or not has_data(labels):
        return
    values = comparable(labels)
    bad = (values != ignore_index) & ((values < 0) | (values >= classes))
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {classes}) or equal ignore_index = {ignore_index}")


def comparable(index: torch.Tensor) -> torch.Tensor:
    """``index`` in a dtype that supports comparisons (torch has none for uint16: widened to int32)."""
    return index.to(torch.int32) if index.dtype == torch.uint16 else index


def check_num_items(num_items_in_batch, reduction: str, device: torch.device):
    """``num_items_in_batch``: None, an int ≥ 0, or a one-element real tensor; only with ``"mean"``.

    Returns None, an int, or a 0-d detached tensor on ``device`` (moved without a host sync).
    """
    if num_items_in_batch is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f"num_items_in_batch divides the summed loss, so it needs reduction='mean', got {reduction!r}"
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        dtype = num_items_in_batch.dtype
        if num_items_in_batch.numel() != 1 or dtype.is_complex or dtype == torch.bool:
            raise ValueError(
                f"num_items_in_batch must be an int or a one-element real tensor, got a {dtype} tensor of "
                f"shape {tuple(num_items_in_batch.shape)}"
            )
        count = num_items_in_batch.detach().reshape(())
        if count.device.type == "cpu" and has_data(count) and not -math.inf < count.item() < math.inf:
            # a NaN count would otherwise make the mean 0 silently (a count ≤ 0 gives 0); device tensors
            # are used as given (reading them would synchronise the device)
            raise ValueError(f"num_items_in_batch must be a finite count, got {count.item()}")
        return count.to(device, non_blocking=True)
    return check_int(num_items_in_batch, "num_items_in_batch", low=0)


def mean_divisor(counted: torch.Tensor, num_items, acc: torch.dtype) -> torch.Tensor:
    """The ``"mean"`` denominator as a 0-d ``acc`` tensor on ``counted``'s device (no host sync):
    the number of True entries of the bool mask ``counted``, or ``num_items`` when given."""
    if num_items is None:
        return counted.sum().to(acc)
    if isinstance(num_items, torch.Tensor):
        return num_items.to(acc)
    return torch.tensor(float(num_items), dtype=acc, device=counted.device)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32
