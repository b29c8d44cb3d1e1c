"""`fractal collect`: one tar.gz with what a bug report needs (like kata-collect-data).

Versions, the fractal and containerd configs (secrets redacted), `fractal doctor`, recent logs
(snapshotter, the shims' records in containerd's log, guest console tails), the sandbox
records, `fractal ps --json` and `fractal metrics`.

Two rules shape it:

* **It never fails as a whole because one part is missing**: each part is collected on its
  own; a part that fails (no journalctl, containerd down, no such file) is written as
  ``<part>.error`` and listed in ``manifest.json`` with its reason, and the rest goes on.
* **Bounded**: every part is cut at ``MAX_PART`` bytes (logs keep their end, other parts their
  start, with a marker saying how much went), at most ``MAX_CONSOLES`` guest consoles.

Secrets: config files lose the values of keys naming auth, password, token or secret (and
every key of a table so named, e.g. containerd's ``registry.configs."x".auth``); every other
text part loses ``key=value`` / ``"key": "value"`` values of such keys.  `redact_toml` and
`redact_text` are pure and unit-tested.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

MAX_PART = 2 << 20
MAX_CONSOLE = 256 << 10
MAX_CONSOLES = 32
LOG_LINES = 5000
COMMAND_TIMEOUT = 60.0
RUNTIME = "io.containerd.fractal.v1"
SENSITIVE = re.compile(r"auth|passw(or)?d|token|secret", re.I)
REDACTED = "<redacted>"


# ------------------------------------------------------------------------------------------
# redaction (pure)


def _sensitive(key: str) -> bool:
    return bool(SENSITIVE.search(key.strip().strip("\"'")))


_TABLE = re.compile(r"^\s*\[\[?(?P<name>[^\]]*)\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"^(?P<lead>\s*)(?P<key>(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.\-\"' ]+?))\s*=\s*(?P<value>.*)$")


def _table_parts(name: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(r"\"[^\"]*\"|'[^']*'|[^.]+", name)]


def redact_toml(text: str) -> str:
    """A TOML document with the values of sensitive keys (and of every key under a sensitive
    table) replaced by ``"<redacted>"``; multi-line string values are dropped whole."""
    out: list[str] = []
    table_sensitive = False
    skipping: str | None = None  # the closing quotes of a multi-line value being dropped
    for line in text.splitlines():
        if skipping:
            if skipping in line:
                skipping = None
            continue
        m = _TABLE.match(line)
        if m:
            table_sensitive = any(_sensitive(p) for p in _table_parts(m.group("name")))
            out.append(line)
            continue
        a = _ASSIGN.match(line)
        if a and not line.lstrip().startswith("#"):
            key_parts = _table_parts(a.group("key"))
            if table_sensitive or any(_sensitive(p) for p in key_parts):
                value = a.group("value").lstrip()
                for q in ('"""', "'''"):
                    if value.startswith(q) and value.count(q) < 2:
                        skipping = q
                out.append(f'{a.group("lead")}{a.group("key").strip()} = "{REDACTED}"')
                continue
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


_KV = re.compile(r"(?P<key>\b[\w.\-]*(?:auth|passw(?:or)?d|token|secret)[\w.\-]*)(?P<sep>=|:\s*)"
                 r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s,;}\]]+)", re.I)
_JSON_KV = re.compile(r"(?P<key>\"[\w.\-]*(?:auth|passw(?:or)?d|token|secret)[\w.\-]*\")(?P<sep>\s*:\s*)"
                      r"(?P<value>\"(?:[^\"\\]|\\.)*\")", re.I)


def redact_text(text: str) -> str:
    """Logs and command output: ``password=x``, ``token: x``, ``"auth": "x"`` lose their values."""
    text = _JSON_KV.sub(lambda m: f'{m.group("key")}{m.group("sep")}"{REDACTED}"', text)
    return _KV.sub(lambda m: f'{m.group("key")}{m.group("sep")}{REDACTED}'
                   if not m.group("value").startswith(f'"{REDACTED}') else m.group(0), text)


def bound(data: bytes, limit: int, keep_end: bool) -> tuple[bytes, bool]:
    """``data`` cut to ``limit`` bytes (its end for logs, its start otherwise), with a marker."""
    if len(data) <= limit:
        return data, False
    cut = len(data) - limit
    if keep_end:
        return f"[... {cut} earlier bytes cut]\n".encode() + data[-limit:], True
    return data[:limit] + f"\n[... {cut} more bytes cut]\n".encode(), True


# ------------------------------------------------------------------------------------------
# parts


class PartError(Exception):
    """This part cannot be had; the message says why (recorded, the bundle goes on)."""


@dataclass
class PartResult:
    name: str
    ok: bool
    bytes: int = 0
    truncated: bool = False
    seconds: float = 0.0
    error: str | None = None


def run(argv: list[str], timeout: float = COMMAND_TIMEOUT, env: dict[str, str] | None = None,
        ok_codes: tuple[int, ...] | None = (0,)) -> str:
    """A command's stdout (+ its stderr after it); PartError when it is missing, hangs or fails."""
    if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
        raise PartError(f"{argv[0]} not found on PATH")
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired:
        raise PartError(f"{' '.join(argv[:3])} did not finish within {timeout:.0f}s") from None
    except OSError as e:
        raise PartError(f"{argv[0]}: {e.strerror or e}") from None
    if ok_codes is not None and r.returncode not in ok_codes:
        raise PartError(f"{' '.join(argv[:4])} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout + (f"\n--- stderr ---\n{r.stderr}" if r.stderr.strip() else "")


def fractal_cli(*args: str, env: dict[str, str] | None = None, ok_codes: tuple[int, ...] | None = (0,)) -> str:
    """Another `fractal` command, in its own process (its failure or hang stays its own)."""
    return run([sys.executable, "-m", "ccpu.cli", *args], env=env, ok_codes=ok_codes)


def versions() -> str:
    from . import version

    lines = [f"fractal: {version()}", f"python: {sys.version.split()[0]} ({sys.executable})",
             f"kernel: {platform.uname().release} {platform.uname().version} {platform.machine()}"]
    try:
        lines.append("os: " + next(ln.split("=", 1)[1].strip().strip('"') for ln in
                                   Path("/etc/os-release").read_text().splitlines() if ln.startswith("PRETTY_NAME=")))
    except (OSError, StopIteration):
        lines.append("os: unknown (/etc/os-release)")
    for name, argv in (("containerd", ["containerd", "--version"]), ("runc", ["runc", "--version"]),
                       ("qemu", ["qemu-system-x86_64" if platform.machine() == "x86_64" else
                                 "qemu-system-aarch64", "--version"]),
                       ("ctr", ["ctr", "--version"]), ("virtiofsd", ["virtiofsd", "--version"])):
        try:
            lines.append(f"{name}: {run(argv, timeout=15).strip().splitlines()[0]}")
        except (PartError, IndexError) as e:
            lines.append(f"{name}: unknown ({e})")
    return "\n".join(lines) + "\n"


def config_file(path: Path) -> str:
    try:
        return redact_toml(path.read_text(errors="replace"))
    except FileNotFoundError:
        raise PartError(f"{path}: no such file") from None
    except OSError as e:
        raise PartError(f"{path}: {e.strerror}") from None


def journal(unit: str, grep: str | None = None, lines: int = LOG_LINES) -> str:
    argv = ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "short-iso"]
    if grep:
        argv += ["--grep", grep]
    text = run(argv, timeout=30, ok_codes=(0, 1))  # 1: no entries match
    if not text.strip() or text.startswith("-- No entries --"):
        raise PartError(f"no journal entries for unit {unit}" + (f" matching {grep}" if grep else ""))
    return text


def log_file(path: Path, grep: str | None = None) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8 * MAX_PART))
            data = f.read()
    except OSError as e:
        raise PartError(f"{path}: {e.strerror}") from None
    if grep:
        data = b"".join(ln for ln in data.splitlines(keepends=True) if grep.encode() in ln)
    return data


def sandbox_records() -> str:
    from .. import sandboxes

    base = sandboxes.run_dir() / "sandboxes"
    if not base.is_dir():
        raise PartError(f"no sandbox records under {base} (no fractal sandbox ran, or $FRACTAL_RUN_DIR differs)")
    out = {}
    for ns in sorted(p.name for p in base.iterdir() if p.is_dir()):
        out[ns] = {g: {**r.as_dict(), "alive": r.alive} for g, r in sandboxes.read_all(ns).items()}
    return json.dumps(out, indent=2) + "\n"


def record_namespaces() -> list[str]:
    from .. import sandboxes

    base = sandboxes.run_dir() / "sandboxes"
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def consoles() -> list[Path]:
    from .. import sandboxes

    found = sorted((sandboxes.run_dir() / "vms").glob("*/*/console.log"), key=lambda p: p.stat().st_mtime,
                   reverse=True)
    return found[:MAX_CONSOLES]


# ------------------------------------------------------------------------------------------
# the bundle


@dataclass
class Part:
    name: str  # path inside the bundle
    produce: Callable[[], str | bytes]
    is_log: bool = False
    limit: int = MAX_PART
    redact: bool = True


def parts(args: argparse.Namespace) -> list[Part]:
    from .. import sandboxes

    cli_env = {**os.environ}
    ca = ["-a", args.address] if args.address else []
    fractal_config = Path(args.config or os.environ.get("FRACTAL_CONFIG") or "/etc/fractal/config.toml")
    out = [
        Part("versions.txt", versions),
        Part("config/fractal.toml", lambda: config_file(fractal_config), redact=False),
        Part("config/containerd.toml", lambda: config_file(Path(args.containerd_config)), redact=False),
    ]
    dropins = Path(args.containerd_config).parent / "conf.d"
    if dropins.is_dir():
        for f in sorted(dropins.glob("*.toml"))[:16]:
            out.append(Part(f"config/containerd.conf.d/{f.name}", lambda f=f: config_file(f), redact=False))
    out += [
        Part("doctor.txt", lambda: fractal_cli("doctor", *ca, env=cli_env, ok_codes=None)),
        Part("sandboxes.json", sandbox_records),
        Part("metrics.txt", lambda: fractal_cli("metrics", env=cli_env)),
    ]
    for ns in sorted({args.namespace or "default", *record_namespaces()}):
        out.append(Part(f"ps/{ns}.json", lambda ns=ns: fractal_cli("ps", "--json", *ca, "-n", ns, env=cli_env)))
    if args.snapshotter_log:
        out.append(Part("logs/snapshotter.log", lambda: log_file(Path(args.snapshotter_log)), is_log=True))
    else:
        out.append(Part("logs/snapshotter.log", lambda: journal("fractal-snapshotter"), is_log=True))
    if args.containerd_log:
        out.append(Part("logs/shims.log", lambda: log_file(Path(args.containerd_log), f"runtime={RUNTIME}"),
                        is_log=True))
    else:
        out.append(Part("logs/shims.log", lambda: journal("containerd", grep=f"runtime={RUNTIME}"), is_log=True))
    try:
        found = consoles()
    except OSError:
        found = []
    vms = sandboxes.run_dir() / "vms"
    for c in found:
        rel = c.relative_to(vms).parent
        out.append(Part(f"logs/vms/{rel}/console.log", lambda c=c: log_file(c), is_log=True, limit=MAX_CONSOLE))
    return out


def collect(parts_: list[Part], out: Path, top: str) -> list[PartResult]:
    """Write the bundle; each part's failure is its own (``<name>.error``), never the bundle's."""
    results: list[PartResult] = []
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))

        for part in parts_:
            t0 = time.monotonic()
            try:
                value = part.produce()
                data = value.encode("utf-8", "replace") if isinstance(value, str) else value
                if part.redact:
                    data = redact_text(data.decode("utf-8", "replace")).encode()
                data, cut = bound(data, part.limit, keep_end=part.is_log)
                add(part.name, data)
                results.append(PartResult(part.name, True, len(data), cut, round(time.monotonic() - t0, 3)))
            except Exception as e:  # noqa: BLE001 - one part's failure is recorded, the bundle goes on
                why = str(e) if isinstance(e, PartError) else f"{type(e).__name__}: {e}"
                why = redact_text(why)
                add(part.name + ".error", (why + "\n").encode())
                results.append(PartResult(part.name, False, seconds=round(time.monotonic() - t0, 3), error=why))
        manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
                    "command": "fractal collect", "parts": [asdict(r) for r in results]}
        add("manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    os.chmod(tmp, 0o600)
    os.replace(tmp, out)
    return results


def cmd_collect(args: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    top = f"fractal-collect-{socket.gethostname()}-{stamp}"
    out = Path(args.output or f"{top}.tar.gz")
    results = collect(parts(args), out, top)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"fractal collect: {r.name}: {r.error}", file=sys.stderr)
    if args.json:
        from .common import print_json

        print_json({"bundle": str(out), "parts": [asdict(r) for r in results]})
    else:
        print(f"wrote {out} ({len(results) - len(failed)} parts, {len(failed)} missing: see manifest.json)")
    return 0


def register(p: argparse.ArgumentParser) -> None:
    from .common import add_containerd_flags, add_json_flag

    p.add_argument("-o", "--output", default=None, help="bundle path (default ./fractal-collect-HOST-TIME.tar.gz)")
    add_containerd_flags(p)
    p.add_argument("--config", default=None, help="fractal config file (default $FRACTAL_CONFIG or /etc/fractal/config.toml)")
    p.add_argument("--containerd-config", default="/etc/containerd/config.toml",
                   help="containerd's config (default %(default)s; its conf.d/*.toml too)")
    p.add_argument("--snapshotter-log", default=None,
                   help="the snapshotter's stderr log file (default: journalctl -u fractal-snapshotter)")
    p.add_argument("--containerd-log", default=None,
                   help="containerd's log file, for the shims' records (default: journalctl -u containerd)")
    add_json_flag(p, "print the bundle's path and its parts as JSON")
    p.set_defaults(func=cmd_collect)
