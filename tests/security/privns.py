"""Run a scenario module in a private mount namespace (``unshare -m --propagation slave``) and
return the JSON object it prints last: attack tests that could detach or create mounts must not
be able to damage the machine running the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.harness import REPO


def run(module: str, *args: str, timeout: float = 900) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(["unshare", "-m", "--propagation", "slave", "--", sys.executable, "-m", module, *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{module} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def in_private_mount_ns() -> bool:
    """For the scenario: ours differs from our parent's (the test that ran unshare ... THIS)."""
    return os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{os.getppid()}/ns/mnt")
