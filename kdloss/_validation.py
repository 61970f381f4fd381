"""Argument checks shared by every public entry point. Each failure is a ``ValueError`` that
names the argument and says what was expected (spec §0)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "kernel", "reference")
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(value, name: str, *, ndim: int | Iterable[int] | None = None) -> torch.Tensor:
    """``value`` must be a floating-point tensor (fp32/fp64/bf16/fp16) of rank ``ndim``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), "
            f"got dtype {value.dtype}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            ranks = " or ".join(str(r) for r in allowed)
            raise ValueError(f"{name} must have rank {ranks}, got shape {tuple(value.shape)}")
    return value


def check_option(value, name: str, allowed: Iterable[str]) -> str:
    """``value`` must be one of the ``allowed`` option strings."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _check_same(attribute: str, tensors: dict[str, torch.Tensor]):
    items = list(tensors.items())
    first_name, first = items[0]
    expected = getattr(first, attribute)
    for name, tensor in items[1:]:
        if getattr(tensor, attribute) != expected:
            raise ValueError(
                f"{name} must have the {attribute} of {first_name} ({expected}), "
                f"got {getattr(tensor, attribute)}"
            )
    return expected


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors must live on one device; returns it."""
    return _check_same("device", tensors)


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """All tensors must share one dtype; returns it."""
    return _check_same("dtype", tensors)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for everything else (spec: accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
