"""Put the repo root on sys.path so tests can import ``hack`` (and the packages) from a clean checkout."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# The containerd/registry fixtures and the integration marker (tests/integration, tests/security).
pytest_plugins = ["tests.harness"]
