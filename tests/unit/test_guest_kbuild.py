"""The guest kernel built for the guest (ccpu/guest/kbuild.py): its pure parts and the fragments
kept in the repo.  The build itself is opt-in (minutes of compiling): tests/integration boot it
when it has been built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccpu.guest import initramfs, kbuild, modules
from ccpu.guest.kernel import KernelError


def test_parse_config_reads_values_and_not_set_later_lines_win() -> None:
    text = ("# a comment\nCONFIG_A=y\nCONFIG_B=\"x y\"\n# CONFIG_C is not set\nCONFIG_NR_CPUS=64\n"
            "CONFIG_A=n\nnot a line\n")
    assert kbuild.parse_config(text) == {"CONFIG_A": "n", "CONFIG_B": '"x y"', "CONFIG_C": "n",
                                         "CONFIG_NR_CPUS": "64"}


def test_lost_options_names_what_olddefconfig_dropped() -> None:
    fragment = {"CONFIG_EROFS_FS": "y", "CONFIG_NR_CPUS": "64", "CONFIG_MODULES": "n", "CONFIG_X": "y"}
    config = {"CONFIG_EROFS_FS": "y", "CONFIG_NR_CPUS": "8192", "CONFIG_X": "m"}
    # absent from .config counts as n (allnoconfig leaves "is not set" lines for visible ones only)
    assert kbuild.lost_options(fragment, config) == [("CONFIG_NR_CPUS", "64", "8192"), ("CONFIG_X", "y", "m")]
    assert kbuild.lost_options(fragment, {**config, "CONFIG_NR_CPUS": "64", "CONFIG_X": "y"}) == []


def test_cache_key_changes_with_source_fragments_and_builder() -> None:
    frags = {"a.config": "CONFIG_A=y\n", "b.config": "CONFIG_B=y\n"}
    key = kbuild.cache_key("s" * 64, frags)
    assert key == kbuild.cache_key("s" * 64, dict(reversed(list(frags.items()))))  # order-free
    assert key != kbuild.cache_key("t" * 64, frags)
    assert key != kbuild.cache_key("s" * 64, {**frags, "b.config": "CONFIG_B=n\n"})
    assert key != kbuild.cache_key("s" * 64, {"c.config": frags["a.config"], "b.config": frags["b.config"]})
    assert key != kbuild.cache_key("s" * 64, frags, builder=kbuild.BUILDER_VERSION + 1)
    assert key != kbuild.cache_key("s" * 64, frags, arch="arm64")


def test_builtin_modules_from_modinfo() -> None:
    modinfo = (b"9pnet_virtio.license=GPL\x009pnet_virtio.alias=x\x00virtio_rng.license=GPL\x00"
               b"crc32c-generic.alias=crc32c\x00\x00garbage\x00=x\x00.x=y\x00")
    assert kbuild.builtin_modules(modinfo) == ["9pnet_virtio", "crc32c_generic", "virtio_rng"]
    assert kbuild.builtin_modules(b"") == []


def test_builtin_list_satisfies_the_module_planner_with_nothing_to_load() -> None:
    """A kernel with everything built in: the builder's load order is empty (nothing shipped, the
    init's modprobe pass has nothing to do), not an error."""
    builtin = [f"kernel/{n}.ko" for n in kbuild.MODULE_OPTIONS]
    first, later = modules.split_order({}, modules.BOOT_MODULES + initramfs.IMAGE_MODULES,
                                       modules.GUEST_MODULES + initramfs.IMAGE_MODULES, builtin)
    assert (first, later) == ([], [])
    assert modules.shipped_modules_dep({}, []) == "\n"
    with pytest.raises(modules.ModuleError, match="virtio_net"):  # one not built in is still named
        modules.split_order({}, (), ("virtio_net",), builtin[:1])


def test_the_repo_fragments_build_in_every_module_the_guest_asks_for() -> None:
    frag = kbuild.parse_config(kbuild.merged_fragments(kbuild.read_fragments()))
    for name in (*modules.GUEST_MODULES, *initramfs.IMAGE_MODULES):
        option = kbuild.MODULE_OPTIONS.get(name)
        assert option is not None, f"guest module {name} has no option in kbuild.MODULE_OPTIONS"
        assert frag.get(option) == "y", f"{option} (for {name}) is not =y in ccpu/guest/kconfig"


def test_the_repo_fragments_are_small_and_modules_free() -> None:
    frags = kbuild.read_fragments()
    assert {"base.config", "virtio.config", "fs.config", "container.config", "net.config"} <= set(frags)
    for name, text in frags.items():
        for line in text.splitlines():
            assert (not line.strip() or line.startswith("#") or line.startswith("CONFIG_")), f"{name}: {line!r}"
    frag = kbuild.parse_config(kbuild.merged_fragments(frags))
    assert frag["CONFIG_MODULES"] == "n" and frag["CONFIG_DEBUG_INFO"] == "n"
    assert int(frag["CONFIG_NR_CPUS"]) <= 64
    for opt in ("CONFIG_PVH", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_HOTPLUG_PCI_PCIE", "CONFIG_HOTPLUG_PCI_ACPI", "CONFIG_SECCOMP_FILTER",
                "CONFIG_USER_NS", "CONFIG_PID_NS", "CONFIG_NET_NS", "CONFIG_MEMCG", "CONFIG_CGROUP_PIDS",
                "CONFIG_CGROUP_BPF", "CONFIG_PAGE_REPORTING", "CONFIG_DEVTMPFS", "CONFIG_TMPFS"):
        assert frag.get(opt) == "y", opt


def test_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kbuild.KERNEL_ENV, raising=False)
    assert kbuild.kernel_choice() == "debian"
    assert kbuild.kernel_choice("built") == "built"
    monkeypatch.setenv(kbuild.KERNEL_ENV, "built")
    assert kbuild.kernel_choice() == "built"
    assert kbuild.kernel_choice("debian") == "debian"  # the flag wins
    monkeypatch.setenv(kbuild.KERNEL_ENV, "kata")
    with pytest.raises(KernelError, match=r"'kata' \(\$FRACTAL_GUEST_KERNEL\): expected one of debian, built"):
        kbuild.kernel_choice()


def test_source_package_and_missing_tools() -> None:
    assert kbuild.source_package("6.1.192-3") == "linux-source-6.1"
    assert kbuild.source_package("6.12.57-1~bpo12+1") == "linux-source-6.12"
    with pytest.raises(KernelError):
        kbuild.source_package("unknown")
    assert kbuild.missing_tools(lambda t: None, lambda p: False) == [p for _, p in kbuild.BUILD_TOOLS]
    assert kbuild.missing_tools(lambda t: "/usr/bin/" + t, lambda p: True) == []


def test_find_without_a_build_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRACTAL_CACHE", str(tmp_path))
    with pytest.raises(KernelError, match="no built guest kernel.*fractal guest kernel"):
        kbuild.find()
    src = tmp_path / "guest" / "kernel" / "src"
    src.mkdir(parents=True)
    (src / "linux-source-6.1_6.1.192-3_all.deb").write_bytes(b"not really a deb")
    with pytest.raises(KernelError, match="linux-source-6.1 6.1.192-3 and these fragments"):
        kbuild.find()


def test_find_loads_a_cached_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRACTAL_CACHE", str(tmp_path))
    root = tmp_path / "guest" / "kernel"
    (root / "src").mkdir(parents=True)
    deb = root / "src" / "linux-source-6.1_6.1.192-3_all.deb"
    deb.write_bytes(b"source")
    source = kbuild.cached_source()
    assert source is not None and (source.package, source.version) == ("linux-source-6.1", "6.1.192-3")
    key = kbuild.cache_key(source.sha256, kbuild.read_fragments())
    dest = root / f"built-{key[:16]}"
    (dest / "modules").mkdir(parents=True)
    (dest / "vmlinux").write_bytes(b"\x7fELF")
    (dest / "vmlinux-pvh").write_bytes(b"\x7fELF")  # made by load() from a real vmlinux
    (dest / "built.json").write_text(json.dumps({"key": key, "release": "6.1.192-fractal",
                                                 "source": {"package": "linux-source-6.1", "version": "6.1.192-3"}}))
    kern = kbuild.find()
    assert kern.release == "6.1.192-fractal" and kern.deb_sha256 == key
    assert kern.modules_dir == dest / "modules" and kern.boot_image == dest / "vmlinux-pvh"
    # the stock kernel's offline fallback (kernel.fetch globs */kernel.json) never takes it for Debian's
    assert not list(root.glob("*/kernel.json"))


def test_an_unknown_kernel_choice_is_a_one_line_error() -> None:
    out = subprocess.run([sys.executable, "-m", "ccpu.cli", "guest", "build"], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), kbuild.KERNEL_ENV: "kata"})
    assert out.returncode != 0
    assert "guest kernel 'kata' ($FRACTAL_GUEST_KERNEL): expected one of debian, built" in out.stderr
    assert "Traceback" not in out.stderr


def test_deb_sha256_is_remembered_beside_the_deb_and_redone_when_the_deb_is_newer(tmp_path: Path) -> None:
    import hashlib
    deb = tmp_path / "linux-source-6.1_6.1.192-3_all.deb"
    deb.write_bytes(b"one")
    assert kbuild.deb_sha256(deb) == hashlib.sha256(b"one").hexdigest()
    side = tmp_path / (deb.name + ".sha256")
    assert side.read_text().strip() == hashlib.sha256(b"one").hexdigest()
    side.write_text("0" * 64 + "\n")  # trusted while not older than the .deb
    assert kbuild.deb_sha256(deb) == "0" * 64
    deb.write_bytes(b"two")
    os.utime(side, (1, 1))  # the .deb replaced after the sidecar was written
    assert kbuild.deb_sha256(deb) == hashlib.sha256(b"two").hexdigest()
    side.write_text("not a digest")
    assert kbuild.deb_sha256(deb) == hashlib.sha256(b"two").hexdigest()
