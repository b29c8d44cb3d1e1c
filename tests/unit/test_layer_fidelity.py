"""Issue 16, the pure and local parts: opaque markers the shares carry, and the overlays over them.

The end-to-end check (runc vs host vs VM over virtiofs and 9p) is tests/integration/test_vm_fidelity.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccpu import stack
from ccpu.repo import SNAPSHOT_REF_LABEL, Repo, opaque

CHAIN1 = "sha256:" + "1" * 64

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* xattrs need CAP_SYS_ADMIN")


def test_every_repo_overlay_reads_user_markers() -> None:
    (rw,) = stack.snapshot_mounts(["/l/2", "/l/1"], "/u", "/w")
    (ro,) = stack.snapshot_mounts(["/l/2", "/l/1"])
    assert "userxattr" in rw.options and "userxattr" in ro.options
    (plain,) = stack.snapshot_mounts(["/l/2", "/l/1"], "/u", "/w", userxattr=False)
    assert "userxattr" not in plain.options


def test_nesting_splits_only_writable_userxattr_overlays_of_several_layers() -> None:
    (rw,) = stack.snapshot_mounts(["/l/2", "/l/1"], "/u", "/w")
    nested = stack.nest_for_trusted_upper(rw.options)
    assert nested is not None
    # the lower overlay reads the layers' user.overlay.* markers and has no upper
    assert nested.lower == ("index=off", "userxattr", "lowerdir=/l/2:/l/1")
    # the writable one marks its own opaque dirs with trusted.* (tmpfs has those) and gets its lower later
    assert nested.upper == ("index=off", "workdir=/w", "upperdir=/u")
    # one layer hides nothing below it: the same overlay without userxattr
    (one,) = stack.snapshot_mounts(["/l/1"], "/u", "/w")
    assert stack.nest_for_trusted_upper(one.options) == stack.NestedOverlay(
        None, ("index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l/1"))
    (ro,) = stack.snapshot_mounts(["/l/2", "/l/1"])
    (plain,) = stack.snapshot_mounts(["/l/2", "/l/1"], "/u", "/w", userxattr=False)
    assert [stack.nest_for_trusted_upper(m.options) for m in (ro, plain)] == [None, None]


def _opaque_dir(path: Path) -> None:
    path.mkdir(parents=True)
    os.setxattr(path, opaque.TRUSTED, b"y")


@needs_root
def test_mirror_marks_every_opaque_dir_and_nothing_else(tmp_path: Path) -> None:
    _opaque_dir(tmp_path / "a" / "opq")
    _opaque_dir(tmp_path / "b" / "c" / "deep")
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_text("x")
    os.symlink("/nonexistent", tmp_path / "link")
    assert opaque.mirror(tmp_path) == 2
    marked = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
              if not p.is_symlink() and opaque.USER in os.listxattr(p)}
    assert marked == {"a/opq", "b/c/deep"}
    assert opaque.mirror(tmp_path) == 0  # idempotent


@needs_root
def test_commit_mirrors_and_an_old_repo_is_migrated_once(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    repo = Repo(root, background_removal=False)
    try:
        assert (root / opaque.STAMP).exists()  # a new repo has nothing to migrate
        key = f"ns/1/extract {CHAIN1}"
        mounts = repo.prepare(key, "", {SNAPSHOT_REF_LABEL: CHAIN1})
        upper = Path(mounts[0].source)
        _opaque_dir(upper / "d")  # what containerd's OverlayConvertWhiteout writes for d/.wh..wh..opq
        repo.commit(f"ns/2/{CHAIN1}", key)
        (layer,) = repo.layers()
        assert os.getxattr(Path(layer.path) / "d", opaque.USER) == b"y"
        # a repo from before: markers without twins, no stamp
        os.removexattr(Path(layer.path) / "d", opaque.USER)
        (root / opaque.STAMP).unlink()
    finally:
        repo.close()
    repo = Repo(root, background_removal=False)
    try:
        (layer,) = repo.layers()
        assert os.getxattr(Path(layer.path) / "d", opaque.USER) == b"y"
        assert (root / opaque.STAMP).exists()
    finally:
        repo.close()
