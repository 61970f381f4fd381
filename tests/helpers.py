"""Helpers shared by the tests (an importable module; ``conftest.py`` holds only fixtures and profiles).

Numerical comparison rules shared by every loss's tests.

Low-precision rule (docs/verifying.md; constants in kdloss.testing): the kernel's error against the
fp64 reference may not exceed the error of the same formula evaluated naively in the low-precision
dtype (what a user's eager code does) plus a small absolute bound ``SLACK · eps(dtype) · (1 + scale)``.
"""

from __future__ import annotations

import pytest
import torch

from kdloss.testing import lowp_bound, max_abs, non_contiguous

__all__ = ["CUDA", "DEVICES", "assert_close_fp64", "assert_within_lowp_bound", "cuda_only", "lowp_bound", "max_abs",
           "non_contiguous", "raises_naming"]

CUDA = torch.cuda.is_available()
#: Every device with kdloss kernels on this machine (CPU always; CUDA when a GPU exists).
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
_needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def cuda_only(test):
    """Marks a test ``cuda`` (``pytest -m cuda`` selects it) and skips it where no CUDA device exists."""
    return pytest.mark.cuda(_needs_cuda(test))


def assert_close_fp64(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-10, atol=1e-12):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_within_lowp_bound(kernel: torch.Tensor, naive: torch.Tensor, exact: torch.Tensor,
                             dtype: torch.dtype, what: str = "value") -> None:
    err, bound = max_abs(kernel, exact), lowp_bound(naive, exact, dtype)
    assert err <= bound, f"{what}: kernel error {err:.3e} > bound {bound:.3e} (naive {max_abs(naive, exact):.3e})"


def raises_naming(name: str):
    """``pytest.raises`` for a bad argument: a ``TypeError`` (wrong type) or ``ValueError`` (wrong value)
    whose message matches ``name``. The exact type per family is checked in ``tests/test_contract.py``."""
    return pytest.raises((TypeError, ValueError), match=name)
