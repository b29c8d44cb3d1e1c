"""ccpu/cli/doctor.py: the pure evaluation of probed facts, and the exit code."""

from __future__ import annotations

import pytest

from ccpu.cli import doctor as D


HANDLER = {"runtime_type": "io.containerd.fractal.v1", "pod_annotations": ["io.fractal.*"]}


def dump16(snapshotter: str = "fractal", handler: dict | None = HANDLER) -> dict:
    runtimes = {"runc": {"runtime_type": "io.containerd.runc.v2"}, **({"fractal": handler} if handler else {})}
    return {"version": 2, "plugins": {"io.containerd.grpc.v1.cri": {"containerd": {
        "snapshotter": snapshotter, "runtimes": runtimes}}}}


def dump2(per_runtime: str | None = "fractal", unpack: list | None = None) -> dict:
    h = {**HANDLER, **({"snapshotter": per_runtime} if per_runtime else {})}
    return {"version": 3, "plugins": {
        "io.containerd.cri.v1.images": {"snapshotter": "overlayfs"},
        "io.containerd.cri.v1.runtime": {"containerd": {"runtimes": {"fractal": h}}},
        "io.containerd.transfer.v1.local": {"unpack_config": unpack if unpack is not None else [
            {"platform": "linux/amd64", "snapshotter": "overlayfs"},
            {"platform": "linux/amd64", "snapshotter": "fractal"}]}}}


def good(**over) -> D.Facts:  # noqa: ANN003
    f = D.Facts(address="/run/containerd/containerd.sock", snapshotter_address="/run/fractal/s.sock",
                root="/var/lib/fractal", containerd_bin="/usr/bin/containerd",
                containerd_bin_version="containerd github.com/containerd/containerd 1.6.20~ds1 x",
                daemon_version="1.6.20~ds1", plugin={"type": D.SNAPSHOT_PLUGIN_TYPE, "id": "fractal", "init_err": ""},
                snapshotter_error=None, runc="/usr/sbin/runc", shim_path="/usr/local/bin/containerd-shim-fractal-v1",
                shim_path_source="containerd pid 1", qemu="/usr/bin/qemu-system-x86_64", accel="kvm",
                accel_reason="usable", filesystems=["ext4", "overlay", "9p"], virtiofsd="/usr/libexec/virtiofsd",
                guest={"initramfs": "/c/i.cpio", "sha256": "ab" * 32, "kernel": "/c/k"}, root_writable=True,
                root_exists=True, cgroup2=True, cgroup_controllers=["cpu", "memory", "pids", "io"],
                tun=True, net_tools=["ip", "tc"], config_dump=dump16())
    for k, v in over.items():
        setattr(f, k, v)
    return f


def by_name(f: D.Facts) -> dict[str, D.Check]:
    return {c.name: c for c in D.evaluate(f)}


def test_all_good():
    checks = D.evaluate(good())
    assert [c.status for c in checks] == ["ok"] * len(checks)
    assert {c.name for c in checks} >= {"containerd", "containerd socket", "proxy plugin", "snapshotter socket",
                                        "runc", "shim", "qemu", "accel", "overlayfs", "share", "guest",
                                        "repo dir", "cgroups", "pod network"}


def test_every_miss_has_a_fix():
    bad = good(containerd_bin=None, daemon_version=None, daemon_error="connection refused", plugin=None,
               snapshotter_error="No such file or directory", runc=None, shim_path=None, qemu=None, accel="tcg",
               accel_reason="no /dev/kvm", filesystems=[], virtiofsd=None, guest=None, root_writable=False,
               cgroup2=False, tun=False, net_tools=["ip"], config_dump=dump16(handler=None))
    checks = D.evaluate(bad)
    assert all(c.status != "ok" and c.fix for c in checks), [c for c in checks if c.status == "ok" or not c.fix]
    fails = {c.name for c in checks if c.status == "fail"}
    assert fails == {"containerd", "containerd socket", "proxy plugin", "snapshotter socket", "runc", "shim",
                     "overlayfs", "repo dir", "cri handler"}


def test_old_containerd_fails():
    c = by_name(good(containerd_bin_version="containerd github.com/containerd/containerd v1.5.9 x",
                     daemon_version="v1.5.9"))
    assert c["containerd"].status == "fail" and "1.6" in c["containerd"].fix
    assert c["containerd socket"].status == "fail"


def test_containerd2_ok():
    c = by_name(good(containerd_bin_version="containerd github.com/containerd/containerd/v2 v2.1.4 x",
                     daemon_version="v2.1.4"))
    assert c["containerd"].status == "ok" and c["containerd socket"].status == "ok"


def test_plugin_missing_or_broken():
    assert "fractal install" in by_name(good(plugin=None))["proxy plugin"].fix
    c = by_name(good(plugin={"type": D.SNAPSHOT_PLUGIN_TYPE, "id": "fractal", "init_err": "bad address"}))
    assert c["proxy plugin"].status == "fail" and "bad address" in c["proxy plugin"].detail


def test_tcg_is_a_warning_with_the_reason():
    c = by_name(good(accel="tcg", accel_reason="/dev/kvm exists but the CPU has no vmx/svm flag"))["accel"]
    assert c.status == "warn" and "vmx/svm" in c.detail


def test_cgroup2_missing_controllers():
    c = by_name(good(cgroup_controllers=["cpu"]))["cgroups"]
    assert c.status == "warn" and "memory" in c.detail


def test_listener_pid_unknown_socket():
    assert D.listener_pid("/nonexistent/fractal-doctor.sock") is None


def test_pod_network_names_what_is_missing():
    c = by_name(good(tun=False, net_tools=["ip"]))["pod network"]
    assert c.status == "warn" and "/dev/net/tun" in c.detail and "tc" in c.detail and c.fix


def test_cri_wiring_per_version():
    assert by_name(good())["cri handler"].status == "ok"
    # 1.6: the node-wide snapshotter is the only one CRI has
    c = by_name(good(config_dump=dump16(snapshotter="overlayfs")))["cri handler"]
    assert c.status == "fail" and "no per-runtime snapshotter" in c.detail and "fractal install" in c.fix
    c = by_name(good(config_dump=dump16(handler=None)))["cri handler"]
    assert c.status == "fail" and "no CRI runtime handler 'fractal'" in c.detail
    c = by_name(good(config_dump=dump16(handler={"runtime_type": "io.containerd.runc.v2"})))["cri handler"]
    assert c.status == "fail" and "io.containerd.runc.v2" in c.detail
    c = by_name(good(config_dump=dump16(handler={"runtime_type": "io.containerd.fractal.v1"})))["cri handler"]
    assert c.status == "warn" and "pod_annotations" in c.detail
    # 2.x: per-runtime snapshotter, and the transfer service's unpack entry
    v2 = {"daemon_version": "v2.4.2"}
    checks = by_name(good(config_dump=dump2(), **v2))
    assert checks["cri handler"].status == "ok" and checks["unpack config"].status == "ok"
    assert "runtimes.fractal.snapshotter" in checks["cri handler"].detail
    c = by_name(good(config_dump=dump2(per_runtime=None), **v2))["cri handler"]
    assert c.status == "fail" and "'overlayfs'" in c.detail
    c = by_name(good(config_dump=dump2(unpack=[]), **v2))["unpack config"]
    assert c.status == "fail" and "no unpack platforms defined" in c.detail
    assert "unpack config" not in by_name(good())  # 1.x pulls without the transfer service


def test_cri_disabled_or_unreadable_only_warns():
    d = dump16()
    d["disabled_plugins"] = ["io.containerd.grpc.v1.cri"]
    assert by_name(good(config_dump=d))["cri handler"].status == "warn"
    c = by_name(good(config_dump=None, config_dump_error="permission denied"))["cri handler"]
    assert c.status == "warn" and "permission denied" in c.detail


def test_config_arg():
    assert D.config_arg(["containerd", "--config", "/x.toml"]) == "/x.toml"
    assert D.config_arg(["containerd", "-c=/y.toml"]) == "/y.toml"
    assert D.config_arg(["/usr/bin/containerd"]) == "/etc/containerd/config.toml"


@pytest.mark.parametrize("line,wrapper", [
    ("/usr/bin/env bash", True), ("/bin/sh -e", True), ("/usr/bin/dash", True),
    ("/opt/fractal/bin/python3", False), ("/usr/bin/env python3", False), ("", False)])
def test_a_shell_wrapper_shim_is_a_warning_with_the_fix(line: str, wrapper: bool) -> None:
    c = by_name(good(shim_interpreter=line))["shim"]
    assert c.status == ("warn" if wrapper else "ok"), c
    if wrapper:
        assert "shell wrapper" in c.detail and c.fix


def test_interpreter_line_reads_only_scripts(tmp_path) -> None:  # noqa: ANN001
    script, binary = tmp_path / "s", tmp_path / "b"
    script.write_text('#!/usr/bin/env bash\nexec "$(pyenv which x)" "$@"\n')
    binary.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 64)
    assert D.interpreter_line(str(script)) == "/usr/bin/env bash"
    assert D.interpreter_line(str(binary)) == ""
    assert D.interpreter_line(str(tmp_path / "missing")) == ""


@pytest.mark.parametrize("line,console", [
    ("/opt/fractal/bin/python3", True), ("/opt/fractal/bin/python3 -S", False), ("", False)])
def test_a_console_script_shim_is_ok_and_names_the_launcher(line: str, console: bool) -> None:
    c = by_name(good(shim_interpreter=line))["shim"]
    assert c.status == "ok", c
    assert ("console script" in c.detail and "python -S" in c.detail) == console, c
