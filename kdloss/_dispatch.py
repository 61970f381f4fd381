"""Choosing between the compiled kernel and the pure-PyTorch reference (``backend=``)."""

from __future__ import annotations

import warnings

import torch

from . import _build
from ._validation import BACKENDS, check_option

_warned: set[tuple[str, str]] = set()


@torch.compiler.assume_constant_result
def _auto_kernel_available(loss: str, device_type: str) -> bool:
    # Runs eagerly even under torch.compile (its result is a trace-time constant).
    ok = _build.load(loss, device_type)
    if not ok and (loss, device_type) not in _warned:
        _warned.add((loss, device_type))
        warnings.warn(
            f"kdloss: the {loss} kernel for {device_type} is unavailable "
            f"({_build.failure(loss, device_type)}); using the pure-PyTorch reference. "
            'Pass backend="reference" to silence this warning or backend="kernel" to make it an error.',
            RuntimeWarning,
            stacklevel=3,
        )
    return ok


@torch.compiler.assume_constant_result
def _kernel_loaded(loss: str, device_type: str) -> bool:
    return _build.load(loss, device_type)


def use_kernel(loss: str, device: torch.device, backend: str) -> bool:
    """True to run the compiled kernel, False for the reference; raises for an unusable "kernel"."""
    check_option(backend, "backend", BACKENDS)
    if backend == "reference":
        return False
    if backend == "kernel":
        if not _kernel_loaded(loss, device.type):
            raise _build.KernelUnavailableError(
                f"backend='kernel': kdloss {loss} has no usable kernel for {device.type} "
                f"({_build.failure(loss, device.type)})"
            )
        return True
    return _auto_kernel_available(loss, device.type)
