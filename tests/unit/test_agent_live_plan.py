"""The pure parts of live layers (ccpu.agent.live): planning a restack, helper messages, state."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from ccpu.agent import live, mounts, protocol
from ccpu.linux import mountinfo
from ccpu.linux.mount import MS_NODEV, MS_NOSUID, MS_RDONLY, MS_RELATIME
from ccpu.stack import LayerStack

L = ["/l/top", "/l/mid", "/l/base"]


def test_add_on_top_by_default() -> None:
    assert live.plan_restack(L, add=["/l/new"]) == ["/l/new", *L]


def test_add_block_keeps_its_order_at_positions() -> None:
    assert live.plan_restack(L, add=["/l/x", "/l/y"], position="top") == ["/l/x", "/l/y", *L]
    assert live.plan_restack(L, add=["/l/x", "/l/y"], position="bottom") == [*L, "/l/x", "/l/y"]
    assert live.plan_restack(L, add=["/l/x"], position=1) == ["/l/top", "/l/x", "/l/mid", "/l/base"]
    assert live.plan_restack(L, add=["/l/x"], position=3) == [*L, "/l/x"]


def test_remove_then_add_position_counts_the_remaining_stack() -> None:
    assert live.plan_restack(L, add=["/l/x"], remove=["/l/top"], position=1) == ["/l/mid", "/l/x", "/l/base"]
    assert live.plan_restack(L, remove=["/l/mid"]) == ["/l/top", "/l/base"]


def test_a_removed_and_added_layer_moves() -> None:
    assert live.plan_restack(L, add=["/l/top"], remove=["/l/top"], position="bottom") == ["/l/mid", "/l/base", "/l/top"]


def test_replace_every_layer_is_allowed() -> None:
    assert live.plan_restack(L, add=["/l/v2"], remove=L) == ["/l/v2"]


def test_errors() -> None:
    with pytest.raises(protocol.NotFound):
        live.plan_restack(L, remove=["/l/other"])
    with pytest.raises(protocol.AlreadyExists):
        live.plan_restack(L, add=["/l/mid"])
    with pytest.raises(protocol.FailedPrecondition):
        live.plan_restack(L, remove=L)
    with pytest.raises(protocol.InvalidArgument):
        live.plan_restack(L)  # nothing to do
    with pytest.raises(protocol.InvalidArgument):
        live.plan_restack(L, add=["/l/x", "/l/x"])
    with pytest.raises(protocol.InvalidArgument):
        live.plan_restack(L, remove=["/l/top", "/l/top"])
    for bad in (-1, 4, "middle", True, 1.5, None):
        with pytest.raises(protocol.InvalidArgument):
            live.plan_restack(L, add=["/l/x"], position=bad)  # type: ignore[arg-type]
    with pytest.raises(protocol.InvalidArgument, match="overlaps"):
        live.plan_restack(L, add=["/c/upper/sub"], upper="/c/upper", work="/c/work")
    with pytest.raises(protocol.InvalidArgument, match="overlaps"):
        live.plan_restack(L, add=["/c"], upper="/c/upper", work="/c/work")
    with pytest.raises(protocol.InvalidArgument, match="overlaps"):
        live.plan_restack(L, add=["/c/work"], upper="/c/upper", work="/c/work")
    with pytest.raises(protocol.InvalidArgument, match="at most"):
        live.plan_restack(L, add=[f"/m/{i}" for i in range(live.MAX_LOWERS)])


def test_error_checks_do_not_depend_on_order() -> None:
    # a sibling whose name extends the upper's is not inside it
    assert live.plan_restack(L, add=["/c/upper2"], upper="/c/upper", work="/c/work") == ["/c/upper2", *L]


def test_fresh_work_name(tmp_path: Path) -> None:
    base = str(tmp_path / "work")
    assert live.fresh_work_name(base) == base + ".1"
    (tmp_path / "work.1").mkdir()
    assert live.fresh_work_name(base) == base + ".2"
    assert live.fresh_work_name(base, taken=[base + ".2"]) == base + ".3"


def test_submounts_are_the_direct_children_of_the_root() -> None:
    infos = mountinfo.parse([
        "20 10 0:1 / / rw - overlay overlay rw",
        "21 20 0:2 / /proc rw,nosuid - proc proc rw",
        "22 20 0:3 / /dev rw - tmpfs tmpfs rw",
        "23 22 0:4 / /dev/pts rw - devpts devpts rw",
        "24 21 0:3 /null /proc/kcore ro - tmpfs tmpfs rw",
        "25 20 8:1 /hosts /etc/hosts rw - ext4 /dev/sda1 rw",
        "26 20 8:1 /d /a\\040dir rw - ext4 /dev/sda1 rw",
    ])
    assert live.submounts(infos, 20) == ["proc", "dev", "etc/hosts", "a dir"]


def test_root_flags() -> None:
    assert live.root_flags({"rw", "relatime"}) == MS_RELATIME
    assert live.root_flags({"ro", "nosuid", "nodev"}) == MS_RDONLY | MS_NOSUID | MS_NODEV


def test_helper_messages_map_to_codes() -> None:
    assert isinstance(live.helper_error(f"setns:{errno.ENOENT}:gone"), protocol.FailedPrecondition)
    err = live.helper_error(f"target:{errno.ENOENT}:the new stack has no /proc")
    assert isinstance(err, protocol.FailedPrecondition) and "unchanged" in err.message and "/proc" in err.message
    assert isinstance(live.helper_error("root:0:x"), protocol.FailedPrecondition)
    assert isinstance(live.helper_error(f"pivot:{errno.EINVAL}:pivot_root: Invalid argument"), protocol.Internal)
    assert isinstance(live.helper_error("garbage"), protocol.Internal)


def test_initial_stack_is_the_validated_stack_create_mounts(tmp_path: Path) -> None:
    roots = [str(tmp_path)]
    for d in ("a", "b", "up", "wk"):
        (tmp_path / d).mkdir()
    assert live.initial_stack(mounts.rootfs_plan({"kind": "none"}, roots).stack) is None
    assert live.initial_stack(mounts.rootfs_plan({"kind": "mounts", "mounts": []}, roots).stack) is None
    wire = {"kind": "layers", "lowers": [str(tmp_path / "a"), str(tmp_path / "b")],
            "upper": str(tmp_path / "up"), "work": str(tmp_path / "wk")}
    ls = live.initial_stack(mounts.rootfs_plan(wire, roots).stack)
    assert ls is not None
    d = ls.describe()
    assert d["lowers"] == [str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve())]
    assert d["upper"] == str((tmp_path / "up").resolve()) and d["work"] == str((tmp_path / "wk").resolve())
    assert len(d["history"]) == 1 and d["history"][0]["added"] == d["lowers"]
    ro = live.initial_stack(mounts.rootfs_plan({"kind": "layers", "lowers": [str(tmp_path / "a")]}, roots).stack)
    assert ro is not None and ro.stack.upper is None and ro.describe()["work"] is None


def test_cleanup_removes_only_our_work_dirs(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work.1" / "work").mkdir(parents=True)
    (tmp_path / "work.1" / "work").chmod(0)
    ls = live.LiveStack(LayerStack(("/l",), str(tmp_path / "up"), str(tmp_path / "work.1")), str(tmp_path / "work"))
    ls.created_works.append(str(tmp_path / "work.1"))
    live.cleanup(ls)
    live.cleanup(None)
    assert [p.name for p in tmp_path.iterdir()] == ["work"]
