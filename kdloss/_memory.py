"""The gradient buffers kdloss's CPU kernels keep between steps (:func:`empty_cache`)."""

from __future__ import annotations

import torch

from . import _build


def empty_cache() -> int:
    """Free the idle gradient buffer that kdloss's CPU kernels keep for the next step.

    The top-k KL losses (``topk_kl_loss``, ``fused_linear_topk_kl_loss``) return large CPU gradients
    (8 MiB or more) in 2 MiB-aligned blocks advised for transparent huge pages. When the last tensor
    using such a block is freed, the block stays idle for the next gradient of a similar size (no more
    than twice its size), as PyTorch's CUDA caching allocator keeps freed memory: a training step
    then writes into pages that are already mapped instead of clearing fresh ones (on a 2-core VM,
    ~12 ms of a 37 ms step for a 250 MiB gradient). At most one block is idle at a time. Call this to
    return it to the operating system, e.g. after training; set ``KDLOSS_GRAD_CACHE=0`` to never keep
    one, ``KDLOSS_HUGEPAGES=0`` to take gradients from PyTorch's allocator instead. CUDA gradients
    come from PyTorch's caching allocator (``torch.cuda.empty_cache``).

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
