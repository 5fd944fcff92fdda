"""Shared test setup: hypothesis profiles, deterministic seeds, warning filters.

Hypothesis profiles (select with HYPOTHESIS_PROFILE=name):
    default   100 examples per property, what CI runs
    ci        like default, derandomized so a CI run is reproducible (set by .ci/run)
    thorough  500 examples per property, for a long local run after touching the engine
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    print_blob=True,  # a failure prints the line that reproduces it
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("default", max_examples=100, **_COMMON)
settings.register_profile("ci", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
    # Eager flex_attention warns on every new shape that it is unfused; the eager path is what the
    # CPU tests exercise on purpose.
    config.addinivalue_line("filterwarnings", "ignore:flex_attention called without torch.compile:UserWarning")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module (small models on 2 cores: threads only add contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def unpatch_everything():
    """Every test ends with no patched model, so registrations can be checked exactly."""
    import gc

    import raas_flex
    from raas_flex import hf

    yield
    for model in list(hf._PATCHED):
        raas_flex.unpatch(model)
    gc.collect()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
