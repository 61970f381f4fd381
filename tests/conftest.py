"""Shared pytest configuration: hypothesis profiles and device parametrisation.

Profiles: "ci" (default; small example budget so the suite stays fast on 2 cores) and "fuzz"
(long runs: ``HYPOTHESIS_PROFILE=fuzz pytest``).
"""

import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

from helpers import DEVICES

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "fuzz", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# torch.compile's on-disk caches key a graph by its code, not by the fakes of the custom ops it calls:
# a cache written against another checkout's op contracts could be replayed here (docs/building.md).
# Subprocesses (examples, DDP workers) inherit the directory.
if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdloss-tests-inductor-")


def _is_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    if isinstance(value, (tuple, list)):
        return any(_is_cuda(v) for v in value)
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test parametrised with a CUDA device (the ``device`` fixture, or a parameter such as
    ``"cuda"``) gets the ``cuda`` mark, so ``pytest -m cuda`` runs all CUDA tests of every loss."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(_is_cuda(v) for v in callspec.params.values()):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device with kdloss kernels on this machine (CPU always; CUDA when a GPU exists)."""
    return torch.device(request.param)
