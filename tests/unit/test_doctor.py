"""ccpu/cli/doctor.py: the pure evaluation of probed facts, and the exit code."""

from __future__ import annotations

from ccpu.cli import doctor as D


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
                tun=True, net_tools=["ip", "tc"])
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
               cgroup2=False, tun=False, net_tools=["ip"])
    checks = D.evaluate(bad)
    assert all(c.status != "ok" and c.fix for c in checks), [c for c in checks if c.status == "ok" or not c.fix]
    fails = {c.name for c in checks if c.status == "fail"}
    assert fails == {"containerd", "containerd socket", "proxy plugin", "snapshotter socket", "runc", "shim",
                     "overlayfs", "repo dir"}


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
