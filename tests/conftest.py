"""Put the repo root on sys.path so tests can import ``hack`` (and the packages) from a clean checkout."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# The containerd/registry fixtures and the integration marker (tests/integration, tests/security).
pytest_plugins = ["tests.harness"]

# Hypothesis: no per-example deadline and no "too slow" health check.  Both are timing assertions
# (200 ms per example by default): on a loaded 2-core CI machine test_agent_wire's round trips
# took 615 ms and failed although every property held.  Speed is measured in hack/bench, never here.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("fractal", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("fractal")
