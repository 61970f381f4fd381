"""Process-group plumbing shared by the losses that couple ranks (SinKD's and the token contrastive
term's ``gather_across_ranks``, the vocabulary-parallel top-k losses).

Every function takes ``group``: a ``torch.distributed`` process group, a one-dimensional
``DeviceMesh`` (its group is used), or None for the default group.
"""

from __future__ import annotations

import torch

from ._validation import accumulation_dtype

__all__ = ["distributed_ready", "gather_rows", "group_rank_world", "resolve_group"]


def distributed_ready() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _device_mesh_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh


def resolve_group(group, name: str = "group"):
    """The ``ProcessGroup`` that ``group`` designates (None: the default group's ``WORLD`` handle).

    Raises ``TypeError`` for anything that is not None, a process group or a 1-D ``DeviceMesh``, and
    ``ValueError`` for a multi-dimensional mesh or when ``torch.distributed`` is not initialised.
    """
    if not distributed_ready():
        raise ValueError(f"{name} needs an initialised torch.distributed default process group "
                         "(torch.distributed.init_process_group)")
    dist = torch.distributed
    if group is None:
        return dist.group.WORLD
    mesh_type = _device_mesh_type()
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            raise ValueError(f"{name} must be a 1-D DeviceMesh (or one dimension of it, mesh['tp']), "
                             f"got a {group.ndim}-D mesh")
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or None, "
                        f"got {type(group).__name__}")
    return group


def group_rank_world(group=None) -> tuple[int, int]:
    """``(rank in group, group size)``; ``(0, 1)`` when ``torch.distributed`` is not in use."""
    if not distributed_ready():
        return 0, 1
    dist = torch.distributed
    pg = resolve_group(group)
    return dist.get_rank(pg), dist.get_world_size(pg)


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenates every rank's ``[B_r, C]`` rows in group-rank order (local batch sizes may differ).

    The other ranks' rows are constants; this rank's rows are ``local`` itself, so autograd gives
    each rank exactly ∂L/∂(its own rows) of a loss computed over the concatenation, with no
    communication in backward."""
    dist = torch.distributed
    pg = resolve_group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    if world == 1:
        return local
    sizes = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=pg)
    counts = [int(s.item()) for s in all_sizes]
    longest = max(counts)
    # gloo has no bf16/fp16 collectives everywhere: gather in the accumulation dtype (exact)
    wire = local.detach().to(accumulation_dtype(local.dtype))
    padded = wire.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = wire
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=pg)
    rows = [local if r == rank else parts[r][: counts[r]].to(local.dtype) for r in range(world)]
    return torch.cat(rows, dim=0)
