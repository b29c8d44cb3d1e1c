"""ccpu/cli/install.py: rendering and merging into containerd's config (pure), apply idempotence."""

from __future__ import annotations

import os
import tomllib

import pytest

from ccpu.cli import containerd_toml as CT
from ccpu.cli import install as I

DROPIN = "/etc/containerd/conf.d/fractal.toml"

USER_CONFIG = """version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "example/pause:9"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true

[proxy_plugins.other]
  type = "snapshot"
  address = "/run/other.sock"
"""


def test_parse_version():
    assert I.parse_containerd_version("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3") == (1, 6)
    assert I.parse_containerd_version("containerd github.com/containerd/containerd/v2 v2.1.4 75cb2b7") == (2, 1)
    assert I.parse_containerd_version("garbage") is None


V16 = I.Target((1, 6), 2)
V17 = I.Target((1, 7), 2)
V2 = I.Target((2, 4), 3)


def wired(text, t, **kw):  # noqa: ANN001, ANN003
    new, _ = I.wire_main(text, t, DROPIN, "/etc/containerd", platform="linux/amd64", **kw)
    return new


def test_dropin_and_unit():
    d = tomllib.loads(I.render_dropin("/run/x.sock", 2))
    assert d == {"version": 2, "proxy_plugins": {"fractal": {"type": "snapshot", "address": "/run/x.sock"}}}
    assert tomllib.loads(I.render_dropin("/run/x.sock", 3))["version"] == 3
    u = I.render_unit("/opt/bin/fractal-snapshotter", "/run/fractal/s.sock")
    # no --root: the snapshotter reads root from fractal's config, as the shims do
    assert "ExecStart=/opt/bin/fractal-snapshotter --address /run/fractal/s.sock\n" in u
    assert "Restart=always" in u and "Before=containerd.service" in u and "Environment" not in u
    u2 = I.render_unit("/x", "/s.sock", "/srv/fractal.toml")
    assert "Environment=FRACTAL_CONFIG=/srv/fractal.toml\n" in u2


def test_wiring_per_version():
    """1.6: handler without per-runtime snapshotter + CRI's global snapshotter; 1.7: per-runtime;
    2.x: the 2.x plugin table, per-runtime, and unpack_config keeping containerd's default entry."""
    handler = {"runtime_type": "io.containerd.fractal.v1", "pod_annotations": ["io.fractal.*"]}
    d16 = tomllib.loads(wired("version = 2\n", V16))
    cri = d16["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {"snapshotter": "fractal", "runtimes": {"fractal": handler}}
    d17 = tomllib.loads(wired("version = 2\n", V17))
    assert d17["plugins"]["io.containerd.grpc.v1.cri"]["containerd"] == {
        "runtimes": {"fractal": {**handler, "snapshotter": "fractal"}}}
    d2 = tomllib.loads(wired("version = 3\n", V2))
    assert d2["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["fractal"] == {
        **handler, "snapshotter": "fractal"}
    assert d2["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"] == [
        {"platform": "linux/amd64", "snapshotter": "overlayfs", "differ": "walking"},
        {"platform": "linux/amd64", "snapshotter": "fractal"}]
    for t in (V16, V17, V2):
        once = wired(f"version = {t.file_version}\n", t)
        assert wired(once, t) == once  # idempotent


def test_notes_state_the_16_consequence():
    _, notes = I.wire_main("version = 2\n", V16, DROPIN, "/etc/containerd")
    assert any("every Kubernetes pod on this node" in n for n in notes)
    assert I.wire_main("version = 2\n", V17, DROPIN, "/etc/containerd")[1] == []


def test_16_global_snapshotter_replaced_in_the_users_table():
    text = USER_CONFIG + ('\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
                          '  snapshotter = "overlayfs"  # mine\n  default_runtime_name = "runc"\n')
    new = wired(text, V16)
    assert '  snapshotter = "fractal"  # fractal install\n' in new and "overlayfs" not in new
    cri = tomllib.loads(new)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == "fractal" and cri["default_runtime_name"] == "runc"
    # nothing else moved: the same lines, one replaced, the import and the block added
    assert new.count("\n") == text.count("\n") + 1 + 6  # imports; blank, markers, 3-line table


def test_key_inserted_after_the_users_header():
    text = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  default_runtime_name = "runc"\n'
    new = wired(text, V16)
    lines = new.splitlines()
    i = lines.index('[plugins."io.containerd.grpc.v1.cri".containerd]')
    assert lines[i + 1] == '  snapshotter = "fractal"  # fractal install'


def test_2x_unpack_config_of_the_user_is_extended_not_replaced():
    text = ("version = 3\n[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n"
            "  platform = 'linux/amd64'\n  snapshotter = 'native'\n")
    got = tomllib.loads(wired(text, V2))["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
    assert got == [{"platform": "linux/amd64", "snapshotter": "native"},
                   {"platform": "linux/amd64", "snapshotter": "fractal"}]
    inline = "version = 3\n[plugins.'io.containerd.transfer.v1.local']\n  unpack_config = []\n"
    with pytest.raises(I.InstallError, match="by hand"):
        wired(inline, V2)


def test_existing_handler_gets_the_missing_keys():
    text = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.fractal]\n'
            '  runtime_type = "io.containerd.fractal.v1"\n')
    h = tomllib.loads(wired(text, V17))["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["fractal"]
    assert h == {"runtime_type": "io.containerd.fractal.v1", "snapshotter": "fractal",
                 "pod_annotations": ["io.fractal.*"]}


def test_add_import_keeps_everything():
    new = CT.add_import(USER_CONFIG, DROPIN, "/etc/containerd")
    assert new.splitlines()[1].startswith("imports = [")
    data = tomllib.loads(new)
    assert data["imports"] == [DROPIN]
    data.pop("imports")
    assert data == tomllib.loads(USER_CONFIG)
    assert CT.add_import(new, DROPIN, "/etc/containerd") == new  # idempotent


@pytest.mark.parametrize("existing", ['imports = ["/a.toml"]\n', 'imports = []\n',
                                      'imports = [\n  "/a.toml",\n  "/b.toml",\n]\n'])
def test_add_import_to_existing_list(existing):
    text = "version = 2\n" + existing + USER_CONFIG.removeprefix("version = 2\n")
    new = CT.add_import(text, DROPIN, "/etc/containerd")
    data = tomllib.loads(new)
    assert data["imports"][0] == DROPIN
    assert data["imports"][1:] == tomllib.loads(text)["imports"]


def test_glob_import_covers():
    text = 'version = 2\nimports = ["conf.d/*.toml"]\n'
    assert CT.add_import(text, DROPIN, "/etc/containerd") == text


def test_no_version_line_inserts_at_top():
    new = CT.add_import('[grpc]\n  address = "/x"\n', DROPIN, "/etc/containerd")
    assert tomllib.loads(new) == {"imports": [DROPIN], "grpc": {"address": "/x"}}


def test_handler_appended_once_and_user_settings_kept():
    new = wired(USER_CONFIG, V16)
    data = tomllib.loads(new)
    cri = data["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "example/pause:9"
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is True
    assert cri["containerd"]["runtimes"]["fractal"]["runtime_type"] == "io.containerd.fractal.v1"
    assert new.startswith(USER_CONFIG.splitlines(keepends=True)[0])
    assert wired(new, V16) == new


def test_runtime_handler_conflict():
    text = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.fractal]\n'
            '  runtime_type = "io.containerd.runc.v2"\n')
    with pytest.raises(I.InstallError, match="another --runtime-handler"):
        wired(text, V16)


def test_inline_table_refused():
    # appending a table under an inline table is invalid TOML: refuse, never write a broken config
    text = 'version = 2\n[plugins]\n"io.containerd.grpc.v1.cri" = { containerd = { runtimes = {} } }\n'
    with pytest.raises(I.InstallError, match="by hand"):
        wired(text, V16)


def test_plan_apply_idempotent(tmp_path, monkeypatch):
    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/fractal/bin/{name}")
    cfg = tmp_path / "config.toml"
    cfg.write_text(USER_CONFIG)
    opts = I.Options(containerd_config=str(cfg), systemd=True, systemd_dir=str(tmp_path / "units"),
                     bin_dir=str(tmp_path / "bin"), version=(1, 6), fractal_config=str(tmp_path / "fractal" / "config.toml"))
    first = I.apply(I.plan(opts))
    assert [s for s, _ in first] == ["created", "updated", "created", "created", "created", "created"]
    assert (tmp_path / "config.toml.fractal-bak").read_text() == USER_CONFIG
    assert (tmp_path / "bin" / "containerd-shim-fractal-v1").readlink().as_posix() == \
        "/opt/fractal/bin/containerd-shim-fractal-v1"
    assert (tmp_path / "conf.d" / "fractal.toml").exists()
    assert (tmp_path / "units" / "fractal-snapshotter.service").exists()
    assert "-m shim.poold" in (tmp_path / "units" / "fractal-pool.service").read_text()
    second = I.apply(I.plan(opts))
    assert [s for s, _ in second] == ["unchanged"] * 6


def test_plan_new_config(tmp_path, monkeypatch):
    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/{name}")
    cfg = tmp_path / "etc" / "config.toml"
    I.apply(I.plan(I.Options(containerd_config=str(cfg), bin_dir=str(tmp_path / "bin"), version=(2, 0), fractal_config=str(tmp_path / "fractal" / "config.toml"))))
    data = tomllib.loads(cfg.read_text())
    assert data["version"] == 3 and data["imports"] == [str(tmp_path / "etc" / "conf.d" / "fractal.toml")]


def test_version1_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/{name}")
    cfg = tmp_path / "config.toml"
    cfg.write_text('root = "/x"\n')
    with pytest.raises(I.InstallError, match="version 1"):
        I.plan(I.Options(containerd_config=str(cfg), version=(1, 6), fractal_config=str(tmp_path / "fractal" / "config.toml")))


@pytest.mark.parametrize("line", ['version = "2"', "version = 2.0", "version = true", "version = [2]"])
def test_version_not_a_number_is_a_clean_error(tmp_path, monkeypatch, line):
    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/{name}")
    cfg = tmp_path / "config.toml"
    cfg.write_text(line + "\n")
    with pytest.raises(I.InstallError, match="`version` must be a number"):
        I.plan(I.Options(containerd_config=str(cfg), version=(1, 6), fractal_config=str(tmp_path / "fractal" / "config.toml")))
    assert cfg.read_text() == line + "\n"


def test_config_is_never_readable_wider_and_is_fsynced(tmp_path, monkeypatch, request):
    """The edited copy of a 0600 config is 0600 from its creation (it may hold registry
    credentials), both it and its directory are fsynced, and a file planted at the old fixed
    temp name is not followed."""
    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/fractal/bin/{name}")
    old_umask = os.umask(0o022)  # the usual one: a file created plainly is 0644
    request.addfinalizer(lambda: os.umask(old_umask))
    cfg = tmp_path / "config.toml"
    cfg.write_text(USER_CONFIG)
    os.chmod(cfg, 0o600)
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (tmp_path / ".config.toml.fractal-tmp").symlink_to(victim)
    seen: list[tuple[str, int]] = []  # (path, mode) of the temp copy at every step we can see
    synced: set[str] = set()

    def temps() -> list[Path]:
        return [p for p in tmp_path.iterdir() if p.name.startswith(".config.toml.") and not p.is_symlink()]

    def spy(name):  # noqa: ANN001, ANN202
        real = getattr(os, name)

        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            seen.extend((p.name, p.stat().st_mode & 0o777) for p in temps() if p.stat().st_size)
            if name == "fsync":
                synced.add(os.readlink(f"/proc/self/fd/{a[0]}"))
            return real(*a, **kw)
        monkeypatch.setattr(os, name, wrapper)

    for name in ("fsync", "replace", "chmod", "fchmod", "rename"):
        spy(name)
    import shutil
    real_copymode = shutil.copymode
    monkeypatch.setattr(shutil, "copymode", lambda *a, **kw: (
        seen.extend((p.name, p.stat().st_mode & 0o777) for p in temps() if p.stat().st_size),
        real_copymode(*a, **kw))[1])
    I.apply(I.plan(I.Options(containerd_config=str(cfg), bin_dir=str(tmp_path / "bin"), version=(1, 6), fractal_config=str(tmp_path / "fractal" / "config.toml"))))
    assert seen and all(mode == 0o600 for _, mode in seen), seen
    assert cfg.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "config.toml.fractal-bak").stat().st_mode & 0o777 == 0o600
    assert str(cfg) in synced or any(s.startswith(str(tmp_path / ".config.toml.")) for s in synced), synced
    assert str(tmp_path) in synced, synced  # the directory: the rename is durable
    assert victim.read_text() == "keep me\n"
    assert not temps(), temps()


# ------------------------------------------------------------------------------------------
# fractal's config: root, comments kept


def test_root_written_into_fractal_config_keeping_comments():
    from ccpu.cli.fractal_config import with_root

    text = '# operator notes\nmode = "host"  # fast tests\n\n[vm]\nmemory = "1G"  # big guests\n'
    new = with_root(text, "/srv/fractal")
    assert tomllib.loads(new) == {"mode": "host", "root": "/srv/fractal", "vm": {"memory": "1G"}}
    assert "# operator notes\n" in new and "# fast tests" in new and "# big guests" in new
    assert with_root(new, "/srv/fractal") == new
    assert tomllib.loads(with_root(None, "/x"))["root"] == "/x"
    assert tomllib.loads(with_root(new, "/y"))["root"] == "/y"


def test_fractal_config_default_path_is_the_shims():
    from ccpu.cli.fractal_config import DEFAULT_FRACTAL_CONFIG
    from shim.config import DEFAULT_FILE

    assert DEFAULT_FRACTAL_CONFIG == DEFAULT_FILE


# ------------------------------------------------------------------------------------------
# uninstall: exactly what install did, from its record


def _install(tmp_path, version=(1, 6), **kw):  # noqa: ANN001, ANN003, ANN202
    opts = I.Options(containerd_config=str(tmp_path / "etc" / "config.toml"), systemd=True,
                     systemd_dir=str(tmp_path / "units"), bin_dir=str(tmp_path / "bin"), version=version,
                     fractal_config=str(tmp_path / "fractal" / "config.toml"), root="/srv/repo", **kw)
    return I.apply(I.plan(opts))


def _tree(root):  # noqa: ANN001, ANN202
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (os.readlink(p) if p.is_symlink() else
                                         p.read_bytes() if p.is_file() else None, st.st_mode)
    return out


@pytest.mark.parametrize("version", [(1, 6), (1, 7), (2, 4)])
def test_uninstall_restores_byte_for_byte(tmp_path, monkeypatch, version):
    from ccpu.cli import uninstall as U
    from ccpu.cli.install_record import load, record_path

    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/fractal/bin/{name}")
    (tmp_path / "etc").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "units").mkdir()
    cfg = tmp_path / "etc" / "config.toml"
    cfg.write_bytes((USER_CONFIG if version < (2, 0) else "version = 3\n# mine\n").encode() + b"\n\n# no eol")
    os.chmod(cfg, 0o640)
    before = _tree(tmp_path)
    _install(tmp_path, version)
    _install(tmp_path, version)  # a second install changes nothing, and keeps the originals
    rec = load(record_path(str(cfg)))
    assert {e.path for e in rec.entries if e.created} == {
        str(tmp_path / p) for p in ("etc/conf.d/fractal.toml", "fractal/config.toml", "bin/containerd-shim-fractal-v1",
                                    "units/fractal-snapshotter.service", "units/fractal-pool.service")}
    steps = U.undo(rec)
    assert all(s.status in ("restored", "removed") for s in steps), steps
    record_path(str(cfg)).unlink()
    assert _tree(tmp_path) == before


def test_uninstall_keeps_a_file_changed_since_install(tmp_path, monkeypatch):
    from ccpu.cli import uninstall as U
    from ccpu.cli.install_record import load, record_path

    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/fractal/bin/{name}")
    cfg = tmp_path / "etc" / "config.toml"
    cfg.parent.mkdir()
    cfg.write_text(USER_CONFIG)
    _install(tmp_path)
    edited = cfg.read_text() + "# my later edit\n"
    cfg.write_text(edited)
    steps = {s.path: s for s in U.undo(load(record_path(str(cfg))))}
    assert steps[str(cfg)].status == "kept" and "changed since" in steps[str(cfg)].detail
    assert cfg.read_text() == edited
    steps = {s.path: s for s in U.undo(load(record_path(str(cfg))), force=True)}
    assert steps[str(cfg)].status == "restored" and cfg.read_text() == USER_CONFIG


def test_existing_fractal_config_backed_up_and_restored(tmp_path, monkeypatch):
    from ccpu.cli import uninstall as U
    from ccpu.cli.install_record import load, record_path

    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/fractal/bin/{name}")
    fconf = tmp_path / "fractal" / "config.toml"
    fconf.parent.mkdir()
    original = '# mine\nmode = "host"\n'
    fconf.write_text(original)
    _install(tmp_path)
    assert tomllib.loads(fconf.read_text()) == {"mode": "host", "root": "/srv/repo"}
    U.undo(load(record_path(str(tmp_path / "etc" / "config.toml"))))
    assert fconf.read_text() == original and not (tmp_path / "fractal" / "config.toml.fractal-bak").exists()


def test_version_option():
    assert I.parse_version_option("1.7") == (1, 7) and I.parse_version_option("2") == (2, 0)
    assert I.parse_version_option("v2.4.2") == (2, 4)
    with pytest.raises(ValueError):
        I.parse_version_option("1.5")


# ------------------------------------------------------------------------------------------
# the shim's launcher (ccpu/cli/launcher.py): `python -S`, the paths of `site` fixed at install


def _fake_console_script(tmp_path, python):  # noqa: ANN001, ANN202
    d = tmp_path / "venv" / "bin"
    d.mkdir(parents=True, exist_ok=True)
    for name in (I.SHIM_BINARY, I.SNAPSHOTTER_BINARY, I.CLI_BINARY):
        (d / name).write_text(f"#!{python}\nimport sys\nfrom shim.main import main\nsys.exit(main())\n")
        (d / name).chmod(0o755)
    return d


def _real_site_paths() -> list[str]:
    """This interpreter's ``site_paths``; where it cannot import fractal without PYTHONPATH (an
    editable install whose checkout moved), what ``site`` adds alone (the test adds the checkout)."""
    import json
    import subprocess
    import sys

    from ccpu.cli import launcher as L

    try:
        return L.site_paths(sys.executable)
    except L.LauncherError:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"],
                             env=env, cwd="/", capture_output=True, text=True, check=True).stdout
        return [p for p in json.loads(out) if p and os.path.isabs(p)]


def test_install_writes_a_launcher_that_runs_the_shim_without_site(tmp_path, monkeypatch):
    import subprocess
    import sys

    from ccpu.cli import launcher as L

    bindir = _fake_console_script(tmp_path, sys.executable)
    monkeypatch.setattr(I, "console_script", lambda name: str(bindir / name))
    # where the checkout is: site_paths asks the interpreter without PYTHONPATH, and this
    # checkout may be reached only through it (a worktree): add it as `site` would not
    root = os.path.dirname(os.path.dirname(os.path.abspath(I.__file__)))
    real = _real_site_paths()
    monkeypatch.setattr(L, "site_paths", lambda python: [*real, root])
    done = _install(tmp_path)
    shim = tmp_path / "bin" / I.SHIM_BINARY
    assert ("created", str(shim)) in [(s, ch.path) for s, ch in done]
    assert not shim.is_symlink() and shim.stat().st_mode & 0o777 == 0o755
    text = shim.read_text()
    assert text.startswith(f"#!{sys.executable} -S\n") and repr(root) in text
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONPROFILEIMPORTTIME")}
    r = subprocess.run([str(shim), "-v"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("containerd-shim-fractal-v1 (fractal)"), r
    # no `site` ran: PYTHONPROFILEIMPORTTIME lists every module imported
    r = subprocess.run([str(shim), "-v"], capture_output=True, text=True, timeout=60,
                       env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    imported = {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "shim.main" in imported and "site" not in imported, r.stderr
    # and PYTHONPATH still wins, as with the console script (`-S` is not `-E`)
    other = tmp_path / "other" / "shim"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    (other / "main.py").write_text("def main():\n    print('the PYTHONPATH shim')\n    return 0\n")
    r = subprocess.run([str(shim)], capture_output=True, text=True, timeout=60,
                       env={**env, "PYTHONPATH": str(tmp_path / "other")})
    assert r.stdout.strip() == "the PYTHONPATH shim", r
    assert [s for s, _ in _install(tmp_path)] == ["unchanged"] * 7


def test_launcher_replaces_an_older_installs_link_and_uninstall_restores_the_users_link(tmp_path, monkeypatch):
    import sys

    from ccpu.cli import launcher as L
    from ccpu.cli import uninstall as U
    from ccpu.cli.install_record import load, record_path

    bindir = _fake_console_script(tmp_path, sys.executable)
    monkeypatch.setattr(I, "console_script", lambda name: str(bindir / name))
    (tmp_path / "bin").mkdir()
    shim = tmp_path / "bin" / I.SHIM_BINARY
    shim.symlink_to("/opt/someone-elses/shim")  # the user's own link, before any install
    # an older install: the link (no launcher could be written)
    monkeypatch.setattr(L, "site_paths", lambda python: (_ for _ in ()).throw(L.LauncherError("no")))
    _install(tmp_path)
    assert os.readlink(shim) == str(bindir / I.SHIM_BINARY)
    target = bindir / I.SHIM_BINARY
    before = target.read_bytes()
    monkeypatch.setattr(L, "site_paths", lambda python: ["/x/site-packages"])
    _install(tmp_path)  # now the launcher: the link is replaced, never written through
    assert not shim.is_symlink() and "/x/site-packages" in shim.read_text()
    assert target.read_bytes() == before
    steps = {s.path: s.status for s in U.undo(load(record_path(str(tmp_path / "etc" / "config.toml"))))}
    assert steps[str(shim)] == "restored", steps
    assert os.readlink(shim) == "/opt/someone-elses/shim"  # the user's link, as it was
    assert not os.path.lexists(f"{shim}.fractal-bak")


def test_no_launcher_for_an_unnameable_interpreter_falls_back_to_the_link(tmp_path, monkeypatch):
    from ccpu.cli import launcher as L

    with pytest.raises(L.LauncherError):
        L.render("/opt/my python/bin/python3", [])
    with pytest.raises(L.LauncherError):
        L.render("python3", [])
    bindir = _fake_console_script(tmp_path, "/usr/bin/env python3")  # not a plain path
    monkeypatch.setattr(I, "console_script", lambda name: str(bindir / name))
    p = I.plan(I.Options(containerd_config=str(tmp_path / "config.toml"), bin_dir=str(tmp_path / "bin"),
                         version=(1, 6), fractal_config=str(tmp_path / "f.toml")))
    ch = [c for c in p.changes if c.path.endswith(I.SHIM_BINARY)][0]
    assert ch.link_to == str(bindir / I.SHIM_BINARY)
    assert any("launcher" in n for n in p.notes)


def test_site_paths_leave_pythonpath_out_and_name_fractals_packages(tmp_path, monkeypatch):
    import sys

    from ccpu.cli import launcher as L

    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "mine"))
    try:
        paths = L.site_paths(sys.executable)
    except L.LauncherError as e:  # a checkout reached only through PYTHONPATH: a clear error
        assert "without PYTHONPATH" in str(e)
        return
    assert str(tmp_path / "mine") not in paths and all(os.path.isabs(p) for p in paths)
    assert any(os.path.isdir(os.path.join(p, "shim")) for p in paths)


def test_someone_elses_file_where_the_launcher_goes_is_refused_and_kept(tmp_path, monkeypatch):
    """pip installing into --bin-dir puts its own console script there: not replaced (as with
    the symlink before), the user is told to choose."""
    import sys

    from ccpu.cli import launcher as L

    bindir = _fake_console_script(tmp_path, sys.executable)
    monkeypatch.setattr(I, "console_script", lambda name: str(bindir / name))
    monkeypatch.setattr(L, "site_paths", lambda python: ["/x/site-packages"])
    (tmp_path / "bin").mkdir()
    theirs = tmp_path / "bin" / I.SHIM_BINARY
    theirs.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(I.InstallError, match="--bin-dir"):
        _install(tmp_path)
    assert theirs.read_text() == "#!/bin/sh\nexit 0\n"


# ------------------------------------------------------------------------------------------
# `fractal` itself as a launcher (issue 13): optional, never over someone else's file


def test_install_writes_a_fractal_launcher_that_runs_the_cli_without_site(tmp_path, monkeypatch):
    import subprocess
    import sys

    from ccpu.cli import launcher as L
    from ccpu.cli import uninstall as U
    from ccpu.cli.install_record import load, record_path

    bindir = _fake_console_script(tmp_path, sys.executable)
    monkeypatch.setattr(I, "console_script", lambda name: str(bindir / name))
    root = os.path.dirname(os.path.dirname(os.path.abspath(I.__file__)))
    real = _real_site_paths()
    monkeypatch.setattr(L, "site_paths", lambda python: [*real, root])
    done = _install(tmp_path)
    cli = tmp_path / "bin" / I.CLI_BINARY
    assert ("created", str(cli)) in [(s, ch.path) for s, ch in done]
    assert cli.stat().st_mode & 0o777 == 0o755 and cli.read_text().startswith(f"#!{sys.executable} -S\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONPROFILEIMPORTTIME")}
    r = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=60,
                       env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    assert r.returncode == 0 and "layers" in r.stdout, r
    imported = {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "ccpu.cli" in imported and "site" not in imported, r.stderr
    r = subprocess.run([str(cli), "layers", "nope"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr, r  # the CLI's own usage error
    assert [s for s, _ in _install(tmp_path)] == ["unchanged"] * 7
    steps = {s.path: s.status for s in U.undo(load(record_path(str(tmp_path / "etc" / "config.toml"))))}
    assert steps[str(cli)] == "removed", steps
    assert not os.path.lexists(cli)


def test_someone_elses_fractal_in_bin_dir_is_left_alone_and_install_goes_on(tmp_path, monkeypatch):
    """pip installing into --bin-dir put its console script there: that is the user's
    `fractal`; install writes the rest and says why there is no launcher."""
    import sys

    from ccpu.cli import launcher as L
    from ccpu.cli import uninstall as U
    from ccpu.cli.install_record import load, record_path

    bindir = _fake_console_script(tmp_path, sys.executable)
    monkeypatch.setattr(I, "console_script", lambda name: str(bindir / name))
    monkeypatch.setattr(L, "site_paths", lambda python: ["/x/site-packages"])
    (tmp_path / "bin").mkdir()
    theirs = tmp_path / "bin" / I.CLI_BINARY
    theirs.write_text("#!/bin/sh\necho mine\n")
    theirs.chmod(0o755)
    opts = I.Options(containerd_config=str(tmp_path / "etc" / "config.toml"), bin_dir=str(tmp_path / "bin"),
                     version=(1, 6), fractal_config=str(tmp_path / "f.toml"))
    p = I.plan(opts)
    assert str(theirs) not in [c.path for c in p.changes]
    assert any(str(theirs) in n and "left as it is" in n for n in p.notes), p.notes
    I.apply(p)
    assert (tmp_path / "bin" / I.SHIM_BINARY).exists()
    U.undo(load(record_path(str(tmp_path / "etc" / "config.toml"))))
    assert theirs.read_text() == "#!/bin/sh\necho mine\n"


def test_the_console_script_in_bin_dir_itself_gets_no_launcher(tmp_path, monkeypatch):
    import sys

    from ccpu.cli import launcher as L

    bindir = _fake_console_script(tmp_path, sys.executable)
    monkeypatch.setattr(I, "console_script", lambda name: str(bindir / name))
    monkeypatch.setattr(L, "site_paths", lambda python: ["/x/site-packages"])
    p = I.plan(I.Options(containerd_config=str(tmp_path / "config.toml"), bin_dir=str(bindir),
                         version=(1, 6), fractal_config=str(tmp_path / "f.toml")))
    assert str(bindir / I.CLI_BINARY) not in [c.path for c in p.changes]
    # and an interpreter that cannot run it: a note, no launcher, the install goes on
    monkeypatch.setattr(L, "site_paths", lambda python: (_ for _ in ()).throw(L.LauncherError("no ccpu")))
    p = I.plan(I.Options(containerd_config=str(tmp_path / "config.toml"), bin_dir=str(tmp_path / "bin"),
                         version=(1, 6), fractal_config=str(tmp_path / "f.toml")))
    assert str(tmp_path / "bin" / I.CLI_BINARY) not in [c.path for c in p.changes]
    assert any("no fractal launcher" in n and "no ccpu" in n for n in p.notes), p.notes


def test_the_users_link_to_the_console_script_becomes_the_launcher_and_comes_back(tmp_path, monkeypatch):
    """docs/install.md has users `ln -s VENV/bin/fractal /usr/local/bin/fractal`: install
    replaces that link by the launcher, uninstall puts the link back."""
    import sys

    from ccpu.cli import launcher as L
    from ccpu.cli import uninstall as U
    from ccpu.cli.install_record import load, record_path

    bindir = _fake_console_script(tmp_path, sys.executable)
    monkeypatch.setattr(I, "console_script", lambda name: str(bindir / name))
    monkeypatch.setattr(L, "site_paths", lambda python: ["/x/site-packages"])
    (tmp_path / "bin").mkdir()
    link = tmp_path / "bin" / I.CLI_BINARY
    link.symlink_to(bindir / I.CLI_BINARY)
    before = (bindir / I.CLI_BINARY).read_bytes()
    _install(tmp_path)
    assert not link.is_symlink() and "ccpu.cli" in link.read_text() and "/x/site-packages" in link.read_text()
    assert (bindir / I.CLI_BINARY).read_bytes() == before  # never written through the link
    U.undo(load(record_path(str(tmp_path / "etc" / "config.toml"))))
    assert os.readlink(link) == str(bindir / I.CLI_BINARY)
