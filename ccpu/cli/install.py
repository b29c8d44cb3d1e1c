"""`fractal install`: wire fractal into a containerd (config drop-in, CRI runtime handler,
systemd unit for the snapshotter, the shim on containerd's PATH).

Pure rendering/merging functions first (unit-tested), then a thin layer that touches files.

Why two places in containerd's config (docs/install.md):

* The proxy snapshotter goes into a **drop-in** (``conf.d/fractal.toml``) named by an
  ``imports`` entry of the main config.  containerd merges ``proxy_plugins`` per name, so the
  drop-in adds ``fractal`` without touching anything else.
* The **CRI runtime handler** cannot go into the drop-in: containerd 1.6 replaces a whole
  ``[plugins."<id>"]`` section with the imported one (``containerd config dump`` shows the
  user's ``sandbox_image``, ``runtimes.runc`` ... gone).  So the handler is *appended* to the
  main config as a marked block (a new table at the end of a TOML file never changes the tables
  before it).

Every rewrite of the main config is textual (insert one ``imports`` line, append one block),
then re-parsed with tomllib and checked to contain everything the original had; otherwise
nothing is written.  The original is kept once as ``config.toml.fractal-bak``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..defaults import DEFAULT_ROOT, DEFAULT_SNAPSHOTTER_ADDRESS, SNAPSHOTTER_NAME

FRACTAL_RUNTIME_TYPE = "io.containerd.fractal.v1"
SHIM_BINARY = "containerd-shim-fractal-v1"
SNAPSHOTTER_BINARY = "fractal-snapshotter"
UNIT_NAME = "fractal-snapshotter.service"
DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
DEFAULT_SYSTEMD_DIR = "/etc/systemd/system"
DEFAULT_BIN_DIR = "/usr/local/bin"
BACKUP_SUFFIX = ".fractal-bak"
BLOCK_BEGIN = "# >>> fractal: CRI runtime handler (written by `fractal install`)"
BLOCK_END = "# <<< fractal"

#: pod annotations CRI passes through to the shim (docs/config.md, docs/cri.md)
POD_ANNOTATIONS = ("io.fractal.*",)

CRI_V1 = "io.containerd.grpc.v1.cri"  # containerd 1.x, config version 2
CRI_V2 = "io.containerd.cri.v1.runtime"  # containerd 2.x, config version 3


class InstallError(Exception):
    """Something in the target config prevents a safe install; the message says what to do."""


# ------------------------------------------------------------------------------------------
# containerd version


def parse_containerd_version(text: str) -> tuple[int, int] | None:
    """``containerd github.com/containerd/containerd 1.6.20~ds1 ...`` -> (1, 6)."""
    m = re.search(r"\bv?(\d+)\.(\d+)\.\d+", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def containerd_version(binary: str = "containerd") -> tuple[tuple[int, int] | None, str]:
    """((major, minor) or None, the raw line or why it failed)."""
    path = shutil.which(binary)
    if path is None:
        return None, f"{binary} not found on PATH"
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{path} --version: {e}"
    line = (r.stdout or r.stderr).strip()
    return parse_containerd_version(line), line


def config_version_for(major: int) -> int:
    return 3 if major >= 2 else 2


# ------------------------------------------------------------------------------------------
# rendering (pure)


def _q(value: object) -> str:
    s = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def render_dropin(address: str, major: int = 1, name: str = SNAPSHOTTER_NAME) -> str:
    """The drop-in: the proxy snapshotter (merged per name by containerd's imports)."""
    return (
        "# fractal: the proxy snapshotter (written by `fractal install`; see docs/install.md)\n"
        f"version = {config_version_for(major)}\n\n"
        f"[proxy_plugins.{name}]\n"
        '  type = "snapshot"\n'
        f"  address = {_q(address)}\n"
    )


def runtime_table(major: int, handler: str) -> str:
    if major >= 2:
        return f"plugins.'{CRI_V2}'.containerd.runtimes.{handler}"
    return f'plugins."{CRI_V1}".containerd.runtimes.{handler}'


def render_runtime_block(major: int = 1, handler: str = "fractal", snapshotter: str = SNAPSHOTTER_NAME) -> str:
    """The CRI runtime handler (Kubernetes RuntimeClass ``handler: fractal``), as a marked block.

    containerd 1.6 has no per-runtime snapshotter (1.7+ does), so there the CRI snapshotter
    stays the global ``containerd.snapshotter`` setting; 2.x gets ``snapshotter = "fractal"``.
    """
    lines = [BLOCK_BEGIN, f"[{runtime_table(major, handler)}]", f"  runtime_type = {_q(FRACTAL_RUNTIME_TYPE)}"]
    if major >= 2:
        lines.append(f"  snapshotter = {_q(snapshotter)}")
    # CRI copies only the pod annotations listed here into the sandbox's and containers' OCI
    # specs: without it `io.fractal.mode` etc. set on a Kubernetes pod never reach the shim.
    lines.append("  pod_annotations = [" + ", ".join(_q(a) for a in POD_ANNOTATIONS) + "]")
    lines.append(BLOCK_END)
    return "\n".join(lines) + "\n"


def render_unit(exec_path: str, root: str, address: str) -> str:
    """systemd unit for the snapshotter; it must be up before containerd dials it."""
    return (
        "[Unit]\n"
        "Description=fractal snapshotter (containerd proxy snapshotter over the fractal layer repo)\n"
        "Documentation=https://github.com/fractal/fractal/blob/main/docs/install.md\n"
        "After=local-fs.target\n"
        "Before=containerd.service\n\n"
        "[Service]\n"
        f"ExecStart={exec_path} --root {root} --address {address}\n"
        "Restart=always\n"
        "RestartSec=1\n"
        "KillMode=process\n"
        "LimitNOFILE=1048576\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target containerd.service\n"
    )


# ------------------------------------------------------------------------------------------
# merging into the main config (pure: text in, text out)


def _contains(big: object, small: object) -> bool:
    """Every key/value of ``small`` is in ``big`` (lists: ``big`` may have more items in front)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _contains(big[k], v) for k, v in small.items())
    if isinstance(small, list) and isinstance(big, list):
        return all(item in big for item in small)
    return big == small


def import_covers(imports: list[str], dropin: str, config_dir: str) -> bool:
    """Whether an existing imports entry (a path or glob, relative to the config's dir) names ``dropin``."""
    for entry in imports:
        pat = entry if os.path.isabs(entry) else os.path.join(config_dir, entry)
        if pat == dropin or fnmatch.fnmatch(dropin, pat):
            return True
    return False


_TABLE_RE = re.compile(r"^\s*\[")
_IMPORTS_RE = re.compile(r"^(\s*imports\s*=\s*)\[")
_VERSION_RE = re.compile(r"^\s*version\s*=")


def add_import(text: str, dropin: str, config_dir: str) -> str:
    """``text`` with ``dropin`` in its top-level ``imports``; unchanged if already covered."""
    data = tomllib.loads(text)
    imports = data.get("imports", [])
    if not isinstance(imports, list):
        raise InstallError("`imports` in the containerd config is not a list; add "
                           f"{_q(dropin)} to it by hand")
    if import_covers(imports, dropin, config_dir):
        return text
    lines = text.splitlines(keepends=True)
    out: list[str] | None = None
    top_end = next((i for i, ln in enumerate(lines) if _TABLE_RE.match(ln)), len(lines))
    if "imports" in data:
        for i in range(top_end):
            m = _IMPORTS_RE.match(lines[i])
            if m:
                ln = lines[i]
                lines[i] = ln[:m.end()] + _q(dropin) + ", " + ln[m.end():]
                out = lines
                break
        if out is None:
            raise InstallError("could not find the `imports = [` line in the containerd config; "
                               f"add {_q(dropin)} to imports by hand")
    else:
        at = next((i + 1 for i in range(top_end) if _VERSION_RE.match(lines[i])), 0)
        if at and not lines[at - 1].endswith("\n"):
            lines[at - 1] += "\n"
        lines.insert(at, f"imports = [{_q(dropin)}]  # fractal install\n")
        out = lines
    new = "".join(out)
    _check_preserved(text, new, lambda d: dropin in d.get("imports", []))
    return new


def add_runtime_block(text: str, block: str, major: int, handler: str) -> str:
    """``text`` with the CRI runtime handler appended; unchanged if that handler exists already."""
    data = tomllib.loads(text)
    node: object = data
    for key in runtime_path(major, handler):
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        if node.get("runtime_type") not in (None, FRACTAL_RUNTIME_TYPE):
            raise InstallError(f"the containerd config already has runtime handler {handler!r} with "
                               f"runtime_type {node.get('runtime_type')!r}; pick another --runtime-handler")
        return text
    sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    new = text + sep + block

    def has_handler(d: dict) -> bool:
        n: object = d
        for key in runtime_path(major, handler):
            n = n.get(key) if isinstance(n, dict) else None
        return isinstance(n, dict) and n.get("runtime_type") == FRACTAL_RUNTIME_TYPE

    _check_preserved(text, new, has_handler)
    return new


def runtime_path(major: int, handler: str) -> list[str]:
    plugin = CRI_V2 if major >= 2 else CRI_V1
    return ["plugins", plugin, "containerd", "runtimes", handler]


def _check_preserved(old: str, new: str, added) -> None:  # noqa: ANN001
    try:
        new_data = tomllib.loads(new)
    except tomllib.TOMLDecodeError as e:
        raise InstallError(f"the edited containerd config would not parse ({e}); nothing written. "
                           "Add the lines from `fractal install --print` by hand") from None
    if not _contains(new_data, tomllib.loads(old)) or not added(new_data):
        raise InstallError("editing the containerd config would change existing settings; nothing "
                           "written. Add the lines from `fractal install --print` by hand")


def new_main_config(major: int, dropin: str) -> str:
    return f"version = {config_version_for(major)}\nimports = [{_q(dropin)}]  # fractal install\n"


# ------------------------------------------------------------------------------------------
# planning and applying


@dataclass
class Options:
    containerd_config: str = DEFAULT_CONTAINERD_CONFIG
    root: str = DEFAULT_ROOT
    address: str = DEFAULT_SNAPSHOTTER_ADDRESS
    runtime_handler: str = "fractal"
    systemd: bool = False
    systemd_dir: str = DEFAULT_SYSTEMD_DIR
    bin_dir: str = DEFAULT_BIN_DIR
    containerd_binary: str = "containerd"
    major: int | None = None  # containerd major version; None = detect


@dataclass
class FileChange:
    path: str
    content: str | None  # None: a symlink (target in link_to)
    what: str
    link_to: str | None = None
    backup: bool = False
    mode: int = 0o644


@dataclass
class Plan:
    major: int
    version_line: str
    changes: list[FileChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def console_script(name: str) -> str:
    """Absolute path of one of fractal's console scripts (this interpreter's, not a pyenv shim)."""
    cand = Path(sysconfig.get_path("scripts")) / name
    if cand.exists():
        return str(cand)
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found:
        return found
    raise InstallError(f"{name} is not installed; run `pip install .` (or hack/setup.sh) in the fractal checkout")


def dropin_path(config: str) -> str:
    return str(Path(config).resolve().parent / "conf.d" / "fractal.toml")


def plan(opts: Options) -> Plan:
    if opts.major is not None:
        major, line = opts.major, f"containerd {opts.major}.x (given)"
    else:
        ver, line = containerd_version(opts.containerd_binary)
        if ver is None:
            raise InstallError(f"cannot tell containerd's version ({line}); install containerd 1.6+ first")
        major = ver[0]
    p = Plan(major=major, version_line=line)
    config = str(Path(opts.containerd_config).resolve())
    dropin = dropin_path(config)
    p.changes.append(FileChange(dropin, render_dropin(opts.address, major), "containerd drop-in (proxy snapshotter)"))
    block = render_runtime_block(major, opts.runtime_handler)
    if os.path.exists(config):
        text = Path(config).read_text()
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InstallError(f"{config} is not valid TOML ({e}); fix it first") from None
        version = tomllib.loads(text).get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int):
            raise InstallError(f"{config}: `version` must be a number (2, or 3 for containerd "
                               f"2.x), not {version!r}; containerd itself cannot read this file")
        if version < 2:
            raise InstallError(f"{config} has config version {version}; fractal needs version 2 "
                               "(`containerd config migrate` converts it)")
        new = add_import(text, dropin, str(Path(config).parent))
        new = add_runtime_block(new, block, major, opts.runtime_handler)
        p.changes.append(FileChange(config, new, "containerd config (imports entry, CRI runtime handler)",
                                    backup=True))
    else:
        p.changes.append(FileChange(config, new_main_config(major, dropin) + "\n" + block,
                                    "containerd config (new)"))
    shim = console_script(SHIM_BINARY)
    p.changes.append(FileChange(str(Path(opts.bin_dir) / SHIM_BINARY), None,
                                "shim on containerd's PATH", link_to=shim))
    if opts.systemd:
        p.changes.append(FileChange(str(Path(opts.systemd_dir) / UNIT_NAME),
                                    render_unit(console_script(SNAPSHOTTER_BINARY), opts.root, opts.address),
                                    "systemd unit for the snapshotter"))
    return p


def render_print(opts: Options, major: int | None) -> str:
    """Everything install would write, as text (no file is read or written except the version probe)."""
    out: list[str] = []
    majors = [major] if major is not None else [1, 2]
    for m in majors:
        label = "containerd 1.x (config version 2)" if m < 2 else "containerd 2.x (config version 3)"
        if major is None:
            out.append(f"# ===== {label}: containerd's version could not be detected =====\n")
        out.append(f"# --- {dropin_path(opts.containerd_config)}  ({label}) ---\n")
        out.append(render_dropin(opts.address, m))
        out.append(f"\n# --- appended to {opts.containerd_config}, plus "
                   f"imports = [{_q(dropin_path(opts.containerd_config))}] at its top ---\n")
        out.append(render_runtime_block(m, opts.runtime_handler))
        out.append("\n")
    try:
        snap = console_script(SNAPSHOTTER_BINARY)
    except InstallError:
        snap = f"/usr/local/bin/{SNAPSHOTTER_BINARY}"
    out.append(f"# --- {Path(opts.systemd_dir) / UNIT_NAME} (with --systemd) ---\n")
    out.append(render_unit(snap, opts.root, opts.address))
    try:
        shim = console_script(SHIM_BINARY)
    except InstallError:
        shim = "(not installed)"
    out.append(f"\n# --- symlink {Path(opts.bin_dir) / SHIM_BINARY} -> {shim} ---\n")
    return "".join(out)


def _current(change: FileChange) -> bool:
    """Whether the file is already what the change wants."""
    path = Path(change.path)
    if change.link_to is not None:
        return path.is_symlink() and os.readlink(path) == change.link_to
    try:
        return path.read_text() == change.content
    except OSError:
        return False


def apply(p: Plan) -> list[tuple[str, FileChange]]:
    """Write what differs; returns (status, change) with status created|updated|unchanged."""
    done: list[tuple[str, FileChange]] = []
    for ch in p.changes:
        path = Path(ch.path)
        if _current(ch):
            done.append(("unchanged", ch))
            continue
        existed = path.exists() or path.is_symlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        if ch.link_to is not None:
            if existed and not path.is_symlink():
                raise InstallError(f"{path} exists and is not a symlink; remove it or use --bin-dir")
            tmp = path.with_name(f".{path.name}.fractal-tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(ch.link_to, tmp)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        else:
            st = os.stat(path) if existed else None
            if ch.backup and st is not None:
                bak = path.with_name(path.name + BACKUP_SUFFIX)
                if not bak.exists():
                    write_file(bak, path.read_bytes(), st)
            write_file(path, (ch.content or "").encode(), st, ch.mode)
        done.append(("updated" if existed else "created", ch))
    return done


def write_file(path: Path, data: bytes, like: os.stat_result | None, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably, never exposing the content wider
    than the file it replaces (containerd's config may hold registry credentials).

    The temp file is created by ``mkstemp`` (O_EXCL, mode 0600, a random name: nothing planted
    at a guessable name is followed), given the old file's mode and owner (``like``; else
    ``mode``) before any content is written, fsynced, renamed over ``path``, and the directory
    fsynced so the rename survives a crash."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".fractal-tmp", dir=path.parent)
    try:
        if like is not None:
            if os.geteuid() == 0:
                os.fchown(fd, like.st_uid, like.st_gid)
            os.fchmod(fd, like.st_mode & 0o7777)
        else:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def next_steps(p: Plan, opts: Options, done: list[tuple[str, FileChange]]) -> list[str]:
    changed = any(s != "unchanged" for s, _ in done)
    steps = []
    if opts.systemd:
        steps.append("systemctl daemon-reload && systemctl enable --now fractal-snapshotter.service")
    else:
        steps.append(f"start the snapshotter before containerd: {SNAPSHOTTER_BINARY} --root {opts.root} "
                     f"--address {opts.address}  (or rerun with --systemd)")
    if changed:
        steps.append("systemctl restart containerd   # containerd reads its config only at start")
    steps.append("fractal doctor   # checks all of it")
    return steps


# ------------------------------------------------------------------------------------------
# CLI


def cmd_install(args) -> int:  # noqa: ANN001
    opts = Options(containerd_config=args.containerd_config, root=args.root, address=args.address,
                   runtime_handler=args.runtime_handler, systemd=args.systemd, systemd_dir=args.systemd_dir,
                   bin_dir=args.bin_dir, containerd_binary=args.containerd, major=args.containerd_major)
    try:
        if args.print:
            major = opts.major
            if major is None:
                ver, _ = containerd_version(opts.containerd_binary)
                major = ver[0] if ver else None
            sys.stdout.write(render_print(opts, major))
            return 0
        p = plan(opts)
        done = apply(p)
    except (InstallError, OSError) as e:
        print(f"fractal install: {e}", file=sys.stderr)
        return 1
    print(f"target: {p.version_line}")
    for status, ch in done:
        extra = f" -> {ch.link_to}" if ch.link_to else ""
        print(f"  {status:<9} {ch.path}{extra}  ({ch.what})")
        if status == "updated" and ch.backup:
            print(f"            original kept as {ch.path}{BACKUP_SUFFIX}")
    if all(s == "unchanged" for s, _ in done):
        print("nothing to do: everything was already installed")
    print("next:")
    for s in next_steps(p, opts, done):
        print(f"  {s}")
    return 0


def register(p) -> None:  # noqa: ANN001
    p.add_argument("--print", action="store_true", help="print everything install would write, write nothing")
    p.add_argument("--containerd-config", default=DEFAULT_CONTAINERD_CONFIG,
                   help="containerd's main config (default %(default)s)")
    p.add_argument("--root", default=os.environ.get("FRACTAL_ROOT", DEFAULT_ROOT),
                   help="the snapshotter's repo dir (default %(default)s)")
    p.add_argument("--address", default=os.environ.get("FRACTAL_SNAPSHOTTER_ADDRESS", DEFAULT_SNAPSHOTTER_ADDRESS),
                   help="snapshotter socket (default %(default)s)")
    p.add_argument("--runtime-handler", default="fractal", help="CRI runtime handler name (default %(default)s)")
    p.add_argument("--systemd", action="store_true", help=f"also write {UNIT_NAME}")
    p.add_argument("--systemd-dir", default=DEFAULT_SYSTEMD_DIR, help="where the unit goes (default %(default)s)")
    p.add_argument("--bin-dir", default=DEFAULT_BIN_DIR,
                   help=f"where the {SHIM_BINARY} symlink goes, on containerd's PATH (default %(default)s)")
    p.add_argument("--containerd", default="containerd", help="containerd binary whose version decides the config form")
    p.add_argument("--containerd-major", type=int, choices=(1, 2), default=None,
                   help="skip version detection: 1 (config version 2) or 2 (config version 3)")
    p.set_defaults(func=cmd_install)
