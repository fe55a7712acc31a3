"""Shared pytest set-up: hypothesis profiles and a single CPU thread.

Profiles: ``ci`` (default, modest), ``dev`` (fast) and ``thorough``; pick one with
``HYPOTHESIS_PROFILE=thorough pytest``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tiny float64 shapes: threads only add overhead on shared CI cores.
torch.set_num_threads(1)


@pytest.fixture
def clean_accelerate():
    """Accelerate keeps process-wide singletons (mixed precision, ...): a test using the
    Trainer or an Accelerator starts and ends with them reset."""
    from integration_models import reset_accelerate_state

    reset_accelerate_state()
    yield
    reset_accelerate_state()
