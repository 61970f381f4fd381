"""The dtype of a returned loss, and autocast around kdloss's own arithmetic.

Every kdloss loss behaves like one of autocast's fp32 operations (``F.cross_entropy``,
``F.mse_loss``): inside ``torch.autocast`` for the inputs' device type it returns the loss in the
accumulation dtype (fp32; fp64 for fp64 inputs) instead of rounding it to the (bf16/fp16) input
dtype; outside autocast the loss comes back in the input's dtype, as before. The kernels always
produce the loss in the accumulation dtype; :func:`cast_loss` makes the one decision. Gradients
come back in each input's own dtype either way.

kdloss's own matrix products (neighbour search, reference similarities, the fused head's chunk
GEMMs) must not be rerouted to bf16 by an enclosing autocast: they run under :func:`no_autocast`.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_enabled", "cast_loss", "no_autocast"]


def autocast_enabled(device_type: str) -> bool:
    """True inside an enabled ``torch.autocast`` region for ``device_type`` ("cpu", "cuda", …); False
    for device types autocast does not know (e.g. "meta")."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def cast_loss(loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``loss`` (computed in the accumulation dtype) as the caller receives it: unchanged under
    autocast for its device type, else rounded to ``dtype`` (the input's dtype)."""
    if autocast_enabled(loss.device.type):
        return loss
    return loss.to(dtype)


def no_autocast(device_type: str):
    """A context that disables autocast for ``device_type`` (a no-op context when it is off)."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
