"""`fractal install`: wire fractal into a containerd (config drop-in, CRI runtime handler and
snapshotter, the 2.x transfer service's unpack entry, the repo root in fractal's own config,
systemd unit for the snapshotter, the shim on containerd's PATH), and keep a record of it all
for `fractal uninstall` (ccpu/cli/uninstall.py).

Pure planning first (unit-tested), then a thin layer that touches files.

Why two places in containerd's config (docs/install.md):

* The proxy snapshotter goes into a **drop-in** (``conf.d/fractal.toml``) named by an
  ``imports`` entry of the main config.  containerd merges ``proxy_plugins`` per name, so the
  drop-in adds ``fractal`` without touching anything else.
* Everything under ``[plugins...]`` (the CRI handler, 1.6's CRI snapshotter, 2.x's
  ``unpack_config``) cannot go into the drop-in: containerd 1.6 replaces a whole
  ``[plugins."<id>"]`` section with the imported one (``containerd config dump`` shows the
  user's ``sandbox_image``, ``runtimes.runc`` ... gone).  So those are edits of the main config
  (ccpu/cli/containerd_toml.py: marked, re-parsed and checked before anything is written).

What each containerd version needs is ccpu/cli/wiring.py.  The originals of replaced files are
kept as ``<file>.fractal-bak`` and listed, with everything created, in the install record
(ccpu/cli/install_record.py).
"""

from __future__ import annotations

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
from . import containerd_toml as ct
from . import install_record as rec
from . import launcher
from .fractal_config import DEFAULT_FRACTAL_CONFIG, FractalConfigError, with_root
from .wiring import (FRACTAL_RUNTIME_TYPE, GLOBAL_NOTE, TRANSFER, Target, config_version_for,
                     default_platform, global_snapshotter, handler_items, unpack_entries)

SHIM_BINARY = "containerd-shim-fractal-v1"
CLI_BINARY = "fractal"
SNAPSHOTTER_BINARY = "fractal-snapshotter"
UNIT_NAME = "fractal-snapshotter.service"
POOL_UNIT_NAME = "fractal-pool.service"
DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
DEFAULT_SYSTEMD_DIR = "/etc/systemd/system"
DEFAULT_BIN_DIR = "/usr/local/bin"
BACKUP_SUFFIX = rec.BACKUP_SUFFIX


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


def parse_version_option(text: str) -> tuple[int, int]:
    """``--containerd-version``: ``1.6``, ``1.7``, ``2`` or ``2.1`` -> (major, minor)."""
    m = re.fullmatch(r"v?(\d+)(?:\.(\d+))?(?:\.\d+)?", text.strip())
    if not m:
        raise ValueError(f"not a containerd version: {text!r} (e.g. 1.6, 1.7, 2.0)")
    major, minor = int(m.group(1)), int(m.group(2) or 0)
    if (major, minor) < (1, 6):
        raise ValueError(f"containerd {major}.{minor}: fractal needs 1.6 or newer")
    return major, minor


# ------------------------------------------------------------------------------------------
# rendering (pure)


def render_dropin(address: str, config_version: int = 2, name: str = SNAPSHOTTER_NAME) -> str:
    """The drop-in: the proxy snapshotter (merged per name by containerd's imports)."""
    return (
        "# fractal: the proxy snapshotter (written by `fractal install`; see docs/install.md)\n"
        f"version = {config_version}\n\n"
        f"[proxy_plugins.{name}]\n"
        '  type = "snapshot"\n'
        f"  address = {ct.q(address)}\n"
    )


def render_unit(exec_path: str, address: str, fractal_config: str = DEFAULT_FRACTAL_CONFIG) -> str:
    """systemd unit for the snapshotter; it must be up before containerd dials it.  No
    ``--root``: the snapshotter reads ``root`` from fractal's config, as every shim does."""
    env = "" if fractal_config == DEFAULT_FRACTAL_CONFIG else f"Environment=FRACTAL_CONFIG={fractal_config}\n"
    return (
        "[Unit]\n"
        "Description=fractal snapshotter (containerd proxy snapshotter over the fractal layer repo)\n"
        "Documentation=https://github.com/fractal/fractal/blob/main/docs/install.md\n"
        "After=local-fs.target\n"
        "Before=containerd.service\n\n"
        "[Service]\n"
        f"{env}"
        f"ExecStart={exec_path} --address {address}\n"
        "Restart=always\n"
        "RestartSec=1\n"
        "KillMode=process\n"
        "LimitNOFILE=1048576\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target containerd.service\n"
    )


def render_pool_unit(python: str, fractal_config: str = DEFAULT_FRACTAL_CONFIG) -> str:
    """systemd unit for the pool of ready VMs (shim/poold.py; ``vm.pool`` in fractal's config,
    0 = the pool keeps none).  ``KillMode=process``: a stop or restart signals only the pool,
    which stops its un-adopted VMs itself; VMs that sandboxes adopted are in this unit's cgroup
    (the pool started them) but are the sandboxes' and must live on.  ``ExecStopPost``: whatever
    a pool killed -9 left (records in its run dir) is removed before the next start."""
    env = "" if fractal_config == DEFAULT_FRACTAL_CONFIG else f"Environment=FRACTAL_CONFIG={fractal_config}\n"
    return (
        "[Unit]\n"
        "Description=fractal VM pool (guests booted ahead for new VM sandboxes)\n"
        "Documentation=https://github.com/fractal/fractal/blob/main/docs/vm.md\n"
        "After=local-fs.target fractal-snapshotter.service\n\n"
        "[Service]\n"
        f"{env}"
        f"ExecStart={python} -m shim.poold\n"
        f"ExecStopPost={python} -m shim.poold cleanup\n"
        "Restart=always\n"
        "RestartSec=2\n"
        "KillMode=process\n"
        "LimitNOFILE=1048576\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def new_main_config(config_version: int) -> str:
    return f"version = {config_version}\n"


# ------------------------------------------------------------------------------------------
# the main config (pure: text in, text out)


_INLINE_UNPACK_RE = re.compile(r"^\s*unpack_config\s*=", re.M)


def wire_main(text: str, t: Target, dropin: str, config_dir: str, handler: str = "fractal",
              snapshotter: str = SNAPSHOTTER_NAME, platform: str | None = None) -> tuple[str, list[str]]:
    """(``text`` with everything fractal needs for containerd ``t``, notes for the user).
    Unchanged when all of it is there already."""
    platform = platform or default_platform()
    notes: list[str] = []
    try:
        new = ct.add_import(text, dropin, config_dir)
        data = tomllib.loads(new)
        block: list[str] = []
        sets: list[ct.Setting] = []
        table = t.handler_table(handler)
        want = handler_items(t, snapshotter)
        cur = ct.lookup(data, table)
        if isinstance(cur, dict):
            if cur.get("runtime_type") not in (None, FRACTAL_RUNTIME_TYPE):
                raise InstallError(f"the containerd config already has runtime handler {handler!r} with "
                                   f"runtime_type {cur.get('runtime_type')!r}; pick another --runtime-handler")
            for key, value in want.items():
                if cur.get(key) == value:
                    continue
                edited = ct.set_in_table(new, table, key, value)
                if edited is None:
                    raise ct.EditError(f"runtime handler {handler!r} is not a [table] of its own; set "
                                       f"{key} = {ct.toml_value(value)} in it by hand")
                new = edited
                sets.append(ct.Setting(table, key, value))
        elif cur is None:
            block.append(ct.table_text(table, want))
        else:
            raise ct.EditError(f"{ct.header(table)} is not a table; add the handler by hand")
        g = global_snapshotter(t, snapshotter)
        if g is not None:
            notes.append(GLOBAL_NOTE.format(snap=snapshotter, handler=handler))
            if ct.lookup(data, g.path) != g.value:
                edited = ct.set_in_table(new, g.table, g.key, g.value)
                if edited is None:
                    block.insert(0, ct.table_text(g.table, {g.key: g.value}))
                else:
                    new = edited
                sets.append(g)
        unpack_path = ("plugins", TRANSFER, "unpack_config")
        existing = ct.lookup(data, unpack_path)
        entries = unpack_entries(t, existing, snapshotter, platform)
        if entries and existing is not None and _INLINE_UNPACK_RE.search(new):
            line = "{platform = %s, snapshotter = %s}" % (ct.q(platform), ct.q(snapshotter))
            raise ct.EditError(f"unpack_config of {TRANSFER} is an inline array; add {line} to it by hand")
        for e in entries:
            block.append(ct.table_text(unpack_path, e, array=True))
        new = ct.append_block(new, "\n".join(block))

        def added(d: dict) -> bool:
            h = ct.lookup(d, table)
            if not (isinstance(h, dict) and all(h.get(k) == v for k, v in want.items())):
                return False
            if g is not None and ct.lookup(d, g.path) != g.value:
                return False
            got = ct.lookup(d, unpack_path)
            return not t.unpack_config or (isinstance(got, list) and any(
                isinstance(e, dict) and e.get("snapshotter") == snapshotter for e in got))

        if new != text:
            ct.check_preserved(text, new, added, [(s.path, s.value) for s in sets])
    except ct.EditError as e:
        raise InstallError(str(e)) from None
    return new, notes


def file_config_version(text: str, config: str) -> int:
    version = tomllib.loads(text).get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise InstallError(f"{config}: `version` must be a number (2, or 3 for containerd "
                           f"2.x), not {version!r}; containerd itself cannot read this file")
    if version < 2:
        raise InstallError(f"{config} has config version {version}; fractal needs version 2 "
                           "(`containerd config migrate` converts it)")
    return version


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
    version: tuple[int, int] | None = None  # containerd (major, minor); None = detect
    fractal_config: str = DEFAULT_FRACTAL_CONFIG
    platform: str | None = None  # unpack platform (2.x); None = this machine's


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
    version: tuple[int, int]
    version_line: str
    target: Target
    record: str  # the install record's path
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


def script_python(script: str) -> str | None:
    """The interpreter a console script names on its shebang line (None: not a plain path)."""
    try:
        with open(script, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if len(words) == 1 and os.path.isabs(words[0]) else None


def shim_change(opts: Options, notes: list[str]) -> FileChange:
    """The shim on containerd's PATH: the launcher (``python -S``, ccpu/cli/launcher.py) for
    the console script's interpreter; a symlink to the console script where no launcher can be
    written (a note says why)."""
    shim = console_script(SHIM_BINARY)
    target = str(Path(opts.bin_dir) / SHIM_BINARY)
    python = script_python(shim)
    try:
        if python is None:
            raise launcher.LauncherError(f"{shim} does not start with a plain #!python line")
        text = launcher.render(python, launcher.site_paths(python))
    except launcher.LauncherError as e:
        notes.append(f"{SHIM_BINARY} linked to the console script, not a launcher without `site` "
                     f"(each shim start is slower): {e}")
        return FileChange(target, None, "shim on containerd's PATH", link_to=shim)
    return FileChange(target, text, f"shim on containerd's PATH (launcher: {python} -S)", mode=0o755)


def cli_change(opts: Options, notes: list[str], record: rec.Record | None) -> FileChange | None:
    """``fractal`` itself in ``--bin-dir`` as a ``python -S`` launcher of ``ccpu.cli`` (the
    shim's kind, ccpu/cli/launcher.py): ``site`` is most of ``fractal --help``'s and ``fractal
    layers add``'s start (docs/performance.md, issue 13).  Optional, unlike the shim: pip's
    console script works wherever it is, so where no launcher can be written, or a file that
    is not install's own is there (pip's script when pip installed into ``--bin-dir``, a link
    elsewhere), nothing is written and a note says why.  A link to this very console script
    (docs/install.md's ``ln -s``) is replaced; :func:`apply` keeps it aside for uninstall."""
    target = str(Path(opts.bin_dir) / CLI_BINARY)
    try:
        script = console_script(CLI_BINARY)
    except InstallError:
        notes.append(f"no {CLI_BINARY} launcher: the {CLI_BINARY} console script is not installed")
        return None
    ours = record is not None and record.get(target) is not None
    if os.path.islink(target) and os.path.realpath(target) == os.path.realpath(script):
        pass  # the link to the console script docs/install.md has users make: replaced, kept aside
    elif os.path.realpath(script) == os.path.realpath(target):
        return None  # pip put its script there: that is the user's `fractal`
    elif os.path.lexists(target) and not ours:
        notes.append(f"{target} is not fractal install's: left as it is (no {CLI_BINARY} launcher)")
        return None
    python = script_python(script)
    try:
        if python is None:
            raise launcher.LauncherError(f"{script} does not start with a plain #!python line")
        text = launcher.render(python, launcher.site_paths(python), "ccpu.cli")
    except launcher.LauncherError as e:
        notes.append(f"no {CLI_BINARY} launcher without `site` (the console script {script} "
                     f"starts slower): {e}")
        return None
    return FileChange(target, text, f"the {CLI_BINARY} command (launcher: {python} -S)", mode=0o755)


def dropin_path(config: str) -> str:
    return str(Path(config).resolve().parent / "conf.d" / "fractal.toml")


def detect(opts: Options) -> tuple[tuple[int, int], str]:
    if opts.version is not None:
        return opts.version, f"containerd {opts.version[0]}.{opts.version[1]} (given)"
    ver, line = containerd_version(opts.containerd_binary)
    if ver is None:
        raise InstallError(f"cannot tell containerd's version ({line}); install containerd 1.6+ first, "
                           "or name it with --containerd-version")
    if ver < (1, 6):
        raise InstallError(f"{line}: fractal needs containerd 1.6 or newer")
    return ver, line


def plan(opts: Options) -> Plan:
    version, line = detect(opts)
    config = str(Path(opts.containerd_config).resolve())
    dropin = dropin_path(config)
    existed = os.path.exists(config)
    if existed:
        text = Path(config).read_text()
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InstallError(f"{config} is not valid TOML ({e}); fix it first") from None
        fv = file_config_version(text, config)
        if fv >= 3 and version[0] < 2:
            raise InstallError(f"{config} has config version {fv}, which containerd {version[0]}.{version[1]} "
                               "cannot read; is --containerd the containerd that uses this file?")
    else:
        fv = config_version_for(version)
        text = new_main_config(fv)
    t = Target(version, fv)
    p = Plan(version=version, version_line=line, target=t, record=str(rec.record_path(config)))
    new, p.notes = wire_main(text, t, dropin, str(Path(config).parent), opts.runtime_handler,
                             platform=opts.platform)
    p.changes.append(FileChange(dropin, render_dropin(opts.address, fv), "containerd drop-in (proxy snapshotter)"))
    p.changes.append(FileChange(config, new, f"containerd config ({t.label}: imports entry, CRI "
                                "runtime handler" + (", CRI snapshotter" if not t.per_runtime_snapshotter else "")
                                + (", unpack_config" if t.unpack_config else "") + ")" if existed
                                else f"containerd config (new, {t.label})", backup=existed))
    fconf = str(Path(opts.fractal_config).resolve())
    try:
        old = Path(fconf).read_text() if os.path.exists(fconf) else None
        p.changes.append(FileChange(fconf, with_root(old, opts.root), "fractal config (root, read by "
                                    "the snapshotter and every shim)", backup=old is not None))
    except FractalConfigError as e:
        raise InstallError(f"{fconf}: {e}") from None
    if fconf != DEFAULT_FRACTAL_CONFIG:
        p.notes.append(f"{fconf} is not {DEFAULT_FRACTAL_CONFIG}: containerd's environment needs "
                       f"FRACTAL_CONFIG={fconf} so that the shims read it")
    p.changes.append(shim_change(opts, p.notes))
    try:
        record = rec.load(Path(p.record))
    except ValueError:
        record = None  # apply() says what is wrong with it
    cli = cli_change(opts, p.notes, record)
    if cli is not None:
        p.changes.append(cli)
    if opts.systemd:
        p.changes.append(FileChange(str(Path(opts.systemd_dir) / UNIT_NAME),
                                    render_unit(console_script(SNAPSHOTTER_BINARY), opts.address, fconf),
                                    "systemd unit for the snapshotter"))
        p.changes.append(FileChange(str(Path(opts.systemd_dir) / POOL_UNIT_NAME),
                                    render_pool_unit(sys.executable, fconf),
                                    "systemd unit for the VM pool (vm.pool ready VMs)"))
    return p


def render_print(opts: Options, version: tuple[int, int] | None) -> str:
    """Everything install would write into a containerd config of its own, as text (no file is
    read or written except the version probe)."""
    out: list[str] = []
    versions = [version] if version is not None else [(1, 6), (1, 7), (2, 0)]
    for v in versions:
        fv = config_version_for(v)
        t = Target(v, fv)
        if version is None:
            out.append(f"# ===== {t.label}: containerd's version could not be detected =====\n")
        dropin = dropin_path(opts.containerd_config)
        out.append(f"# --- {dropin}  ({t.label}) ---\n")
        out.append(render_dropin(opts.address, fv))
        base = new_main_config(fv)
        main, notes = wire_main(base, t, dropin, str(Path(dropin).parent.parent), opts.runtime_handler,
                                platform=opts.platform)
        out.append(f"\n# --- {opts.containerd_config} (an existing file gets the imports line and the "
                   "block; a table it has already gets the key instead) ---\n")
        out.append(main)
        out.extend(f"# note: {n}\n" for n in notes)
        out.append("\n")
    out.append(f"# --- {opts.fractal_config} ---\n")
    out.append(with_root(None, opts.root))
    try:
        snap = console_script(SNAPSHOTTER_BINARY)
    except InstallError:
        snap = f"/usr/local/bin/{SNAPSHOTTER_BINARY}"
    out.append(f"\n# --- {Path(opts.systemd_dir) / UNIT_NAME} (with --systemd) ---\n")
    out.append(render_unit(snap, opts.address, opts.fractal_config))
    out.append(f"\n# --- {Path(opts.systemd_dir) / POOL_UNIT_NAME} (with --systemd) ---\n")
    out.append(render_pool_unit(sys.executable, opts.fractal_config))
    try:
        notes: list[str] = []
        ch = shim_change(opts, notes)
        if ch.link_to is not None:
            out.append(f"\n# --- symlink {ch.path} -> {ch.link_to} ---\n")
            out.extend(f"# note: {n}\n" for n in notes)
        else:
            out.append(f"\n# --- {ch.path} (mode 0755) ---\n{ch.content}")
    except InstallError:
        out.append(f"\n# --- {Path(opts.bin_dir) / SHIM_BINARY}: (the shim is not installed) ---\n")
    cli_notes: list[str] = []
    cli = cli_change(opts, cli_notes, None)
    if cli is not None:
        out.append(f"\n# --- {cli.path} (mode 0755; only where no file of someone else's is) ---\n{cli.content}")
    out.extend(f"# note: {n}\n" for n in cli_notes)
    return "".join(out)


def _current(change: FileChange) -> bool:
    """Whether the file is already what the change wants."""
    path = Path(change.path)
    if change.link_to is not None:
        return path.is_symlink() and os.readlink(path) == change.link_to
    if path.is_symlink():  # a file change never leaves a link (its target's text is not ours)
        return False
    try:
        return path.read_text() == change.content
    except OSError:
        return False


def _mkdirs(directory: Path, record: rec.Record) -> None:
    """mkdir -p, noting each directory created (uninstall removes them when empty)."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        d.mkdir()
        record.note_dir(str(d))


def apply(p: Plan) -> list[tuple[str, FileChange]]:
    """Write what differs and update the install record; returns (status, change) with status
    created|updated|unchanged."""
    record_file = Path(p.record)
    try:
        record = rec.load(record_file) or rec.Record()
    except ValueError as e:
        raise InstallError(f"{e}; move it away to install afresh") from None
    done: list[tuple[str, FileChange]] = []
    for ch in p.changes:
        path = Path(ch.path)
        if _current(ch):
            done.append(("unchanged", ch))
            continue
        existed = path.exists() or path.is_symlink()
        _mkdirs(path.parent, record)
        known = record.get(ch.path)
        entry = rec.Entry(ch.path, "link" if ch.link_to else "file", ch.what, created=not existed)
        if ch.link_to is not None:
            if existed and not path.is_symlink() and (known is None or known.kind != "file"):
                raise InstallError(f"{path} exists and is not a symlink; remove it or use --bin-dir")
            if known is not None and known.kind == "file" and known.backup:
                # a launcher an earlier install wrote over a link: that link stays the origin
                bak = Path(known.backup)
                if not bak.is_symlink():
                    raise InstallError(f"{path}: its original {bak} is not a link; run `fractal "
                                       "uninstall` first")
                known.backup = os.readlink(bak)
                bak.unlink()
            if existed and known is None:
                entry.backup = os.readlink(path)  # the link's old target, put back by uninstall
            tmp = path.with_name(f".{path.name}.fractal-tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(ch.link_to, tmp)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            entry.link_to = ch.link_to
        elif path.is_symlink():  # a link where a file goes (the shim, linked by an older install)
            # the link that was there before any install is kept as a link beside it (uninstall
            # renames it back); a link an older install created is simply replaced
            before = os.readlink(path) if known is None else known.backup
            if before and (known is None or known.kind == "link"):
                bak = rec.backup_path(ch.path)
                bak.unlink(missing_ok=True)
                os.symlink(before, bak)
                entry.backup = str(bak)
                if known is not None:
                    known.backup = str(bak)  # the record's origin moves from a target to a file
            data = (ch.content or "").encode()
            write_file(path, data, None, ch.mode)  # replaces the link, never writes through it
            entry.sha256 = rec.sha256(data)
        else:
            if existed and known is None and ch.mode & 0o111:
                # an executable of someone else's (pip's own console script when pip installed
                # into --bin-dir): never replaced, as before the launcher
                raise InstallError(f"{path} exists and is not fractal install's; remove it or use --bin-dir")
            st = os.stat(path) if existed else None
            if st is not None and known is None:
                # first install touching this file: keep the user's bytes, mode and owner
                bak = rec.backup_path(ch.path)
                write_file(bak, path.read_bytes(), st)
                entry.backup = str(bak)
            data = (ch.content or "").encode()
            # an executable (the launcher) keeps its own mode whatever the old file's was
            write_file(path, data, None if ch.mode & 0o111 else st, ch.mode)
            entry.sha256 = rec.sha256(data)
        record.note(entry)
        done.append(("updated" if existed else "created", ch))
    if any(s != "unchanged" for s, _ in done) or not record_file.exists():
        _mkdirs(record_file.parent, record)
        write_file(record_file, record.dumps().encode(), None, 0o600)
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
        steps.append("systemctl daemon-reload && systemctl enable --now fractal-snapshotter.service "
                     "fractal-pool.service")
    else:
        env = "" if opts.fractal_config == DEFAULT_FRACTAL_CONFIG else f"FRACTAL_CONFIG={opts.fractal_config} "
        steps.append(f"start the snapshotter before containerd: {env}{SNAPSHOTTER_BINARY} --address {opts.address}"
                     "  (its root comes from the fractal config; or rerun with --systemd)")
    if changed:
        steps.append("systemctl restart containerd   # containerd reads its config only at start")
    steps.append("fractal doctor   # checks all of it")
    return steps


# ------------------------------------------------------------------------------------------
# CLI


def _version_arg(args) -> tuple[int, int] | None:  # noqa: ANN001
    if args.containerd_version:
        try:
            return parse_version_option(args.containerd_version)
        except ValueError as e:
            raise InstallError(str(e)) from None
    if args.containerd_major:
        return (1, 6) if args.containerd_major == 1 else (2, 0)
    return None


def cmd_install(args) -> int:  # noqa: ANN001
    opts = Options(containerd_config=args.containerd_config, root=args.root, address=args.address,
                   runtime_handler=args.runtime_handler, systemd=args.systemd, systemd_dir=args.systemd_dir,
                   bin_dir=args.bin_dir, containerd_binary=args.containerd, version=_version_arg(args),
                   fractal_config=args.fractal_config, platform=args.platform)
    try:
        if args.print:
            version = opts.version
            if version is None:
                version, _ = containerd_version(opts.containerd_binary)
            sys.stdout.write(render_print(opts, version))
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
        if status == "updated" and ch.backup and rec.backup_path(ch.path).exists():
            print(f"            original kept as {rec.backup_path(ch.path)}")
    print(f"  record    {p.record}  (what `fractal uninstall --containerd-config "
          f"{opts.containerd_config}` undoes)")
    for n in p.notes:
        print(f"note: {n}")
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
                   help="the repo dir, written as root = ... into the fractal config, which the snapshotter "
                        "and every shim read (default %(default)s)")
    p.add_argument("--fractal-config", default=os.environ.get("FRACTAL_CONFIG") or DEFAULT_FRACTAL_CONFIG,
                   help="fractal's config file (default $FRACTAL_CONFIG, else %(default)s)")
    p.add_argument("--address", default=os.environ.get("FRACTAL_SNAPSHOTTER_ADDRESS", DEFAULT_SNAPSHOTTER_ADDRESS),
                   help="snapshotter socket (default %(default)s)")
    p.add_argument("--runtime-handler", default="fractal", help="CRI runtime handler name (default %(default)s)")
    p.add_argument("--systemd", action="store_true", help=f"also write {UNIT_NAME} and {POOL_UNIT_NAME}")
    p.add_argument("--systemd-dir", default=DEFAULT_SYSTEMD_DIR, help="where the unit goes (default %(default)s)")
    p.add_argument("--bin-dir", default=DEFAULT_BIN_DIR,
                   help=f"where the {SHIM_BINARY} launcher (or symlink) goes, on containerd's PATH, "
                        f"and a {CLI_BINARY} launcher unless a {CLI_BINARY} is there already "
                        "(default %(default)s)")
    p.add_argument("--containerd", default="containerd", help="containerd binary whose version decides the config form")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--containerd-version", default=None, metavar="X.Y",
                   help="skip version detection: 1.6, 1.7 (config version 2) or 2.x (config version 3)")
    g.add_argument("--containerd-major", type=int, choices=(1, 2), default=None,
                   help="skip version detection: 1 (= 1.6) or 2 (= 2.0)")
    p.add_argument("--platform", default=None,
                   help="unpack platform of the 2.x transfer service (default: this machine's, e.g. linux/amd64)")
    p.set_defaults(func=cmd_install)
