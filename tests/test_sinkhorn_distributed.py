"""SinKD with ``gather_across_ranks=True``: two CPU processes on the gloo backend couple the global
batch; each rank's loss and gradient must equal the single-process loss over the concatenated
batch (and its gradient restricted to that rank's rows). Local batch sizes differ between ranks."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from kdloss.functional import sinkhorn_loss

from helpers import assert_close_fp64, spawn_ranks

WORLD = 2
STUDENT_ROWS = (5, 3)  # per rank
TEACHER_ROWS = (4, 6)
CLASSES = 3
CONFIGS = [("kernel", torch.float64), ("reference", torch.float64), ("kernel", torch.bfloat16)]
TIMEOUT_S = 240


def _global_inputs():
    gen = torch.Generator().manual_seed(0)
    zs = 2 * torch.randn(sum(STUDENT_ROWS), CLASSES, generator=gen, dtype=torch.float64)
    zt = 2 * torch.randn(sum(TEACHER_ROWS), CLASSES, generator=gen, dtype=torch.float64)
    return zs, zt


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        zs, zt = _global_inputs()
        results = {}
        for backend, dtype in CONFIGS:
            local = zs[_rows(STUDENT_ROWS, rank)].to(dtype).requires_grad_()
            teacher = zt[_rows(TEACHER_ROWS, rank)].to(dtype)
            loss = sinkhorn_loss(local, teacher, scale=1e-3, gather_across_ranks=True, backend=backend)
            (grad,) = torch.autograd.grad(loss, local)
            results[(backend, str(dtype))] = (loss.detach(), grad)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_gather_across_ranks_matches_single_process_on_the_global_batch(tmp_path):
    per_rank = spawn_ranks(_worker, WORLD, tmp_path, TIMEOUT_S)
    zs, zt = _global_inputs()
    for backend, dtype in CONFIGS:
        full = zs.to(dtype).requires_grad_()
        expected = sinkhorn_loss(full, zt.to(dtype), scale=1e-3, backend=backend)
        (expected_grad,) = torch.autograd.grad(expected, full)
        for rank, results in enumerate(per_rank):
            loss, grad = results[(backend, str(dtype))]
            local_expected = expected_grad[_rows(STUDENT_ROWS, rank)]
            if dtype == torch.float64:
                assert_close_fp64(loss, expected)
                assert_close_fp64(grad, local_expected)
            else:  # the same kernel on the same global batch: identical bits
                assert torch.equal(loss, expected) and torch.equal(grad, local_expected)


def test_gather_without_a_process_group_is_the_local_loss():
    zs, zt = _global_inputs()
    assert not dist.is_initialized()
    a = sinkhorn_loss(zs, zt, gather_across_ranks=True, backend="kernel")
    b = sinkhorn_loss(zs, zt, backend="kernel")
    assert torch.equal(a, b)
