"""Whoever sets annotations -> the shim daemon (issue 10, item 7): values that made Python raise
something other than the config's own error.  ``io.fractal.vm.memory=1e400M`` is an infinite
float, ``int()`` of it raised OverflowError, which the daemon did not catch: it died before
serving, and containerd saw a shim that vanished.  Now: a clean FailedPrecondition naming the
annotation, and no shim left behind.  (The harness's config allows every annotation and runs in
host mode, so no VM is involved.)
"""

from __future__ import annotations

import time

import pytest

from hack.containerd_env import CommandError, FractalEnv
from tests.integration.test_shim import RUNTIME, image, shim_pids  # noqa: F401


@pytest.mark.parametrize("annotation", ["io.fractal.vm.memory=1e400M", "io.fractal.vm.memory=infG",
                                        "io.fractal.vm.cpus=" + "9" * 5000])
def test_overflowing_value_is_a_clean_error(fenv: FractalEnv, namespace: str, image: str,  # noqa: F811
                                            annotation: str) -> None:
    with pytest.raises(CommandError) as exc:
        fenv.run(image, "overflow", "true", namespace=namespace, runtime=RUNTIME,
                 extra=("--annotation", annotation), timeout=60)
    out = str(exc.value)
    name = annotation.split("=", 1)[0]
    assert f"annotation {name}" in out and "failed precondition" in out, out
    assert len(out) < 20_000, "the hostile value is echoed whole"
    fenv.ctr("container", "rm", "overflow", namespace=namespace, check=False)
    deadline = time.monotonic() + 15
    while shim_pids(fenv) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert shim_pids(fenv) == []
