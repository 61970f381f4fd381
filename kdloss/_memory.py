"""The gradient buffers kdloss's CPU kernels keep between steps (:func:`empty_cache`)."""

from __future__ import annotations

import torch

from . import _build


def empty_cache() -> int:
    """Free the idle gradient buffers that kdloss's CPU kernels keep for the next step.

    The top-k KL losses (``topk_kl_loss``, and ``fused_linear_topk_kl_loss`` for its weight gradient and
    chunk buffer) take large CPU buffers (8 MiB or more) in 2 MiB-aligned blocks advised for transparent
    huge pages. When the last tensor using such a block is freed, the block stays idle for the next
    request of a similar size (no more than twice its size), as PyTorch's CUDA caching allocator keeps
    freed memory: a training step then writes into pages that are already mapped instead of clearing
    fresh ones (on a 2-core VM, ~12 ms of a 37 ms top-k step for a 250 MiB gradient). At most two blocks
    are idle at a time. Call this to return them to the operating system, e.g. after training; set
    ``KDLOSS_GRAD_CACHE=0`` to never keep one, ``KDLOSS_HUGEPAGES=0`` to take these buffers from
    PyTorch's allocator instead. CUDA buffers come from PyTorch's caching allocator
    (``torch.cuda.empty_cache``).

    Args:
        None: the function takes no arguments.

    Returns:
        The number of bytes freed (0 when no block was idle or no CPU kernel has been loaded).

    Example:
        >>> import kdloss
        >>> kdloss.empty_cache() >= 0
        True
    """
    if not _build.is_loaded("topk_kl", "cpu"):
        return 0
    return int(torch.ops.kdloss.topk_kl_release_buffers())
