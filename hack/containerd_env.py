"""Private containerd + fractal snapshotter daemons for tests, benchmarks and the demo.

Why this exists: the integration tests, the benchmarks and ``make run`` all need a containerd
that talks to *our* proxy snapshotter, and they must never touch the machine's own containerd
(``/run/containerd/containerd.sock``, ``/var/lib/containerd``).  Every :class:`FractalEnv` gets

* a short run dir ``/run/fractal-test/<6 hex>/`` for sockets and containerd's state (short
  because unix socket paths are limited to ~106 bytes and shims put sockets under the state dir),
* a root dir on disk ``/var/tmp/fractal-test/<same id>/`` for containerd's root (content store,
  metadata, overlayfs snapshots), the snapshotter's repo and the daemons' log files,

and tears all of it down -- processes, mounts, dirs -- even if a test fails midway.  Teardown is
idempotent, and a later env sweeps up envs whose owning process died without cleaning up
(e.g. pytest killed with SIGKILL).

Only the standard library and ccpu (itself stdlib-only where used here) so it works before pip deps are installed.

Environment variables:
    FRACTAL_KEEP=1        keep the dirs (logs, config, repo) after teardown for debugging;
                          processes are still stopped and mounts still removed.
    FRACTAL_RUN_BASE      base for run dirs (default /run/fractal-test).
    FRACTAL_TMP_BASE      base for root dirs (default /var/tmp/fractal-test).
    FRACTAL_CONTAINERD    containerd binary (default: ``containerd`` on PATH).
    FRACTAL_CTR           ctr binary (default: ``ctr`` on PATH).
    FRACTAL_CONTAINERD_VERSION  ``1`` (default: the distribution's containerd 1.6 on PATH),
                          ``1.7`` or ``2``: containerd 1.7 / 2.x built by hack/peers.sh into
                          ``$FRACTAL_CACHE/peers/containerd-<version>/bin`` (2.x: config
                          ``version = 3``; each with its own ctr and containerd-shim-runc-v2).
                          Same as ``FractalEnv(containerd="1.7")`` / ``FractalEnv(containerd="2")``.

Command line (for humans): ``python3 hack/containerd_env.py shell`` starts an env and prints
how to reach it; ``python3 hack/containerd_env.py sweep`` cleans envs left by dead processes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent

RUN_BASE = Path(os.environ.get("FRACTAL_RUN_BASE", "/run/fractal-test"))
TMP_BASE = Path(os.environ.get("FRACTAL_TMP_BASE", "/var/tmp/fractal-test"))

#: Plugins that slow start-up, need kernel modules / host state, or are simply not ours to use.
#: CRI would also start its own streaming server and CNI handling.
DISABLED_PLUGINS: tuple[str, ...] = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",  # tries to modprobe aufs on the host
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)

#: Name of the proxy snapshotter plugin in containerd's config; ``--snapshotter fractal``.
SNAPSHOTTER_NAME = "fractal"

#: containerd 2.x (config ``version = 3``): plugin ids from ``containerd config default`` of the
#: 2.x binary.  CRI is split into several plugins; NRI (on by default in 2.x) would open
#: /var/run/nri on the host; the image verifier would read /opt/containerd/image-verifier.
DISABLED_PLUGINS_V2: tuple[str, ...] = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
    "io.containerd.podsandbox.controller.v1.podsandbox",
    "io.containerd.nri.v1.nri",
    "io.containerd.image-verifier.v1.bindir",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.differ.v1.erofs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)

CACHE = Path(os.environ.get("FRACTAL_CACHE", "/var/cache/fractal"))
PEERS_SCRIPT = REPO_ROOT / "hack" / "peers.sh"


def peer_bin_dir(name: str) -> Path:
    """``$FRACTAL_CACHE/peers/<name>-<pinned version>/bin`` as hack/peers.sh builds it.

    ``name`` is a peers.sh name: ``containerd2``, ``nerdctl``, ``cri-tools`` (crictl + critest)
    or ``crictl`` (crictl alone, same dir: what the demo needs).  The pinned
    versions live only in peers.sh; ``peers.sh --list`` tells where they go.
    """
    r = subprocess.run(["bash", str(PEERS_SCRIPT), "--list", name], capture_output=True, text=True,
                       env={**os.environ, "FRACTAL_CACHE": str(CACHE)}, timeout=30)
    if r.returncode != 0 or not r.stdout.split():
        raise HarnessError(f"hack/peers.sh --list {name} failed: {r.stderr.strip()}")
    return Path(r.stdout.split()[1])


def peer_missing(name: str) -> str | None:
    """None when hack/peers.sh has built ``name``; else why not (for skip messages)."""
    try:
        d = peer_bin_dir(name)
    except HarnessError as exc:
        return str(exc)
    stamps = [".ok.crictl", ".ok"] if name == "crictl" else [".ok"]  # a full cri-tools build has crictl
    if not any((d.parent / s).is_file() for s in stamps):
        log = d.parent / "log" / "build.log"
        why = f" (build log: {log})" if log.exists() else ""
        return f"{name} not built in {d}: run hack/peers.sh {name}{why}"
    return None


#: containerd versions of the matrix built by hack/peers.sh (the default "1" is the distribution's)
CONTAINERD_PEERS = {"1.7": "containerd17", "2": "containerd2"}


def containerd_version_wanted(containerd: str | None = None) -> str:
    """"1" (1.6 on PATH), "1.7" or "2": the argument, else FRACTAL_CONTAINERD_VERSION, else "1"."""
    v = str(containerd or os.environ.get("FRACTAL_CONTAINERD_VERSION") or "1").strip().lower()
    v = v.removeprefix("v")
    major, _, rest = v.partition(".")
    v = "1.7" if major == "1" and rest.split(".")[0] == "7" else major
    if v not in ("1", "1.7", "2"):
        raise HarnessError(f"unsupported containerd version {v!r} (1, 1.7 or 2)")
    return v


def containerd_config_version(binary: str) -> int:
    """The config version a containerd binary writes natively (``config default``: 2 for 1.x,
    3 for 2.0-2.3, 4 for 2.4+); older versions are migrated with a warning at every start."""
    try:
        out = subprocess.run([binary, "config", "default"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 2
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "version" and value.strip().isdigit():
            return int(value.strip())
    return 2


def containerd_major(binary: str) -> int:
    """Major version of a containerd binary from ``containerd --version`` (1 if unparsable)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1
    for word in out.split():
        w = word.removeprefix("v")
        if w[:1].isdigit() and "." in w:
            return int(w.split(".")[0])
    return 1


def keep_requested() -> bool:
    """True when FRACTAL_KEEP asks to keep the env's dirs for post-mortem debugging."""
    return os.environ.get("FRACTAL_KEEP", "").strip().lower() not in ("", "0", "false", "no")


class HarnessError(RuntimeError):
    """A daemon failed to start or a command of the harness failed."""


class CommandError(HarnessError):
    """A command exited non-zero; the message carries its stdout and stderr so tests show why."""

    def __init__(self, cmd: Sequence[str], returncode: int | None, stdout: str, stderr: str,
                 note: str = "") -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = "timed out" if returncode is None else f"exited {returncode}"
        msg = f"command {what}: {' '.join(self.cmd)}"
        if note:
            msg += f" ({note})"
        msg += f"\n--- stdout ---\n{_clip(stdout)}\n--- stderr ---\n{_clip(stderr)}"
        super().__init__(msg)


def _clip(text: str, limit: int = 4000) -> str:
    text = text or ""
    return text if len(text) <= limit else "...[clipped]...\n" + text[-limit:]


def http_get(host: str, port: int, timeout: float = 20.0) -> str:
    """GET / over a plain socket (no proxies from the environment), retried until the server is
    up; the whole response, headers included."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            return data.decode(errors="replace")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_cmd(cmd: Sequence[str], *, check: bool = True, timeout: float = 120.0,
            input: str | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run a command capturing text output; raise :class:`CommandError` (with output) on failure.

    stdin is /dev/null unless ``input`` is given: ``ctr run`` would otherwise copy our stdin into
    the container and hang waiting for it.
    """
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              input=input, env=env,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise CommandError(cmd, None, out, err, note=f"timeout {timeout}s") from None
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc


def tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log file, for error messages (missing file -> placeholder)."""
    try:
        data = path.read_bytes()[-64 * 1024:]
    except OSError:
        return f"<no log at {path}>"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _set_pdeathsig() -> None:
    """preexec_fn: SIGKILL the daemon when the process that started it dies.

    Keeps a crashed/killed pytest from leaving daemons behind.  Shims are re-parented daemons
    and are not covered; :func:`sweep_stale` and :meth:`FractalEnv.close` deal with them.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort only
        pass


def wait_for_socket(path: Path, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until a unix socket accepts connections (or the process dies / time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"process exited with {proc.returncode} before {path} accepted connections")
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        if time.monotonic() > deadline:
            raise HarnessError(f"{path} did not accept connections within {timeout:.0f}s")
        time.sleep(0.05)


class _Daemon:
    """A long-running child process logging to a file, with stop/kill9/restart.

    Started in its own session so a Ctrl-C in the terminal does not hit it before we stop it in
    order (snapshotter must outlive containerd during teardown).
    """

    name = "daemon"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None

    def command(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _spawn(self, env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} starting: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_set_pdeathsig, env=env)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _fail(self, why: str) -> HarnessError:
        return HarnessError(f"{self.name}: {why}\n--- last lines of {self.log_path} ---\n{tail(self.log_path)}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def kill9(self) -> None:
        """SIGKILL without any chance to clean up: simulates a crash (sockets/mounts stay behind)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def restart(self, timeout: float = 10.0) -> None:
        """stop() then start() with the same dirs and sockets (state must survive)."""
        self.stop(timeout=timeout)
        self.start()


class Snapshotter(_Daemon):
    """The fractal proxy snapshotter: ``python3 -m snapshotter.server --root ROOT --address SOCK``.

    The module form is used (cwd = repo root, repo root on PYTHONPATH) so it works from a clean
    checkout without the console script being installed.
    """

    name = "snapshotter"

    def __init__(self, root: Path, address: Path, log_path: Path, extra_args: Sequence[str] = (),
                 python: str = sys.executable, ready_timeout: float = 30.0) -> None:
        super().__init__(log_path)
        self.root = Path(root)
        self.address = Path(address)
        self.extra_args = list(extra_args)
        self.python = python
        self.ready_timeout = ready_timeout

    def command(self) -> list[str]:
        return [self.python, "-m", "snapshotter.server", "--root", str(self.root),
                "--address", str(self.address), *self.extra_args]

    def start(self) -> None:
        """Start and wait until the socket accepts connections; error includes the log tail."""
        if self.running():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # A socket file left by kill9() must not be mistaken for readiness.
        if self.address.is_socket():
            self.address.unlink()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        t0 = time.monotonic()
        self._spawn(env=env)
        try:
            wait_for_socket(self.address, self.ready_timeout, self.proc)
        except HarnessError as exc:
            self.stop(timeout=2)
            raise self._fail(str(exc)) from None
        self.start_seconds = time.monotonic() - t0


#: CRI plugins of containerd 2.x that FractalEnv(cri=...) enables again (DISABLED_PLUGINS_V2).
CRI_PLUGINS_V2: tuple[str, ...] = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
    "io.containerd.podsandbox.controller.v1.podsandbox",
)

#: Debian's containernetworking-plugins (hack/setup.sh installs it) puts the CNI plugins here.
CNI_PLUGIN_DIR = Path("/usr/lib/cni")


@dataclasses.dataclass
class CriConfig:
    """containerd's CRI plugin, for ``FractalEnv(cri=CriConfig(...))``: config version 2
    (containerd 1.6, one plugin ``io.containerd.grpc.v1.cri``) or 3/4 (containerd 2.x, split into
    ``io.containerd.cri.v1.images``, ``io.containerd.cri.v1.runtime``, ``io.containerd.grpc.v1.cri``
    and the ``podsandbox`` controller).

    Off by default (CRI is in DISABLED_PLUGINS).  When on: images unpack into the fractal
    snapshotter, runtime handler ``fractal`` is ``io.containerd.fractal.v1`` (and the default)
    with ``pod_annotations = ["io.fractal.*"]`` (so pod annotations reach the shim's spec), the
    streaming server listens on 127.0.0.1 with a random port, and ``insecure_registries``
    ("HOST:PORT") are reached over plain HTTP (1.6: ``registry.mirrors``; 2.x: a ``hosts.toml``
    per registry under ``registry_config_dir``, named by ``config_path``).  CRI's own root/state
    dirs live under containerd's root/state (the env's).

    ``network``: None -- the CNI dirs are empty dirs of the env, so only host-network pods work;
    ``"bridge"`` -- CNI bin dir is :data:`CNI_PLUGIN_DIR` and the conf dir gets a conflist
    (``bridge`` with host-local IPAM on ``subnet``, then ``loopback``) with a bridge device
    ``bridge_name`` unique to the env, which :meth:`FractalEnv.close` deletes.
    """

    sandbox_image: str = "registry.k8s.io/pause:3.6"
    insecure_registries: tuple[str, ...] = ()
    runtime_name: str = "fractal"
    runtime_type: str = "io.containerd.fractal.v1"
    pod_annotations: tuple[str, ...] = ("io.fractal.*",)
    #: registry host (e.g. "registry.k8s.io") -> "HOST:PORT" of a plain-HTTP mirror to pull from
    mirrors: dict[str, str] = dataclasses.field(default_factory=dict)
    network: str | None = None
    #: also a ``runc`` handler (io.containerd.runc.v2; on 2.x with the overlayfs snapshotter)
    runc_handler: bool = False
    #: network="bridge" only: also the CNI ``portmap`` plugin (hostPort); it adds iptables
    #: chains (CNI-HOSTPORT-*) to the host's nat table that outlive the env, hence off by default
    portmap: bool = False
    #: filled in by FractalEnv (dirs under the env's root dir; bridge name and subnet per env)
    cni_bin_dir: Path | None = None
    cni_conf_dir: Path | None = None
    registry_config_dir: Path | None = None
    ipam_data_dir: Path | None = None
    bridge_name: str | None = None
    subnet: str | None = None

    def render(self, snapshotter: str, version: int = 2) -> list[str]:
        """TOML lines for containerd's config (``version``: the config version of the file)."""
        return self._render_v2(snapshotter) if version < 3 else self._render_v3(snapshotter)

    def _runtime_lines(self, table: str, per_runtime_snapshotter: str | None) -> list[str]:
        q = _toml_str
        lines = [table + f".containerd.runtimes.{self.runtime_name}]",
                 f"  runtime_type = {q(self.runtime_type)}"]
        if per_runtime_snapshotter:
            lines.append(f"  snapshotter = {q(per_runtime_snapshotter)}")
        lines += ["  pod_annotations = [" + ", ".join(q(a) for a in self.pod_annotations) + "]", ""]
        if self.runc_handler:  # containerd's own runtime next to ours (benchmark baseline)
            lines += [table + ".containerd.runtimes.runc]", '  runtime_type = "io.containerd.runc.v2"',
                      *([f'  snapshotter = "overlayfs"'] if per_runtime_snapshotter else []), ""]
        return lines

    def _render_v2(self, snapshotter: str) -> list[str]:
        q = _toml_str
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        lines = [
            cri + "]",
            f"  sandbox_image = {q(self.sandbox_image)}",
            "  disable_cgroup = false",
            "  disable_apparmor = true",
            # pods ask for oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE, which these
            # VMs' root lacks (runc init: "failed to update /proc/self/oom_score_adj: Permission
            # denied"): clamp to containerd's own value instead.
            "  restrict_oom_score_adj = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "",
            cri + ".containerd]",
            f"  snapshotter = {q(snapshotter)}",
            f"  default_runtime_name = {q(self.runtime_name)}",
            "",
            *self._runtime_lines(cri, None),
        ]
        if self.cni_bin_dir is not None or self.cni_conf_dir is not None:
            lines.append(cri + ".cni]")
            if self.cni_bin_dir is not None:
                lines.append(f"  bin_dir = {q(self.cni_bin_dir)}")
            if self.cni_conf_dir is not None:
                lines.append(f"  conf_dir = {q(self.cni_conf_dir)}")
            lines.append("")
        for reg in self.insecure_registries:
            lines += [cri + f'.registry.mirrors."{reg}"]',
                      f'  endpoint = ["http://{reg}"]', "",
                      cri + f'.registry.configs."{reg}".tls]',
                      "  insecure_skip_verify = true", ""]
        for host, mirror in self.mirrors.items():
            lines += [cri + f'.registry.mirrors."{host}"]',
                      f'  endpoint = ["http://{mirror}"]', ""]
        return lines

    def _render_v3(self, snapshotter: str) -> list[str]:
        """containerd 2.x (internal/cri/config/config.go of v2.4.2; checked with ``config dump``).

        No ``disable_cgroup`` any more; ``sandbox_image`` became ``pinned_images.sandbox`` of the
        images plugin; the CNI bin dir is a list ``bin_dirs``; the registry is configured through
        ``config_path`` (hosts.toml dirs) only; the snapshotter is set in the images plugin (where
        it unpacks) and per runtime.
        """
        q = _toml_str
        img = "[plugins.'io.containerd.cri.v1.images'"
        rt = "[plugins.'io.containerd.cri.v1.runtime'"
        lines = [
            img + "]",
            f"  snapshotter = {q(snapshotter)}",
            "",
            img + ".pinned_images]",
            f"  sandbox = {q(self.sandbox_image)}",
            "",
        ]
        if self.registry_config_dir is not None:
            lines += [img + ".registry]", f"  config_path = {q(self.registry_config_dir)}", ""]
        lines += [
            rt + "]",
            "  disable_apparmor = true",
            "  restrict_oom_score_adj = true",  # see _render_v2
            "",
            rt + ".containerd]",
            f"  default_runtime_name = {q(self.runtime_name)}",
            "",
            *self._runtime_lines(rt, snapshotter),
        ]
        if self.cni_bin_dir is not None or self.cni_conf_dir is not None:
            lines.append(rt + ".cni]")
            if self.cni_bin_dir is not None:
                lines.append(f"  bin_dirs = [{q(self.cni_bin_dir)}]")
            if self.cni_conf_dir is not None:
                lines.append(f"  conf_dir = {q(self.cni_conf_dir)}")
            lines.append("")
        lines += [
            "[plugins.'io.containerd.grpc.v1.cri']",
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "",
        ]
        return lines

    def hosts_toml(self, registry: str, mirror: str | None = None) -> str:
        """containerd 2.x's ``<config_path>/<HOST:PORT>/hosts.toml`` for a plain-HTTP registry
        (or, with ``mirror``, for ``registry`` pulled from the plain-HTTP ``mirror``)."""
        server = f"https://{registry}" if mirror else f"http://{registry}"
        return (f'server = "{server}"\n\n'
                f'[host."http://{mirror or registry}"]\n'
                '  capabilities = ["pull", "resolve"]\n'
                "  skip_verify = true\n")

    def conflist(self) -> dict:
        """The CNI network of ``network="bridge"``: the host is the bridge's gateway (so it
        reaches pod IPs directly), no masquerading, no iptables rules (no portmap/firewall)."""
        return {
            "cniVersion": "1.0.0",
            "name": f"fractal-{self.bridge_name}",
            "plugins": [
                {"type": "bridge", "bridge": self.bridge_name, "isGateway": True, "ipMasq": False,
                 "hairpinMode": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet}]],
                          "dataDir": str(self.ipam_data_dir)}},
                {"type": "loopback"},
                *([{"type": "portmap", "capabilities": {"portMappings": True}}] if self.portmap else []),
            ],
        }

    def write_files(self) -> None:
        """CNI dirs, the conflist (bridge network) and the registries' hosts.toml (2.x)."""
        import json

        for d in (self.cni_bin_dir, self.cni_conf_dir, self.ipam_data_dir):
            if d is not None and d != CNI_PLUGIN_DIR:
                Path(d).mkdir(parents=True, exist_ok=True)
        if self.network == "bridge" and self.cni_conf_dir is not None:
            (Path(self.cni_conf_dir) / "10-fractal.conflist").write_text(json.dumps(self.conflist(), indent=2))
        if self.registry_config_dir is not None:
            hosts = {reg: None for reg in self.insecure_registries} | dict(self.mirrors)
            for reg, mirror in hosts.items():
                d = Path(self.registry_config_dir) / reg
                d.mkdir(parents=True, exist_ok=True)
                (d / "hosts.toml").write_text(self.hosts_toml(reg, mirror))


def free_subnet(seed: str) -> str:
    """A 10.x /24 that no address or route of the host overlaps, picked from ``seed`` (the env id)."""
    import ipaddress

    used: list[ipaddress.IPv4Network] = []
    for cmd in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for word in out.split():
            try:
                net = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > 0:
                used.append(net)
    start = int(seed, 16) if seed and all(c in "0123456789abcdef" for c in seed) else 0
    for i in range(4096):
        n = (start + i) % 4096
        cand = ipaddress.ip_network(f"10.{200 + n // 256 % 50}.{n % 256}.0/24")
        if not any(cand.overlaps(u) for u in used):
            return str(cand)
    raise HarnessError("no free 10.x /24 for the CNI bridge")


def delete_link(name: str) -> None:
    """``ip link del NAME`` if it exists (the env's CNI bridge)."""
    if name and Path(f"/sys/class/net/{name}").exists():
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)


@dataclasses.dataclass
class ContainerdConfig:
    """Everything that goes into the private containerd's config.toml (version = 2)."""

    root: Path
    state: Path
    address: Path
    log_level: str = "info"
    snapshotter_address: Path | None = None
    snapshotter_name: str = SNAPSHOTTER_NAME
    temp: Path | None = None
    opt_path: Path | None = None
    disabled_plugins: tuple[str, ...] = DISABLED_PLUGINS
    #: 2 for containerd 1.x, 3 for containerd 2.x (which also converts 2, but logs a warning
    #: and re-maps plugin ids).
    version: int = 2
    #: containerd 2.x only: snapshotters the transfer service may unpack into (``ctr images pull``
    #: uses the transfer service by default in 2.x and refuses a snapshotter without an
    #: ``unpack_config`` entry for it).
    unpack_snapshotters: tuple[str, ...] = ("overlayfs", "native")
    platform: str = "linux/amd64"
    #: render the CRI plugin's config (and do not disable it)
    cri: CriConfig | None = None

    def render(self) -> str:
        """TOML text.  ttrpc defaults to ``<grpc address>.ttrpc``, which is already private."""
        q = _toml_str
        lines = [
            f"version = {self.version}",
            f"root = {q(self.root)}",
            f"state = {q(self.state)}",
        ]
        if self.temp is not None:
            lines.append(f"temp = {q(self.temp)}")
        disabled = self.disabled_plugins
        if self.cri is not None:
            disabled = tuple(p for p in disabled if p not in CRI_PLUGINS_V2)
        lines.append("disabled_plugins = [" + ", ".join(q(p) for p in disabled) + "]")
        if self.version >= 3:
            lines.append("imports = []  # 2.x's default imports /etc/containerd/conf.d/*.toml")
        if self.version >= 4:
            # containerd 2.4+: the servers are plugins; [grpc]/[ttrpc]/[metrics] are version 3 only
            lines += [
                "",
                "[debug]",
                f"  level = {q(self.log_level)}",
                "",
                "[plugins.'io.containerd.server.v1.grpc']",
                f"  address = {q(self.address)}",
                "",
                "[plugins.'io.containerd.server.v1.ttrpc']",
                f"  address = {q(str(self.address) + '.ttrpc')}",
                "",
                "[plugins.'io.containerd.server.v1.metrics']",
                '  address = ""',
                "",
            ]
        else:
            lines += self._servers_v2()
        return "\n".join(lines + self._plugins())

    def _servers_v2(self) -> list[str]:
        """[grpc] [ttrpc] [debug] [metrics] of config versions 2 and 3."""
        q = _toml_str
        return [
            "",
            "[grpc]",
            f"  address = {q(self.address)}",
            "",
            "[ttrpc]",
            f"  address = {q(str(self.address) + '.ttrpc')}",
            "",
            "[debug]",
            f"  level = {q(self.log_level)}",
            "",
            "[metrics]",
            '  address = ""',
            "",
        ]

    def _plugins(self) -> list[str]:
        q = _toml_str
        lines: list[str] = []
        if self.opt_path is not None:
            # The opt plugin would otherwise create /opt/containerd on the host.
            lines += ['[plugins."io.containerd.internal.v1.opt"]', f"  path = {q(self.opt_path)}", ""]
        if self.version >= 3:
            snaps = list(self.unpack_snapshotters)
            if self.snapshotter_address is not None and self.snapshotter_name not in snaps:
                snaps.append(self.snapshotter_name)
            for snap in snaps:
                lines += ["[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]",
                          f"  platform = {q(self.platform)}",
                          f"  snapshotter = {q(snap)}", ""]
        if self.snapshotter_address is not None:
            lines += [
                f"[proxy_plugins.{self.snapshotter_name}]",
                '  type = "snapshot"',
                f"  address = {q(self.snapshotter_address)}",
                "",
            ]
        if self.cri is not None:
            lines += self.cri.render(self.snapshotter_name, self.version)
        return lines


def _toml_str(value: object) -> str:
    s = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


class PrivateContainerd(_Daemon):
    """``containerd --config FILE`` with its own root, state and sockets; plus a ``ctr`` helper."""

    name = "containerd"

    def __init__(self, config: ContainerdConfig, config_path: Path, log_path: Path,
                 binary: str | None = None, ctr_binary: str | None = None,
                 ready_timeout: float = 30.0, extra_env: dict[str, str] | None = None,
                 path_prepend: Sequence[Path | str] = ()) -> None:
        super().__init__(log_path)
        self.extra_env = dict(extra_env or {})
        #: dirs put first on containerd's PATH (2.x: its own containerd-shim-runc-v2)
        self.path_prepend = [str(p) for p in path_prepend]
        self.config = config
        self.config_path = Path(config_path)
        self.binary = binary or os.environ.get("FRACTAL_CONTAINERD") or "containerd"
        self.ctr_binary = ctr_binary or os.environ.get("FRACTAL_CTR") or "ctr"
        self.ready_timeout = ready_timeout

    @property
    def address(self) -> Path:
        return self.config.address

    def command(self) -> list[str]:
        return [self.binary, "--config", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        """containerd's environment, which its shims inherit.

        This Python's scripts dir goes first on PATH, so containerd finds the
        `containerd-shim-fractal-v1` console script directly rather than through
        a slow version-manager wrapper (pyenv shims); `extra_env` tells the shim
        where this env's fractal repo is (FRACTAL_ROOT).
        """
        env = dict(os.environ)
        scripts = sysconfig.get_path("scripts")
        env["PATH"] = os.pathsep.join([*self.path_prepend, scripts, env.get("PATH", "")])
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        """Write the config, start containerd and wait until ``ctr version`` answers."""
        if self.running():
            return
        for d in (self.config.root, self.config.state, self.config_path.parent):
            Path(d).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config.render())
        if self.address.is_socket():
            self.address.unlink()
        t0 = time.monotonic()
        self._spawn(env=self.environment())
        deadline = t0 + self.ready_timeout
        try:
            wait_for_socket(self.address, self.ready_timeout, self.proc)
            while True:
                r = self.ctr("version", check=False, timeout=10, namespace=None)
                if r.returncode == 0:
                    break
                if not self.running():
                    raise HarnessError(f"exited with {self.proc.returncode if self.proc else '?'}")
                if time.monotonic() > deadline:
                    raise HarnessError(f"`ctr version` still failing after {self.ready_timeout:.0f}s: {r.stderr.strip()}")
                time.sleep(0.05)
        except HarnessError as exc:
            self.stop(timeout=2)
            raise self._fail(str(exc)) from None
        self.start_seconds = time.monotonic() - t0

    def ctr_argv(self, *args: str, namespace: str | None = "default") -> list[str]:
        argv = [self.ctr_binary, "--address", str(self.address)]
        if namespace is not None:
            argv += ["--namespace", namespace]
        return argv + [str(a) for a in args]

    def ctr(self, *args: str, namespace: str | None = "default", check: bool = True,
            timeout: float = 120.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``ctr --address SOCK --namespace NS ARGS...``; raises :class:`CommandError` with output on failure."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER")}
        return run_cmd(self.ctr_argv(*args, namespace=namespace), check=check, timeout=timeout,
                       input=input, env=env)


# ----------------------------------------------------------------------------------------------
# Cleanup primitives: processes and mounts.  All best effort, all idempotent.


def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(*dirs: Path | str) -> list[str]:
    """Mount points at or below any of ``dirs`` (this mount namespace), deepest/newest first."""
    prefixes = [str(Path(d)) for d in dirs if d]
    found: list[tuple[int, int, str]] = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        mp = _unescape_mountinfo(parts[4])
        if any(mp == p or mp.startswith(p + "/") for p in prefixes):
            found.append((mp.count("/"), int(parts[0]), mp))
    found.sort(reverse=True)  # deepest first; among equals, most recently mounted first
    return [mp for _, _, mp in found]


def unmount_all(*dirs: Path | str, attempts: int = 20) -> list[str]:
    """Unmount everything at or below ``dirs``; returns mount points that could not be removed.

    Mounts can be stacked on one mount point, so repeat until none are left.  A busy mount gets
    ``umount -l`` (detached now, freed when its last user goes) rather than failing teardown.
    """
    for _ in range(attempts):
        mps = mounts_under(*dirs)
        if not mps:
            return []
        for mp in mps:
            r = subprocess.run(["umount", mp], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True)
    return mounts_under(*dirs)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline with NULs as spaces) for every readable process."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        table[pid] = (ppid, cmd)
    return table


def _ancestors(pid: int, table: dict[int, tuple[int, str]]) -> set[int]:
    seen: set[int] = set()
    while pid in table and pid not in seen and pid > 1:
        seen.add(pid)
        pid = table[pid][0]
    return seen


def kill_processes_mentioning(*needles: str, exclude: Iterable[int] = ()) -> list[int]:
    """SIGKILL processes whose cmdline mentions any needle, plus all their descendants.

    Used for leftover shims (cmdline has ``-address <our socket>``), their containers (children
    of the shim) and anything else started with our private paths (e.g. QEMU later).  Never
    touches this process or its ancestors.  Returns the pids signalled.
    """
    needles = tuple(n for n in needles if n)
    if not needles:
        return []
    table = _proc_table()
    protected = _ancestors(os.getpid(), table) | set(exclude) | {os.getpid(), 1}
    roots = {pid for pid, (_, cmd) in table.items() if any(n in cmd for n in needles)} - protected
    victims = set(roots)
    changed = True
    while changed:  # add descendants
        changed = False
        for pid, (ppid, _) in table.items():
            if ppid in victims and pid not in victims and pid not in protected:
                victims.add(pid)
                changed = True
    # children first, so a shim cannot restart/reap-and-report in between
    for pid in sorted(victims, key=lambda p: len(_ancestors(p, table)), reverse=True):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in victims):
        time.sleep(0.05)
    return sorted(victims)


#: containerd 1.6 puts every shim socket in /run/containerd/s/ whatever its config says
#: (runtime/v2/shim/util_unix.go: SocketAddress uses defaults.DefaultStateDir).
SHIM_SOCKET_DIR = Path("/run/containerd/s")


def shim_sockets_for(address: Path | str) -> list[Path]:
    """Host paths of the sockets of the running shims started by the containerd at ``address``.

    Our daemons by the one rule of shim/procs.py (however they were started: forked by the
    fork-server, by ``start``, or executed) with the socket they listen on; other shims (runc's)
    by their command line: the name is sha256("<containerd address>/<namespace>/<id>"), so a
    SIGKILLed shim leaves a file we can attribute to our env and delete (it would otherwise pile
    up on the host).
    """
    import hashlib

    from shim import procs

    ours = procs.find(str(address))
    found: list[Path] = [Path(p.socket) for p in ours if p.socket]
    mine = {p.pid for p in ours}
    for pid, (_, cmd) in _proc_table().items():
        argv = cmd.split()
        if pid in mine or not argv or procs.SHIM_BINARY in cmd or str(address) not in argv:
            continue
        if "containerd-shim" not in Path(argv[0]).name:
            continue
        opts = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("-")}
        ns, cid = opts.get("-namespace"), opts.get("-id")
        if ns and cid:
            digest = hashlib.sha256(os.path.join(str(address), ns, cid).encode()).hexdigest()
            found.append(SHIM_SOCKET_DIR / digest)
    return found


def remove_dead_sockets(directory: Path) -> list[Path]:
    """Unlink unix sockets in `directory` that refuse connections (their server is gone)."""
    import socket as _socket
    import stat as _stat

    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        try:
            if not _stat.S_ISSOCK(p.lstat().st_mode):
                continue
        except FileNotFoundError:
            continue
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect(str(p))
        except ConnectionRefusedError:
            p.unlink(missing_ok=True)
            removed.append(p)
        except OSError:
            pass
        finally:
            s.close()
    return removed


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2:].split()[0] != "Z"


def _rmtree(path: Path) -> None:
    """rm -rf that refuses to cross into something still mounted (would delete real data)."""
    if not path.exists():
        return
    if mounts_under(path):
        raise HarnessError(f"refusing to remove {path}: still has mounts {mounts_under(path)}")
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------


OWNER_FILE = "owner"


def _pid_start_time(pid: int) -> str | None:
    """Start time (clock ticks since boot) of a live process; None if gone or a zombie.

    Zombies count as dead: PID 1 on these VMs reaps lazily, so a SIGKILLed owner lingers as Z.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def sweep_stale(run_base: Path = RUN_BASE) -> list[str]:
    """Clean envs whose owning process is gone (SIGKILLed pytest, crashed demo).

    Each run dir holds an ``owner`` file "<pid> <starttime> <root dir>"; if that process no longer
    exists, kill what mentions the env's paths, unmount, and remove its dirs.  Returns the ids swept.
    """
    swept: list[str] = []
    if not run_base.is_dir():
        return swept
    for run_dir in sorted(run_base.iterdir()):
        owner = run_dir / OWNER_FILE
        try:
            pid_s, start, root_s = owner.read_text().split(maxsplit=2)
        except (OSError, ValueError):
            continue
        if _pid_start_time(int(pid_s)) == start:
            continue  # owner alive
        root_dir = Path(root_s.strip())
        shim_socks = shim_sockets_for(run_dir / "containerd.sock")
        kill_processes_mentioning(str(run_dir), str(root_dir))
        for sock in shim_socks:
            sock.unlink(missing_ok=True)
        unmount_all(run_dir, root_dir)
        if not mounts_under(run_dir, root_dir):
            owner.unlink(missing_ok=True)
            _rmtree(run_dir)
            _rmtree(root_dir)
        swept.append(run_dir.name)
    return swept


class FractalEnv:
    """Snapshotter + private containerd, as a context manager.

    ``with FractalEnv() as env: env.pull(ref); env.run(ref, "c1", "echo", "hi")``

    ``snapshotter=False`` runs containerd alone (no proxy plugin configured) -- used to test the
    harness itself with the built-in overlayfs snapshotter.
    """

    def __init__(self, snapshotter: bool = True, snapshotter_args: Sequence[str] = (),
                 log_level: str = "info", keep: bool | None = None,
                 run_base: Path | None = None, tmp_base: Path | None = None,
                 ready_timeout: float = 30.0, sweep: bool = True, containerd: str | None = None,
                 cri: CriConfig | bool | None = None) -> None:
        self.id = secrets.token_hex(3)
        # containerd "1" (PATH / FRACTAL_CONTAINERD), "1.7" or "2" (hack/peers.sh's builds;
        # FRACTAL_CONTAINERD and FRACTAL_CTR still win when set).  See containerd_version_wanted().
        self.containerd_version = containerd_version_wanted(containerd)
        cd_bin = os.environ.get("FRACTAL_CONTAINERD") or None
        ctr_bin = os.environ.get("FRACTAL_CTR") or None
        path_prepend: list[Path] = []
        if self.containerd_version in CONTAINERD_PEERS:
            peer = peer_bin_dir(CONTAINERD_PEERS[self.containerd_version])
            missing = peer_missing(CONTAINERD_PEERS[self.containerd_version])
            if missing and not cd_bin:
                raise HarnessError(missing)
            cd_bin = cd_bin or str(peer / "containerd")
            ctr_bin = ctr_bin or str(peer / "ctr")
            path_prepend.append(Path(cd_bin).parent)
        config_version = (max(3, containerd_config_version(cd_bin or "containerd"))
                          if containerd_major(cd_bin or "containerd") >= 2 else 2)
        self.keep = keep_requested() if keep is None else keep
        self.run_dir = Path(run_base or RUN_BASE) / self.id
        self.root_dir = Path(tmp_base or TMP_BASE) / self.id
        self.log_dir = self.root_dir / "logs"
        self.snapshotter_root = self.root_dir / "snapshotter"
        self.snapshotter_address = self.run_dir / "snap.sock"
        self.address = self.run_dir / "containerd.sock"
        self.runc_root = self.run_dir / "runc"
        self.fifo_dir = self.run_dir / "fifo"
        self.fractal_run_dir = self.run_dir / "fractal"  # shims' sandbox records, runc state
        self.fractal_config = self.root_dir / "fractal.toml"  # the shim's FRACTAL_CONFIG
        self._sweep = sweep
        self._closed = False
        self._namespaces: set[str] = set()
        #: CRI plugin config (containerd 1.6 or 2.x); None = CRI disabled as before
        self.cri: CriConfig | None = None
        if cri:
            self.cri = dataclasses.replace(cri) if isinstance(cri, CriConfig) else CriConfig()
            if self.cri.network not in (None, "bridge"):
                raise HarnessError(f"CriConfig.network: None or 'bridge', not {self.cri.network!r}")
            bridge = self.cri.network == "bridge"
            self.cri.cni_bin_dir = self.cri.cni_bin_dir or (
                CNI_PLUGIN_DIR if bridge else self.root_dir / "cni" / "bin")
            self.cri.cni_conf_dir = self.cri.cni_conf_dir or self.root_dir / "cni" / "net.d"
            if bridge:
                self.cri.bridge_name = self.cri.bridge_name or f"fcni{self.id}"  # <= 15 chars
                self.cri.subnet = self.cri.subnet or free_subnet(self.id)
                self.cri.ipam_data_dir = self.cri.ipam_data_dir or self.root_dir / "cni" / "ipam"
            if config_version >= 3 and (self.cri.insecure_registries or self.cri.mirrors):
                self.cri.registry_config_dir = self.cri.registry_config_dir or self.root_dir / "certs.d"
        self.snapshotter: Snapshotter | None = None
        if snapshotter:
            self.snapshotter = Snapshotter(self.snapshotter_root, self.snapshotter_address,
                                           self.log_dir / "snapshotter.log", extra_args=snapshotter_args,
                                           ready_timeout=ready_timeout)
        self.containerd = PrivateContainerd(
            ContainerdConfig(
                root=self.root_dir / "containerd",
                state=self.run_dir / "st",
                address=self.address,
                log_level=log_level,
                snapshotter_address=self.snapshotter_address if snapshotter else None,
                temp=self.root_dir / "tmp",
                opt_path=self.root_dir / "opt",
                version=config_version,
                disabled_plugins=DISABLED_PLUGINS_V2 if config_version >= 3 else DISABLED_PLUGINS,
                cri=self.cri,
            ),
            config_path=self.root_dir / "containerd.toml",
            log_path=self.log_dir / "containerd.log",
            binary=cd_bin, ctr_binary=ctr_bin, path_prepend=path_prepend,
            ready_timeout=ready_timeout,
            extra_env={"FRACTAL_RUN_DIR": str(self.fractal_run_dir),
                       # host mode unless a test asks for a VM (io.fractal.mode=vm): fast
                       "FRACTAL_CONFIG": str(self.fractal_config),
                       **({"FRACTAL_ROOT": str(self.snapshotter_root)} if snapshotter else {})},
        )
        self.start_seconds: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "FractalEnv":
        """Create the dirs and start snapshotter then containerd; on failure tear down and re-raise."""
        if self._sweep:
            try:
                sweep_stale(self.run_dir.parent)
            except Exception as exc:  # noqa: BLE001 - a failed sweep must not block a new env
                print(f"fractal env: sweep of stale envs failed: {exc}", file=sys.stderr)
        t0 = time.monotonic()
        for d in (self.run_dir, self.root_dir, self.log_dir, self.root_dir / "tmp", self.runc_root,
                  self.fifo_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.cri is not None:
            self.cri.write_files()
        os.chmod(self.run_dir, 0o711)
        me = os.getpid()
        (self.run_dir / OWNER_FILE).write_text(f"{me} {_pid_start_time(me)} {self.root_dir}\n")
        # host mode, and test pods may pick their mode/sandbox by annotation (tests asking
        # for a VM set io.fractal.mode=vm; tests/security/ checks the default pod policy)
        self.fractal_config.write_text('mode = "host"  # written by hack/containerd_env.py\n'
                                       'allowed_annotations = [".*"]\n')
        try:
            if self.snapshotter is not None:
                self.snapshotter.start()
            self.containerd.start()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def __enter__(self) -> "FractalEnv":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop everything and remove all traces; safe to call repeatedly and after partial start.

        Order matters: containers/shims first (they hold rootfs mounts), then containerd, then the
        snapshotter (containerd may still call it while shutting down), then mounts, then dirs.
        """
        errors: list[str] = []

        def step(what: str, fn, *a, **kw) -> None:  # noqa: ANN001
            try:
                fn(*a, **kw)
            except Exception as exc:  # noqa: BLE001 - keep cleaning whatever happens
                errors.append(f"{what}: {exc}")

        if self.containerd.running() and self.cri is not None:
            # CRI pods left behind (a failed test, critest) hold network namespaces in
            # /var/run/netns (and IPs): only stopping them through CRI runs CNI DEL and removes them
            step("remove CRI pods", self._remove_cri_pods)
        if self.containerd.running():
            # Let shims end their containers properly (unmount rootfs, runc delete, cgroups);
            # everything else in containerd's metadata is deleted with its root dir anyway.
            step("stop tasks", self._stop_all_tasks)
        shim_socks: list[Path] = []
        step("find shims", lambda: shim_socks.extend(shim_sockets_for(self.address)))
        step("stop containerd", self.containerd.stop, 10)
        step("kill shims", kill_processes_mentioning, str(self.run_dir), str(self.root_dir),
             exclude=[p for p in (self.snapshotter.pid if self.snapshotter else None,) if p])
        for sock in shim_socks:
            step(f"remove {sock}", sock.unlink, missing_ok=True)
        # A forked shim daemon keeps `start`'s command line, so not every socket can be
        # attributed above: remove the ones nobody listens on any more (dead, whoever made them).
        step("remove dead shim sockets", remove_dead_sockets, SHIM_SOCKET_DIR)
        if self.snapshotter is not None:
            step("stop snapshotter", self.snapshotter.stop, 10)
        # Anything else still mentioning our paths (e.g. a hung ctr, a VM) goes too.
        step("kill leftovers", kill_processes_mentioning, str(self.run_dir), str(self.root_dir))
        for ns in sorted(self._namespaces):
            step(f"cgroups of {ns}", remove_namespace_traces, ns)
        if self.cri is not None and self.cri.bridge_name:
            step(f"delete bridge {self.cri.bridge_name}", delete_link, self.cri.bridge_name)
            # libcni's result cache (/var/lib/cni/results/<net>-<id>-<if>, deleted by CNI DEL)
            # is not configurable through CRI: remove the dirs only if they are empty now
            for d in (Path("/var/lib/cni/results"), Path("/var/lib/cni")):
                step(f"rmdir {d}", lambda d=d: d.rmdir() if d.is_dir() and not any(d.iterdir()) else None)
        left: list[str] = []
        try:
            left = unmount_all(self.run_dir, self.root_dir)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"unmount: {exc}")
        if left:
            errors.append(f"mounts still present: {left}")
        elif self.keep:
            if not self._closed:
                print(f"FRACTAL_KEEP: kept {self.root_dir} (logs, config, repo) and {self.run_dir}",
                      file=sys.stderr)
            (self.run_dir / OWNER_FILE).unlink(missing_ok=True)
        else:
            (self.run_dir / OWNER_FILE).unlink(missing_ok=True)
            step("remove run dir", _rmtree, self.run_dir)
            step("remove root dir", _rmtree, self.root_dir)
        self._closed = True
        if errors:
            raise HarnessError("FractalEnv cleanup problems:\n  " + "\n  ".join(errors))

    def restart_snapshotter(self, kill: bool = False, timeout: float = 15.0) -> float:
        """Restart the snapshotter (SIGKILL first if ``kill``) and wait until containerd reaches it.

        Why not just ``env.snapshotter.restart()``: containerd's proxy client (1.6,
        services/server/server.go) redials with gRPC backoff capped at 3 s and fails calls fast
        meanwhile, so the first ``ctr`` after a restart gets "connection refused".  Returns the
        seconds until containerd could use the snapshotter again.
        """
        if self.snapshotter is None:
            raise HarnessError("this FractalEnv runs without the fractal snapshotter")
        t0 = time.monotonic()
        if kill:
            self.snapshotter.kill9()
        else:
            self.snapshotter.stop()
        self.snapshotter.start()
        self.wait_snapshotter_reachable(timeout)
        return time.monotonic() - t0

    def wait_snapshotter_reachable(self, timeout: float = 15.0) -> None:
        """Poll until a call through containerd reaches the snapshotter backend.

        A Prepare is the one call sure to reach the backend whatever containerd caches, so the probe Prepares (and then
        removes) an empty snapshot in the private namespace ``fractal-harness``; containerd's GC
        removes it from the backend shortly after.
        """
        ns = "fractal-harness"
        key = f"probe-{secrets.token_hex(4)}"
        deadline = time.monotonic() + timeout
        while True:
            r = self.containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER_NAME, "prepare", key,
                                    namespace=ns, check=False, timeout=10)
            if r.returncode == 0:
                self.containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER_NAME, "rm", key,
                                    namespace=ns, check=False, timeout=10)
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"containerd cannot reach the snapshotter after {timeout:.0f}s: "
                                   f"{r.stderr.strip()}\n--- last lines of {self.snapshotter.log_path if self.snapshotter else ''} ---\n"
                                   f"{tail(self.snapshotter.log_path) if self.snapshotter else ''}")
            time.sleep(0.2)

    def _remove_cri_pods(self) -> None:
        """``crictl stopp`` + ``rmp`` every pod sandbox (best effort; needs hack/peers.sh's crictl)."""
        if peer_missing("cri-tools"):
            return
        sock = f"unix://{self.address}"
        base = [str(peer_bin_dir("cri-tools") / "crictl"), "--config", "/dev/null", "--runtime-endpoint", sock,
                "--image-endpoint", sock, "--timeout", "30s"]
        env = {k: v for k, v in os.environ.items()
               if k not in ("CONTAINER_RUNTIME_ENDPOINT", "IMAGE_SERVICE_ENDPOINT", "CRI_CONFIG_FILE")}
        pods = run_cmd([*base, "pods", "-q"], check=False, timeout=60, env=env).stdout.split()
        for pod in pods:
            run_cmd([*base, "stopp", pod], check=False, timeout=60, env=env)
            run_cmd([*base, "rmp", "-f", pod], check=False, timeout=60, env=env)

    def _stop_all_tasks(self) -> None:
        """Best effort (a hung call only warns): the SIGKILL sweep after it catches the rest."""
        try:
            r = self.containerd.ctr("namespaces", "ls", "-q", namespace=None, check=False, timeout=10)
            for ns in r.stdout.split():
                self._namespaces.add(ns)
                tasks = self.containerd.ctr("tasks", "ls", namespace=ns, check=False, timeout=10)
                for task in _task_ids(tasks):
                    self.containerd.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns,
                                        check=False, timeout=10)
                    self.containerd.ctr("tasks", "delete", "-f", task, namespace=ns, check=False, timeout=10)
        except CommandError as exc:
            print(f"fractal env {self.id}: stopping tasks: {exc}", file=sys.stderr)

    # -- helpers ---------------------------------------------------------------------------

    @property
    def snapshotters(self) -> list[str]:
        """Snapshotter names usable in this env."""
        return ["overlayfs", "native"] + ([SNAPSHOTTER_NAME] if self.snapshotter is not None else [])

    def ctr(self, *args: str, namespace: str | None = "default", check: bool = True,
            timeout: float = 120.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """See :meth:`PrivateContainerd.ctr`; also remembers namespaces for teardown."""
        if namespace is not None and namespace != "default":
            self._namespaces.add(namespace)
        return self.containerd.ctr(*args, namespace=namespace, check=check, timeout=timeout, input=input)

    def new_namespace(self, prefix: str = "t") -> str:
        """A fresh, unique, short containerd namespace name (removed again at teardown)."""
        ns = f"{prefix}{secrets.token_hex(3)}"
        self._namespaces.add(ns)
        return ns

    def pull(self, ref: str, namespace: str = "default", snapshotter: str = SNAPSHOTTER_NAME,
             timeout: float = 300.0, extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """``ctr images pull --plain-http --snapshotter S REF`` (unpacks for that snapshotter only)."""
        return self.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, *extra, ref,
                        namespace=namespace, timeout=timeout)

    def run(self, image: str, cid: str, *cmd: str, snapshotter: str = SNAPSHOTTER_NAME, rm: bool = True,
            namespace: str = "default", extra: Sequence[str] = (), runtime: str | None = None,
            check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``ctr run [--rm] --snapshotter S [extra] IMAGE CID CMD...``.

        IO fifos (``--fifo-dir``) and, with the default runc runtime, runc's state
        (``--runc-root``) go to this env's run dir instead of the host's /run/containerd.
        """
        argv = ["run"]
        if rm:
            argv.append("--rm")
        argv += ["--snapshotter", snapshotter]
        argv += ["--fifo-dir", str(self.fifo_dir)]  # ctr's default is the host's /run/containerd/fifo
        if runtime is None:
            argv += ["--runc-root", str(self.runc_root)]
        else:
            argv += ["--runtime", runtime]
        argv += [*extra, image, cid, *cmd]
        return self.ctr(*argv, namespace=namespace, check=check, timeout=timeout)

    def remove_namespace(self, ns: str) -> list[str]:
        """Delete everything in ``ns`` and the namespace itself; returns problems (never raises).

        tasks -> containers (with their snapshots) -> images -> leases -> leftover content and
        snapshots (children first) -> namespace.  containerd refuses to delete a non-empty
        namespace, and its GC is asynchronous, so the last steps retry for a while.
        """
        problems: list[str] = []

        def c(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str] | None:
            try:
                return self.containerd.ctr(*args, namespace=ns, check=False, timeout=timeout)
            except CommandError as exc:
                problems.append(str(exc))
                return None

        def names(*args: str) -> list[str]:
            r = c(*args)
            return r.stdout.split() if r is not None and r.returncode == 0 else []

        for task in _task_ids(c("tasks", "ls")):
            c("tasks", "kill", "-s", "SIGKILL", task)
            c("tasks", "delete", "-f", task)
        for cont in names("containers", "ls", "-q"):
            c("containers", "rm", cont)
        imgs = names("images", "ls", "-q")
        if imgs:
            c("images", "rm", "--sync", *imgs, timeout=60)
        for lease in names("leases", "ls", "-q"):
            c("leases", "rm", "--sync", lease)
        attempts = 20
        for attempt in range(attempts):
            for snap in self.snapshotters:
                _remove_snapshots(c, snap)
            blobs = names("content", "ls", "-q")
            if blobs:
                c("content", "rm", *blobs)
            r = c("namespaces", "rm", ns)
            if r is not None and r.returncode == 0:
                break
            listed = names("namespaces", "ls", "-q")  # namespace=ns is ignored by ns ls
            if ns not in listed:
                break
            if attempt == attempts - 1:
                problems.append(f"namespace {ns} not removed: {r.stderr.strip() if r else '?'}")
            time.sleep(0.2)
        remove_namespace_traces(ns)
        self._namespaces.discard(ns)
        return problems

    def repo_size(self) -> int:
        """Bytes used by the snapshotter's root (the layer repo), counting hard links once."""
        return dir_size(self.snapshotter_root)


def _task_ids(r: subprocess.CompletedProcess[str] | None) -> list[str]:
    if r is None or r.returncode != 0:
        return []
    return [line.split()[0] for line in r.stdout.splitlines()[1:] if line.strip()]


def _remove_snapshots(c, snapshotter: str) -> None:  # noqa: ANN001
    """Remove all snapshots of one snapshotter in a namespace, children before parents."""
    r = c("snapshots", "--snapshotter", snapshotter, "ls")
    if r is None or r.returncode != 0:
        return
    rows = [line.split() for line in r.stdout.splitlines()[1:] if line.strip()]
    # columns: KEY PARENT KIND; PARENT may be empty -> 2 columns
    parent_of = {row[0]: (row[1] if len(row) == 3 else "") for row in rows}
    for _ in range(len(parent_of) + 1):
        if not parent_of:
            break
        parents = set(parent_of.values())
        leaves = [k for k in parent_of if k not in parents]
        if not leaves:
            break
        for k in leaves:
            c("snapshots", "--snapshotter", snapshotter, "rm", k)
            parent_of.pop(k, None)


def remove_namespace_traces(ns: str) -> None:
    """rmdir the empty per-namespace dirs containerd 1.6 leaves on the host.

    ``ctr run`` creates cgroups ``/<ns>/<id>`` in every hierarchy and removes only ``<id>``; a
    plain ``ctr run`` (without our ``--runc-root``) leaves ``/run/containerd/runc/<ns>``.  Only
    empty dirs are removed, and "default" (shared with a host containerd) is never touched.
    """
    if not ns or ns == "default" or "/" in ns or ns.startswith("."):
        return
    try:
        (Path("/run/containerd/runc") / ns).rmdir()
    except OSError:
        pass
    base = Path("/sys/fs/cgroup")
    candidates = [base / ns, base / "unified" / ns]
    try:
        candidates += [d / ns for d in base.iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        pass
    for top in candidates:
        if not top.is_dir():
            continue
        subdirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*subdirs, top]:
            try:
                d.rmdir()
            except OSError:
                pass


def dir_size(path: Path) -> int:
    """Disk usage in bytes on allocated blocks, hard links counted once (the repo's own measure)."""
    from ccpu.repo.fsutil import disk_usage

    return disk_usage(path).size


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sh = sub.add_parser("shell", help="start an env, print how to use it, wait for Ctrl-C")
    sh.add_argument("--no-snapshotter", action="store_true")
    sh.add_argument("--debug", action="store_true", help="containerd debug log + snapshotter --debug")
    sub.add_parser("sweep", help="clean envs whose owner process is gone")
    args = ap.parse_args(argv)
    if args.cmd == "sweep":
        print("swept:", " ".join(sweep_stale()) or "nothing")
        return 0
    env = FractalEnv(snapshotter=not args.no_snapshotter,
                     snapshotter_args=["--debug"] if args.debug else (),
                     log_level="debug" if args.debug else "info")
    with env:
        print(f"env {env.id} up in {env.start_seconds:.2f}s")
        print(f"  ctr --address {env.address} ...")
        print(f"  logs: {env.log_dir}")
        print("Ctrl-C to stop")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
