"""Helpers shared by the tests (an importable module; ``conftest.py`` holds only fixtures and profiles).

Numerical comparison rules shared by every loss's tests.

Low-precision rule (docs/verifying.md; constants in kdloss.testing): the kernel's error against the
fp64 reference may not exceed the error of the same formula evaluated naively in the low-precision
dtype (what a user's eager code does) plus a small absolute bound ``SLACK · eps(dtype) · (1 + scale)``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

from kdloss.testing import lowp_bound, max_abs, non_contiguous

__all__ = ["CUDA", "DEVICES", "assert_close_fp64", "assert_within_lowp_bound", "cuda_only", "free_port", "lowp_bound",
           "max_abs", "non_contiguous", "raises_naming", "spawn_ranks"]

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a gloo rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int, out_dir, timeout_s: float) -> list:
    """Runs ``worker(rank, port, out_dir)`` in ``world`` processes and returns each rank's
    ``torch.load(out_dir / f"rank{rank}.pt")``. Fails after ``timeout_s`` seconds; a worker that
    wrote ``rank{r}.error`` (its traceback) has it quoted in the failure."""
    import torch.multiprocessing as mp

    out_dir = Path(out_dir)
    context = mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"the gloo workers did not finish within {timeout_s} s")
    except Exception as error:
        details = "\n".join(e.read_text() for e in sorted(out_dir.glob("rank*.error")))
        raise AssertionError(f"a worker failed: {error}\n{details}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
