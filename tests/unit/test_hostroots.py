"""hack/hostroots.py's pure parts: the cache key, what a rootfs says about its python and glibc,
and the pip options that pick wheels for them (the install test's offline wheelhouse)."""

from __future__ import annotations

import pytest

from hack import hostroots
from hack.hostroots import DISTROS, HostRootError, dpkg_version, recipe_key, upstream_minor, wheel_tags

STATUS = """Package: libc6
Status: install ok installed
Version: 2.36-9+deb12u10
Description: GNU C Library
 continued: line

Package: libc6-dev
Status: deinstall ok config-files
Version: 2.31-13

Package: python3
Status: install ok installed
Version: 3.12.3-0ubuntu2
"""


def test_the_key_follows_suite_mirror_and_packages_not_their_order() -> None:
    d12, d13 = DISTROS["debian-12"], DISTROS["debian-13"]
    k = recipe_key(d12, "http://deb.debian.org/debian", ("python3", "python3-venv"))
    assert k == recipe_key(d12, "http://deb.debian.org/debian", ("python3-venv", "python3"))
    assert k != recipe_key(d13, "http://deb.debian.org/debian", ("python3", "python3-venv"))
    assert k != recipe_key(d12, "http://mirror.example/debian", ("python3", "python3-venv"))
    assert k != recipe_key(d12, "http://deb.debian.org/debian", ("python3",))


def test_installed_versions_from_a_dpkg_status_file() -> None:
    assert dpkg_version(STATUS, "libc6") == "2.36-9+deb12u10"
    assert dpkg_version(STATUS, "python3") == "3.12.3-0ubuntu2"
    assert dpkg_version(STATUS, "libc6-dev") is None  # only its config files are left
    assert dpkg_version(STATUS, "nosuch") is None


def test_upstream_minor_versions() -> None:
    assert upstream_minor("2.36-9+deb12u10") == "2.36"
    assert upstream_minor("3.12.3-0ubuntu2") == "3.12"
    assert upstream_minor("1:2.41-6") == "2.41"
    with pytest.raises(HostRootError):
        upstream_minor("git-snapshot")


def test_wheel_tags_name_the_containers_python_and_glibc() -> None:
    argv = wheel_tags("3.13", "2.41", "x86_64")
    pairs = {(a, b) for a, b in zip(argv, argv[1:])}
    assert "--only-binary=:all:" in argv  # pip refuses --platform without it
    assert {("--python-version", "3.13"), ("--abi", "cp313"), ("--platform", "manylinux_2_41_x86_64"),
            ("--platform", "manylinux2014_x86_64"), ("--implementation", "cp")} <= pairs


def test_every_older_manylinux_tag_is_named() -> None:
    plats = hostroots.manylinux_platforms("2.36", "x86_64")
    assert plats[0] == "manylinux_2_36_x86_64" and plats[-1] == "manylinux1_x86_64"
    assert "manylinux_2_28_x86_64" in plats and "manylinux2014_x86_64" in plats and "manylinux2010_x86_64" in plats
    assert "manylinux_2_37_x86_64" not in plats and "manylinux_2_4_x86_64" not in plats


def test_ubuntu_uses_the_gutsy_script_and_debian_its_own() -> None:
    assert DISTROS["ubuntu-24.04"].script == "gutsy"
    assert DISTROS["debian-13"].script is None
    assert [d.suite for d in DISTROS.values()] == ["bookworm", "trixie", "noble"]


def test_the_wheelhouse_requirements_are_the_projects() -> None:
    reqs = hostroots.project_requirements()
    assert any(r.startswith("grpcio") for r in reqs) and any(r.startswith("protobuf") for r in reqs)


def test_build_refuses_an_unknown_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        hostroots.main(["build", "fedora-40"])
    assert e.value.code == 2 and "unknown distribution fedora-40" in capsys.readouterr().err
