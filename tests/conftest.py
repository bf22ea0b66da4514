"""Test configuration: 8 fake CPU devices (set before jax initialises), hypothesis profiles, hardware markers, and
the measured-longest cases of ``tests/slow_cases.txt`` marked ``slow``."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_TRACEBACK_FILTERING", "off")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


SLOW_CASES = frozenset(line.strip() for line in (pathlib.Path(__file__).parent / "slow_cases.txt").read_text().splitlines()
                       if line.strip() and not line.startswith("#"))


@pytest.hookimpl(tryfirst=True)  # before the -m selection deselects by marker
def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  for item in items:
    if item.nodeid in SLOW_CASES:
      item.add_marker(pytest.mark.slow)
    # markers only: item.keywords would also match parameter ids that merely contain "gpu" / "tpu"
    if item.get_closest_marker("gpu") and backend != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a GPU"))
    if item.get_closest_marker("tpu") and backend != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
