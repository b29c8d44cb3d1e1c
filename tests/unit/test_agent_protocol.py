"""Agent input validation: ids, paths inside roots, argument types, rootfs plans, error codes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccpu import stack
from ccpu.agent import mounts, protocol
from ccpu.linux.mount import MS_BIND, MS_NOSUID, MS_PRIVATE, MS_REC


@pytest.mark.parametrize("value", ["a", "c1", "A.b_c-d", "9" * 128, "x" + "-" * 127])
def test_valid_ids(value: str) -> None:
    assert protocol.validate_id(value) == value


@pytest.mark.parametrize(
    "value", ["", "-a", ".a", "_a", "..", "a/b", "a b", "a\n", "é", "a" * 129, None, 5, ["a"], "a\0"]
)
def test_invalid_ids(value: object) -> None:
    with pytest.raises(protocol.InvalidArgument):
        protocol.validate_id(value)


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "bundles"
    (root / "ok").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    return root, outside


def test_path_inside_root(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    assert protocol.resolve_inside(str(root / "ok"), [str(root)]) == str(root / "ok")
    # need not exist yet (a bundle's rootfs, say)
    assert protocol.resolve_inside(str(root / "new"), [str(root)]) == str(root / "new")
    # the second of several roots
    assert protocol.resolve_inside(str(root / "ok"), ["/nonexistent", str(root)]) == str(root / "ok")


def test_root_reached_through_a_symlink(roots: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = roots
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    assert protocol.resolve_inside(str(alias / "ok"), [str(root)]) == str(root / "ok")
    assert protocol.resolve_inside(str(root / "ok"), [str(alias)]) == str(root / "ok")


@pytest.mark.parametrize(
    "make",
    [
        lambda root, out: str(root / ".." / "outside"),  # .. escape
        lambda root, out: str(root / "ok" / ".." / ".." / "outside" / "x"),
        lambda root, out: str(out),  # absolute path elsewhere
        lambda root, out: "/etc",
        lambda root, out: str(root),  # the root itself is not a bundle
        lambda root, out: str(root) + "-sibling",  # prefix but not below
        lambda root, out: "ok",  # relative
        lambda root, out: "",
        lambda root, out: str(root / "a\0b"),
        lambda root, out: None,
    ],
)
def test_path_escapes_refused(roots: tuple[Path, Path], make: object) -> None:
    root, out = roots
    with pytest.raises(protocol.InvalidArgument):
        protocol.resolve_inside(make(root, out), [str(root)])  # type: ignore[operator]


def test_symlink_pointing_outside_refused(roots: tuple[Path, Path]) -> None:
    root, out = roots
    (root / "link").symlink_to(out)
    (root / "ok" / "deep").symlink_to("../../../outside")
    (root / "abs").symlink_to("/")
    for p in (root / "link", root / "link" / "x", root / "ok" / "deep", root / "abs" / "etc"):
        with pytest.raises(protocol.InvalidArgument):
            protocol.resolve_inside(str(p), [str(root)])


def test_symlink_staying_inside_is_fine(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "inner").symlink_to("ok")
    assert protocol.resolve_inside(str(root / "inner"), [str(root)]) == str(root / "ok")


def test_argument_types() -> None:
    args = {"s": "x", "i": 3, "b": True, "d": {}, "l": []}
    assert protocol.arg_str(args, "s") == "x"
    assert protocol.arg_int(args, "i") == 3
    assert protocol.arg_bool(args, "b") is True
    assert protocol.arg_int(args, "missing", 7) == 7
    for getter, name in ((protocol.arg_int, "b"), (protocol.arg_str, "i"), (protocol.arg_bool, "i"), (protocol.arg_dict, "l")):
        with pytest.raises(protocol.InvalidArgument):
            getter(args, name)
    with pytest.raises(protocol.InvalidArgument):
        protocol.arg_str(args, "missing")
    with pytest.raises(protocol.InvalidArgument):
        protocol.arg_channel({"stdin": -1}, "stdin")
    assert protocol.arg_channel({}, "stdout") == 0


def test_error_codes_round_trip() -> None:
    for code, cls in protocol.ERRORS.items():
        err = protocol.error_from_wire(cls("boom").to_wire())
        assert type(err) is cls and err.code == code and err.message == "boom"
    assert isinstance(protocol.error_from_wire({"code": "Weird"}), protocol.Internal)
    assert isinstance(protocol.error_from_wire("junk"), protocol.Internal)


def test_rootfs_plans(tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    for d in ("l1", "l2", "up", "wk"):
        (layers / d).mkdir(parents=True)
    roots = [str(layers)]
    l1, l2, up, wk = (str(layers / d) for d in ("l1", "l2", "up", "wk"))
    assert mounts.plan({"kind": "none"}, roots) == []
    (m,) = mounts.plan({"kind": "layers", "lowers": [l1, l2], "upper": up, "work": wk}, roots)
    assert m.type == "overlay" and m.options == ("index=off", "userxattr", f"workdir={wk}", f"upperdir={up}",
                                                 f"lowerdir={l1}:{l2}")
    (m,) = mounts.plan({"kind": "layers", "lowers": [l1]}, roots)
    assert (m.type, m.source, m.options) == ("bind", l1, ("ro", "rbind"))
    (m,) = mounts.plan({"kind": "mounts", "mounts": [{"type": "overlay", "source": "overlay", "options": [f"lowerdir={l1}:{l2}", f"upperdir={up}", f"workdir={wk}"]}]}, roots)
    assert m.options[0] == f"lowerdir={l1}:{l2}"
    bad = [
        {"kind": "layers", "lowers": ["/etc"]},
        {"kind": "layers", "lowers": [l1], "upper": "/tmp", "work": wk},
        {"kind": "layers", "lowers": [os.path.join(l1, "..", "..")]},
        {"kind": "mounts", "mounts": [{"type": "bind", "source": "/", "options": ["rbind"]}]},
        {"kind": "mounts", "mounts": [{"type": "overlay", "source": "overlay", "options": ["lowerdir=/etc:" + l1]}]},
        {"kind": "mounts", "mounts": [{"type": "ext4", "source": "/dev/sda1", "options": []}]},
        {"kind": "mounts", "mounts": ["nope"]},
        {"kind": "weird"},
        "none",
    ]
    for rootfs in bad:
        with pytest.raises(protocol.InvalidArgument):
            mounts.plan(rootfs, roots)


def test_mount_options_like_containerd() -> None:
    flags, prop, data = mounts.parse_options(["rbind", "ro", "nosuid", "rprivate", "index=off", "rw"])
    assert flags == MS_BIND | MS_REC | MS_NOSUID  # rw clears ro
    assert prop == MS_PRIVATE | MS_REC
    assert data == "index=off"
    with pytest.raises(protocol.Unimplemented):
        mounts.parse_options(["loop"])


def test_compact_lowerdirs() -> None:
    lowers = [f"/var/lib/fractal/layers/{i}/fs" for i in range(200)]
    opts = ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=" + ":".join(lowers)]
    cwd, new = mounts.compact_lowerdirs(opts)
    assert cwd == "/var/lib/fractal/layers"
    assert new[3].split("=", 1)[1].split(":")[:2] == ["0/fs", "1/fs"]
    assert len(",".join(new)) < stack.PAGE_SIZE
    assert mounts.compact_lowerdirs(opts[:3] + ["lowerdir=/a:/b"]) == (None, tuple(opts[:3] + ["lowerdir=/a:/b"]))
