"""crictl against a private containerd, and a pod sandbox made through it: the one CRI pod set-up
the CRI tests share (test_cri, test_cri_vm, test_install_matrix).

A `CriPod` is made with ``crictl runp``, gets containers with `CriPod.container`, and is taken
down in order by `CriPod.remove` (stop + rm every container, then stopp + rmp); used as a
context manager it force-removes whatever a failed test left (``rm -f``, ``stopp``, ``rmp -f``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from hack.containerd_env import FractalEnv, peer_bin_dir, run_cmd

#: CRI's NamespaceMode NODE: the pod shares the host's network namespace (no CNI involved).
NODE_NETWORK = 2


class Crictl:
    """``crictl`` (built by hack/peers.sh) talking to ``env``'s containerd only: its own config
    file under ``home``, and none of the caller's CRI endpoint variables."""

    def __init__(self, env: FractalEnv, home: Path) -> None:
        self.binary = str(peer_bin_dir("cri-tools") / "crictl")
        sock = f"unix://{env.address}"
        cfg = home / "crictl.yaml"
        cfg.write_text(f"runtime-endpoint: {sock}\nimage-endpoint: {sock}\ntimeout: 60\n")
        self.base = [self.binary, "--config", str(cfg), "--runtime-endpoint", sock, "--image-endpoint", sock]
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("CONTAINER_RUNTIME_ENDPOINT", "IMAGE_SERVICE_ENDPOINT", "CRI_CONFIG_FILE")}

    def __call__(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run_cmd([*self.base, *args], check=check, timeout=timeout, env=self.env)


class CriPod:
    """One pod sandbox on runtime handler ``runtime`` (``crictl runp``), its config in
    ``tmp/<name>.json``.

    ``host_network``: NODE network (no netns, no CNI); otherwise the pod gets its own network
    namespace from CNI.  ``mode`` goes into the ``io.fractal.mode`` annotation when given;
    ``hostname`` into the pod config; ``log_dir`` (default ``tmp``) is CRI's log directory.
    """

    def __init__(self, crictl: Crictl, tmp: Path, name: str, *, host_network: bool, mode: str | None = None,
                 hostname: str | None = None, log_dir: Path | None = None, runtime: str = "fractal",
                 timeout: float = 300) -> None:
        self.crictl, self.tmp, self.timeout = crictl, tmp, timeout
        cfg: dict[str, Any] = {"metadata": {"name": name, "namespace": "default", "uid": f"{name}-uid", "attempt": 0},
                               "log_directory": str(log_dir or tmp)}
        if mode is not None:
            cfg["annotations"] = {"io.fractal.mode": mode}
        if host_network:
            cfg["linux"] = {"security_context": {"namespace_options": {"network": NODE_NETWORK}}}
        if hostname is not None:
            cfg["hostname"] = hostname
        self.json = tmp / f"{name}.json"
        self.json.write_text(json.dumps(cfg))
        self.id = crictl("runp", "--runtime", runtime, str(self.json), timeout=timeout).stdout.strip()
        self.cids: list[str] = []

    def __enter__(self) -> "CriPod":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def container(self, name: str, image: str, cmd: list[str]) -> str:
        """Create and start a container ``name`` (logs to ``<name>.log`` in the pod's log dir)."""
        cfg = self.tmp / f"{name}.ctr.json"
        cfg.write_text(json.dumps({"metadata": {"name": name}, "image": {"image": image},
                                   "command": cmd, "log_path": f"{name}.log"}))
        cid = self.crictl("create", self.id, str(cfg), str(self.json), timeout=self.timeout).stdout.strip()
        self.cids.append(cid)
        self.crictl("start", cid, timeout=self.timeout)
        return cid

    def remove_containers(self) -> None:
        for cid in self.cids:
            self.crictl("stop", "-t", "2", cid, timeout=self.timeout)
            self.crictl("rm", cid, timeout=60)
        self.cids.clear()

    def remove(self) -> None:
        """The orderly way down: containers stopped and removed, then ``stopp`` and ``rmp``."""
        self.remove_containers()
        self.crictl("stopp", self.id, timeout=self.timeout)
        self.crictl("rmp", self.id, timeout=self.timeout)
        self.id = ""

    def cleanup(self) -> None:
        """Force-remove whatever `remove` did not get to (after a failure); no errors raised."""
        for cid in self.cids:
            self.crictl("rm", "-f", cid, check=False)
        self.cids.clear()
        if self.id:
            self.crictl("stopp", self.id, check=False)
            self.crictl("rmp", "-f", self.id, check=False)
            self.id = ""
