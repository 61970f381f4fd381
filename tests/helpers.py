"""Numerical comparison rules shared by every loss's tests.

Low-precision rule (docs/verifying.md; constants in kdloss.testing): the kernel's error against the
fp64 reference may not exceed the error of the same formula evaluated naively in the low-precision
dtype (what a user's eager code does) plus a small absolute bound ``SLACK · eps(dtype) · (1 + scale)``.
"""

from __future__ import annotations

import torch

from kdloss.testing import SLACK


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_fp64(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-10, atol=1e-12):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def lowp_bound(naive: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, slack: float = SLACK) -> float:
    """Allowed error of a low-precision kernel: the naive eager error plus a small absolute bound."""
    scale = exact.double().abs().max().item() if exact.numel() else 0.0
    return max_abs(naive, exact) + slack * torch.finfo(dtype).eps * (1.0 + scale)


def assert_within_lowp_bound(kernel: torch.Tensor, naive: torch.Tensor, exact: torch.Tensor,
                             dtype: torch.dtype, what: str = "value") -> None:
    err, bound = max_abs(kernel, exact), lowp_bound(naive, exact, dtype)
    assert err <= bound, f"{what}: kernel error {err:.3e} > bound {bound:.3e} (naive {max_abs(naive, exact):.3e})"


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous layout (every other element of a doubled last dim)."""
    if t.dim() == 0:
        return t
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2].detach().requires_grad_(t.requires_grad)
