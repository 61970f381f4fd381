"""CUDA kernels of every registered loss, generic over the fuzz specs (kdloss.testing): parity with the
CPU kernel and the float64 reference in every dtype, bitwise determinism run to run, no host sync in
backward, inputs on a second GPU, and misaligned, row-padded and strided inputs.

The cases are the fixed ones of :mod:`kdloss.testing.device`. The device under test is
``$KDLOSS_TEST_DEVICE`` (default ``cuda``); every test but the first is marked ``cuda`` and skipped
where that device does not exist. ``python -m kdloss.selftest --device cpu`` points the same tests at
the CPU so that CI exercises them without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from kdloss import testing
from kdloss.testing.device import CASES, LAYOUTS, compare_devices, run_case, upstream_gradient

TARGET = os.environ.get("KDLOSS_TEST_DEVICE", "cuda")
ON_TARGET = torch.device(TARGET).type == "cpu" or torch.cuda.is_available()
TWO_GPUS = torch.device(TARGET).type == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() >= 2


def losses() -> list[str]:
    """Every loss with a fuzz spec (the losses whose kernels these tests cover)."""
    return testing.names()


def on_target(test):
    """Marks a test ``cuda`` and skips it where the device under test does not exist."""
    return pytest.mark.cuda(pytest.mark.skipif(not ON_TARGET, reason=f"needs a {TARGET} device")(test))


def _id(value) -> str:
    return str(value).replace("torch.", "")


CASE_IDS = [(loss, name) for loss in losses() for name in CASES.get(loss, {})]
PARITY = [(loss, name, dtype) for loss, name in CASE_IDS for dtype in testing.get(loss).dtypes]
TWO_DTYPES = [(loss, name, dtype) for loss, name in CASE_IDS for dtype in (torch.float32, torch.bfloat16)]
OTHER_LAYOUTS = [layout for layout in LAYOUTS if layout != "contiguous"]


def _assert_ok(result, what: str) -> None:
    assert result.ok, f"{what}: {result}\n" + "\n".join(result.details)


def test_every_registered_loss_has_device_cases():
    """A loss registered without fixed device cases would silently get no CUDA coverage; the cases must
    also still fit the spec's case format (they build on the CPU)."""
    missing = sorted(set(losses()) - set(CASES))
    assert not missing, f"add cases for {missing} to kdloss/testing/device.py"
    for loss, name in CASE_IDS:
        case = CASES[loss][name]
        assert case.get("layout", "contiguous") == "contiguous", (loss, name)
        built = testing.get(loss).build(case, torch.device("cpu"), torch.float32)
        assert any(x.requires_grad and x.numel() > 0 for x in built.inputs), (loss, name)


@on_target
@pytest.mark.parametrize("loss, name, dtype", PARITY, ids=_id)
def test_matches_cpu_kernel_and_reference(loss, name, dtype):
    _assert_ok(compare_devices(loss, CASES[loss][name], TARGET, dtype), f"{loss}/{name}")


@on_target
@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
@pytest.mark.parametrize("loss, name, dtype", TWO_DTYPES, ids=_id)
def test_misaligned_padded_and_strided_inputs(loss, name, dtype, layout):
    """Every input and constant in ``layout`` on the device; compared with contiguous CPU inputs."""
    _assert_ok(compare_devices(loss, CASES[loss][name], TARGET, dtype, layout), f"{loss}/{name}/{layout}")


@on_target
@pytest.mark.parametrize("loss, name, dtype", TWO_DTYPES, ids=_id)
def test_bitwise_deterministic_run_to_run(loss, name, dtype):
    case = CASES[loss][name]
    first = run_case(loss, case, TARGET, dtype).outputs
    for _ in range(2):
        again = run_case(loss, case, TARGET, dtype).outputs
        for index, (a, b) in enumerate(zip(first, again, strict=True)):
            assert torch.equal(a, b), f"{loss}/{name}: output {index} (0: value, then gradients) differs between runs"


@on_target
@pytest.mark.parametrize("loss, name, dtype", TWO_DTYPES, ids=_id)
def test_no_host_sync_in_backward(loss, name, dtype):
    """Backward of the kernel under ``torch.cuda.set_sync_debug_mode("error")``: any synchronising call
    (``.item()``, a device-to-host copy, a ``nonzero``) raises."""
    spec = testing.get(loss)
    case = CASES[loss][name]
    built = spec.build(case, torch.device(TARGET), dtype)
    out = spec.kernel(case, *built.inputs, **built.constants)
    weight = upstream_gradient(out, built.upstream_seed)
    need = [x for x in built.inputs if x.requires_grad]
    if torch.device(TARGET).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        grads = torch.autograd.grad(out, need, grad_outputs=weight, allow_unused=True)
    finally:
        if torch.device(TARGET).type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert any(g is not None for g in grads), f"{loss}/{name}: no gradient reached the inputs"


@on_target
@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
@pytest.mark.parametrize("loss, name", CASE_IDS, ids=_id)
def test_inputs_on_the_second_gpu(loss, name):
    """Inputs on cuda:1 while cuda:0 is current: outputs stay on cuda:1 and match the CPU kernel."""
    torch.cuda.set_device(0)
    _assert_ok(compare_devices(loss, CASES[loss][name], "cuda:1", torch.float32), f"{loss}/{name}")
    assert torch.cuda.current_device() == 0


# --- TRG contextual and graph: the precomputed contextual gradient over several chunks, the kNN -------


def _brute_force_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """The kNN definition spelled out in float64 over the full matrix: (distance, index) ascending."""
    x = x.double().cpu()
    norms = (x * x).sum(1)
    dist = (norms[:, None] + norms[None, :] - 2 * x @ x.T).clamp_min(0)
    dist.fill_diagonal_(float("nan"))  # sorts last: the node itself is never chosen
    return torch.sort(dist, dim=1, stable=True).indices[:, :k]


# (B, N, D, dtypes, reductions): groups of whole images (51 images of 580 tokens: two chunks of the
# CUDA glue, symmetric block products) and rows of one long image (N² > 2²⁴: row chunks, recomputed)
CONTEXTUAL_CHUNKS = [
    (51, 580, 8, (torch.float64, torch.float32, torch.bfloat16, torch.float16), ("mean", "sum", "none")),
    (1, 4100, 8, (torch.float32, torch.bfloat16), ("mean", "none")),
]
CONTEXTUAL_CHUNK_CASES = [(b, n, d, dtype, reduction) for b, n, d, dtypes, reductions in CONTEXTUAL_CHUNKS
                          for dtype in dtypes for reduction in reductions]


@on_target
@pytest.mark.parametrize("batch, tokens, dim, dtype, reduction", CONTEXTUAL_CHUNK_CASES, ids=_id)
def test_contextual_gradient_over_several_chunks(batch, tokens, dim, dtype, reduction):
    """Inputs above one chunk of the CUDA glue (2²⁴ similarities): the forward's precomputed gradient
    (mean, sum) and the backward's recomputation (none) match the CPU kernel and stay deterministic."""
    from kdloss.token_contextual import token_contextual_loss

    gen = torch.Generator().manual_seed(11)
    student = torch.randn(batch, tokens, dim, generator=gen, dtype=torch.float64)
    teacher = torch.randn(batch, tokens, dim + 4, generator=gen, dtype=torch.float64)
    weight = torch.rand((batch, tokens) if reduction == "none" else (), generator=gen, dtype=torch.float64)
    results = []
    for device in ("cpu", TARGET, TARGET):
        s = student.to(device, dtype).requires_grad_()
        out = token_contextual_loss(s, teacher.to(device, dtype), reduction=reduction, backend="kernel")
        (grad,) = torch.autograd.grad(out, s, grad_outputs=weight.to(device, out.dtype))
        results.append((out.detach().cpu().double(), grad.cpu().double()))
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 2e-2)
    for ours, cpu in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, cpu, rtol=tol, atol=tol * float(cpu.abs().max()))
    for again, first in zip(results[2], results[1], strict=True):
        assert torch.equal(again, first)


@on_target
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=_id)
def test_knn_exact_ties_and_duplicates_match_the_definition(dtype):
    """Small-integer coordinates make every distance exact in any summation order: ties (and duplicated
    points) must go to the smaller index on the device exactly as the definition says."""
    from kdloss.token_graph import knn_indices

    gen = torch.Generator().manual_seed(12)
    for m, dim, k in ((40, 3, 5), (700, 6, 9), (1300, 4, 8)):
        x = torch.randint(-2, 3, (m, dim), generator=gen).to(dtype)
        x[m // 3] = x[m // 2]
        x[m - 1] = x[0]
        got = knn_indices(x.to(TARGET), k)
        assert got.device.type == torch.device(TARGET).type
        assert torch.equal(got.cpu(), _brute_force_knn(x, k)), (m, dim, k)


@on_target
def test_knn_random_nodes_match_the_cpu_kernel():
    """Random fp32 nodes: the same neighbour sets on the device as on the CPU (orders may differ only
    where two distances agree to rounding)."""
    from kdloss.token_graph import knn_indices

    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2500, 96, generator=gen)
    got, cpu = knn_indices(x.to(TARGET), 8).cpu(), knn_indices(x, 8)
    assert torch.equal(got.sort(1).values, cpu.sort(1).values)

# ---- token_contrastive (TRG global InfoNCE) --------------------------------------------------------
# The generic tests above cover it through CASES["token_contrastive"] (parity with the CPU kernel and
# the reference in every dtype, layouts, determinism, no host sync in backward). Below: what only a GPU
# can show — the strip-wise kernels never allocate the M × M logits.

ON_CUDA = torch.device(TARGET).type == "cuda" and torch.cuda.is_available()


@on_target
@pytest.mark.skipif(not ON_CUDA, reason="needs the CUDA caching allocator's statistics")
@pytest.mark.parametrize("symmetric", [False, True])
def test_token_contrastive_peak_memory_is_strips_not_m_by_m(symmetric):
    """M = 8192, E = 64: one [M, M] fp32 matrix is 256 MiB; forward + backward into both sides must
    peak far below it (one M × 512 strip is 16 MiB; inputs, copies and gradients 2 MiB each)."""
    from kdloss.functional import token_contrastive_loss

    gen = torch.Generator().manual_seed(0)
    hs, ht = (torch.randn(8192, 64, generator=gen).to(TARGET).requires_grad_() for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = token_contrastive_loss(hs, ht, symmetric=symmetric, backend="kernel")
    grads = torch.autograd.grad(loss, (hs, ht))
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    assert all(torch.isfinite(g).all() for g in grads)
    assert peak_mib < 64, f"peak extra memory {peak_mib:.1f} MiB"
