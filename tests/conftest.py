"""Shared pytest configuration: hypothesis profiles and device parametrisation.

Profiles: "ci" (default; small example budget so the suite stays fast on 2 cores) and "fuzz"
(long runs: ``HYPOTHESIS_PROFILE=fuzz pytest``).
"""

import os

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



@pytest.fixture(params=DEVICES)
def device(request):
    """Every device with kdloss kernels on this machine (CPU always; CUDA when a GPU exists)."""
    return torch.device(request.param)
