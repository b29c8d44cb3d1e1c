"""ccpu/cli/install.py: rendering and merging into containerd's config (pure), apply idempotence."""

from __future__ import annotations

import os
import tomllib

import pytest

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


def test_dropin_and_block_parse():
    d = tomllib.loads(I.render_dropin("/run/x.sock", 1))
    assert d == {"version": 2, "proxy_plugins": {"fractal": {"type": "snapshot", "address": "/run/x.sock"}}}
    assert tomllib.loads(I.render_dropin("/run/x.sock", 2))["version"] == 3
    b1 = tomllib.loads(I.render_runtime_block(1, "fractal"))
    assert b1["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["fractal"] == {
        "runtime_type": "io.containerd.fractal.v1", "pod_annotations": ["io.fractal.*"]}
    b2 = tomllib.loads(I.render_runtime_block(2, "fr"))
    assert b2["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["fr"] == {
        "runtime_type": "io.containerd.fractal.v1", "snapshotter": "fractal", "pod_annotations": ["io.fractal.*"]}


def test_unit():
    u = I.render_unit("/opt/bin/fractal-snapshotter", "/var/lib/fractal", "/run/fractal/s.sock")
    assert "ExecStart=/opt/bin/fractal-snapshotter --root /var/lib/fractal --address /run/fractal/s.sock" in u
    assert "Restart=always" in u and "Before=containerd.service" in u


def test_add_import_keeps_everything():
    new = I.add_import(USER_CONFIG, DROPIN, "/etc/containerd")
    assert new.splitlines()[1].startswith("imports = [")
    data = tomllib.loads(new)
    assert data["imports"] == [DROPIN]
    data.pop("imports")
    assert data == tomllib.loads(USER_CONFIG)
    assert I.add_import(new, DROPIN, "/etc/containerd") == new  # idempotent


@pytest.mark.parametrize("existing", ['imports = ["/a.toml"]\n', 'imports = []\n',
                                      'imports = [\n  "/a.toml",\n  "/b.toml",\n]\n'])
def test_add_import_to_existing_list(existing):
    text = "version = 2\n" + existing + USER_CONFIG.removeprefix("version = 2\n")
    new = I.add_import(text, DROPIN, "/etc/containerd")
    data = tomllib.loads(new)
    assert data["imports"][0] == DROPIN
    assert data["imports"][1:] == tomllib.loads(text)["imports"]


def test_glob_import_covers():
    text = 'version = 2\nimports = ["conf.d/*.toml"]\n'
    assert I.add_import(text, DROPIN, "/etc/containerd") == text


def test_no_version_line_inserts_at_top():
    new = I.add_import('[grpc]\n  address = "/x"\n', DROPIN, "/etc/containerd")
    assert tomllib.loads(new) == {"imports": [DROPIN], "grpc": {"address": "/x"}}


def test_runtime_block_appended_once():
    new = I.add_runtime_block(USER_CONFIG, I.render_runtime_block(1, "fractal"), 1, "fractal")
    data = tomllib.loads(new)
    cri = data["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "example/pause:9"
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is True
    assert cri["containerd"]["runtimes"]["fractal"]["runtime_type"] == "io.containerd.fractal.v1"
    assert I.add_runtime_block(new, I.render_runtime_block(1, "fractal"), 1, "fractal") == new


def test_runtime_handler_conflict():
    text = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.fractal]\n'
            '  runtime_type = "io.containerd.runc.v2"\n')
    with pytest.raises(I.InstallError, match="another --runtime-handler"):
        I.add_runtime_block(text, I.render_runtime_block(1, "fractal"), 1, "fractal")


def test_inline_table_refused():
    # appending a table under an inline table is invalid TOML: refuse, never write a broken config
    text = 'version = 2\n[plugins]\n"io.containerd.grpc.v1.cri" = { containerd = { runtimes = {} } }\n'
    with pytest.raises(I.InstallError, match="by hand"):
        I.add_runtime_block(text, I.render_runtime_block(1, "fractal"), 1, "fractal")


def test_plan_apply_idempotent(tmp_path, monkeypatch):
    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/fractal/bin/{name}")
    cfg = tmp_path / "config.toml"
    cfg.write_text(USER_CONFIG)
    opts = I.Options(containerd_config=str(cfg), systemd=True, systemd_dir=str(tmp_path / "units"),
                     bin_dir=str(tmp_path / "bin"), major=1)
    first = I.apply(I.plan(opts))
    assert [s for s, _ in first] == ["created", "updated", "created", "created"]
    assert (tmp_path / "config.toml.fractal-bak").read_text() == USER_CONFIG
    assert (tmp_path / "bin" / "containerd-shim-fractal-v1").readlink().as_posix() == \
        "/opt/fractal/bin/containerd-shim-fractal-v1"
    assert (tmp_path / "conf.d" / "fractal.toml").exists()
    assert (tmp_path / "units" / "fractal-snapshotter.service").exists()
    second = I.apply(I.plan(opts))
    assert [s for s, _ in second] == ["unchanged"] * 4


def test_plan_new_config(tmp_path, monkeypatch):
    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/{name}")
    cfg = tmp_path / "etc" / "config.toml"
    I.apply(I.plan(I.Options(containerd_config=str(cfg), bin_dir=str(tmp_path / "bin"), major=2)))
    data = tomllib.loads(cfg.read_text())
    assert data["version"] == 3 and data["imports"] == [str(tmp_path / "etc" / "conf.d" / "fractal.toml")]


def test_version1_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/{name}")
    cfg = tmp_path / "config.toml"
    cfg.write_text('root = "/x"\n')
    with pytest.raises(I.InstallError, match="version 1"):
        I.plan(I.Options(containerd_config=str(cfg), major=1))


@pytest.mark.parametrize("line", ['version = "2"', "version = 2.0", "version = true", "version = [2]"])
def test_version_not_a_number_is_a_clean_error(tmp_path, monkeypatch, line):
    monkeypatch.setattr(I, "console_script", lambda name: f"/opt/{name}")
    cfg = tmp_path / "config.toml"
    cfg.write_text(line + "\n")
    with pytest.raises(I.InstallError, match="`version` must be a number"):
        I.plan(I.Options(containerd_config=str(cfg), major=1))
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
    I.apply(I.plan(I.Options(containerd_config=str(cfg), bin_dir=str(tmp_path / "bin"), major=1)))
    assert seen and all(mode == 0o600 for _, mode in seen), seen
    assert cfg.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "config.toml.fractal-bak").stat().st_mode & 0o777 == 0o600
    assert str(cfg) in synced or any(s.startswith(str(tmp_path / ".config.toml.")) for s in synced), synced
    assert str(tmp_path) in synced, synced  # the directory: the rename is durable
    assert victim.read_text() == "keep me\n"
    assert not temps(), temps()
