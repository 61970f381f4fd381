"""Choosing between the compiled kernel and the pure-PyTorch reference (``backend=``)."""

from __future__ import annotations

import sys
import warnings

import torch

from . import _build, _registry
from ._validation import BACKENDS, check_option

_warned: set[tuple[str, str]] = set()


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (≈ 1 s) at
    ``import kdloss``: that decorator only marks the function, and dynamo reads the mark when it
    traces a call. If dynamo is already loaded, its own decorator is used; ``tests/test_build.py``
    checks that the mark set here is the one torch's decorator sets."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def _load_all(loss: str, device_type: str) -> tuple[bool, str | None]:
    """Loads every kernel library ``loss`` needs (its registry entry's ``kernels``); (ok, first failure)."""
    for library in _registry.get(loss).kernels:
        if not _build.load(library, device_type):
            return False, _build.failure(library, device_type)
    return True, None


@assume_constant_result
def _auto_kernel_available(loss: str, device_type: str) -> bool:
    # Runs eagerly even under torch.compile (its result is a trace-time constant).
    ok, why = _load_all(loss, device_type)
    if not ok and (loss, device_type) not in _warned:
        _warned.add((loss, device_type))
        warnings.warn(
            f"kdloss: the {loss} kernel for {device_type} is unavailable "
            f"({why}); using the pure-PyTorch reference. "
            'Pass backend="reference" to silence this warning or backend="kernel" to make it an error.',
            RuntimeWarning,
            stacklevel=3,
        )
    return ok


@assume_constant_result
def _kernel_loaded(loss: str, device_type: str) -> bool:
    return _load_all(loss, device_type)[0]


def _under_functorch_transform() -> bool:
    """Inside ``torch.func.grad``/``vmap``/``jacrev``…: the kernels' autograd formulas (registered with
    ``torch.library``) have no functorch rules, while the reference is plain PyTorch."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def use_kernel(loss: str, device: torch.device, backend: str) -> bool:
    """True to run the compiled kernel of ``loss`` (a registry name), False for the reference.

    ``backend="kernel"`` raises :class:`KernelUnavailableError` when the loss has no kernel or its
    kernel libraries cannot be built or loaded for ``device``; ``"auto"`` falls back with one warning
    (silently for a loss that has no kernel at all: there is nothing to fall back from). Inside a
    ``torch.func`` transform ``"auto"`` runs the reference and ``"kernel"`` raises.
    """
    check_option(backend, "backend", BACKENDS)
    if backend == "reference":
        return False
    if not _registry.get(loss).has_kernel:
        if backend == "kernel":
            raise _build.KernelUnavailableError(
                f"backend='kernel': kdloss {loss} has no compiled kernel (reference only); "
                'use backend="auto" or "reference"'
            )
        return False
    if _under_functorch_transform():
        if backend == "kernel":
            raise _build.KernelUnavailableError(
                f"backend='kernel': the kdloss {loss} kernel does not support torch.func transforms (grad, vmap, "
                'jacrev, …); use backend="auto" (which runs the pure-PyTorch reference there) or "reference"'
            )
        return False
    if backend == "kernel":
        if not _kernel_loaded(loss, device.type):
            raise _build.KernelUnavailableError(
                f"backend='kernel': kdloss {loss} has no usable kernel for {device.type} "
                f"({_load_all(loss, device.type)[1]})"
            )
        return True
    return _auto_kernel_available(loss, device.type)
