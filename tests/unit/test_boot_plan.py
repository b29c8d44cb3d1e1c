"""The pure plan of `fractal boot` (ccpu/boot/plan.py): layers, init, kernel, bounds."""

from __future__ import annotations

import pytest

from ccpu.boot import plan
from ccpu.boot.plan import BootUsageError


def test_layers_share_one_parent_and_keep_their_order() -> None:
    lay = plan.layers_of(["/var/lib/fractal/layers/12", "/var/lib/fractal/layers/3"])
    assert lay.root == "/var/lib/fractal/layers" and lay.names == ("12", "3")
    assert lay.host_dirs() == ["/var/lib/fractal/layers/12", "/var/lib/fractal/layers/3"]


@pytest.mark.parametrize("dirs", [
    [],
    ["/a/layers/1", "/b/layers/2"],
    ["layers/1"],
    ["/r/layers/x:y"],
    ["/r/layers/a b"],
    ["/r/layers/.hidden"],
    ["/r/layers/1", "/r/layers/1"],
    [f"/r/layers/{i}" for i in range(plan.MAX_LAYERS + 1)],
])
def test_bad_layer_lists_are_refused(dirs: list[str]) -> None:
    with pytest.raises(BootUsageError):
        plan.layers_of(dirs)


@pytest.mark.parametrize("path", ["sbin/init", "/", "/sbin/../init", "//sbin/init", "/sbin/init ", "/a b",
                                  "/x;reboot", "/" + "a" * 300, "", "/sbin/init\n"])
def test_init_paths_are_confined(path: str) -> None:
    with pytest.raises(BootUsageError):
        plan.check_init(path)


def test_good_init() -> None:
    assert plan.check_init("/lib/systemd/systemd") == "/lib/systemd/systemd"


@pytest.mark.parametrize("text, mb", [("512", 512), ("512M", 512), ("2G", 2048), ("1g", 1024), ("64", 64)])
def test_mem(text: str, mb: int) -> None:
    assert plan.parse_mem(text) == mb


@pytest.mark.parametrize("text", ["lots", "1", "63", "-5", "1T", "99999999", "300G", ""])
def test_bad_mem(text: str) -> None:
    with pytest.raises(BootUsageError):
        plan.parse_mem(text)


@pytest.mark.parametrize("n", [0, -1, plan.CPUS_MAX + 1])
def test_bad_cpus(n: int) -> None:
    with pytest.raises(BootUsageError):
        plan.check_cpus(n)


BOOT = ["config-6.1.0-13-amd64", "vmlinuz-6.1.0-13-amd64", "vmlinuz-6.1.0-27-amd64", "vmlinuz-../../etc/passwd",
        "initrd.img-6.1.0-27-amd64"]


def test_kernel_choice_image_kernel_when_prepared() -> None:
    k = plan.choose_kernel(BOOT, "/cache/vmlinuz", "6.1.0-57", built=("/l/2/boot/vmlinuz-6.1.0-27-amd64", "/c/i.gz"))
    assert (k.path, k.initrd, k.own, k.image_kernel) == ("/l/2/boot/vmlinuz-6.1.0-27-amd64", "/c/i.gz", True,
                                                         "6.1.0-27-amd64")
    assert "booting the image's kernel /boot/vmlinuz-6.1.0-27-amd64" in k.note


def test_kernel_choice_falls_back_with_a_note() -> None:
    k = plan.choose_kernel(BOOT, "/cache/vmlinuz", "6.1.0-57", why_not="the image has no file modules.dep")
    assert k.path == "/cache/vmlinuz" and k.initrd is None and not k.own
    assert "cannot be booted (the image has no file modules.dep)" in k.note and "fractal's kernel 6.1.0-57" in k.note
    with pytest.raises(BootUsageError, match="--kernel image"):
        plan.choose_kernel(BOOT, "/cache/vmlinuz", want="image", why_not="x")
    k = plan.choose_kernel(BOOT, "/cache/vmlinuz", want="fractal", built=("/a", "/b"))
    assert k.path == "/cache/vmlinuz" and "--kernel fractal" in k.note
    with pytest.raises(BootUsageError):
        plan.choose_kernel(BOOT, "/k", want="mine")


def test_no_boot_kernel_note() -> None:
    k = plan.choose_kernel([], "/cache/vmlinuz")
    assert k.image_kernel is None and "no /boot/vmlinuz-*" in k.note and "may be missing" in k.note
    with pytest.raises(BootUsageError, match="no /boot/vmlinuz"):
        plan.choose_kernel([], "/cache/vmlinuz", want="image")


def test_kernel_versions_sort_numerically() -> None:
    assert plan.image_kernels(["vmlinuz-6.1.0-9-amd64", "vmlinuz-6.10.0-1-amd64", "vmlinuz-6.1.0-27-amd64"]) == \
        ["6.10.0-1-amd64", "6.1.0-27-amd64", "6.1.0-9-amd64"]


def test_cmdline_and_bounds() -> None:
    k = plan.choose_kernel([], "/k")
    p = plan.make(["/r/layers/7", "/r/layers/2"], "/sbin/init", k, 256, 1)
    assert p.cmdline() == ("fractal.boot.lowers=7:2", "fractal.boot.init=/sbin/init")
    long = [f"/r/layers/{'x' * 60}{i:03d}" for i in range(40)]
    with pytest.raises(BootUsageError, match="command line"):
        plan.make(long, "/sbin/init", k)


def test_shares() -> None:
    s = plan.parse_share("/srv/data")
    assert (s.host, s.guest, s.readonly) == ("/srv/data", "/mnt/data", False)
    s = plan.parse_share("/srv/data:/data:ro")
    assert (s.guest, s.readonly) == ("/data", True)
    for bad in ("/srv:/proc/x", "/srv:/repo", "/srv:rel", "/srv:/a b", "/srv:/x:rx", "/srv:/", "/srv:/.boot/x",
                "/srv:/a,b", "/srv:/a/../b"):
        with pytest.raises(BootUsageError):
            plan.parse_share(bad)
    with pytest.raises(BootUsageError, match="same guest path"):
        plan.make(["/r/l/1"], "/sbin/init", plan.choose_kernel([], "/k"),
                  shares=[plan.parse_share("/a:/mnt/x"), plan.parse_share("/b:/mnt/x")])
