"""ccpu/linux/taskstate.py: the one task state table the shim and the agent both check."""

from __future__ import annotations

import pytest

from ccpu.api.gen.containerd.types.task import task_pb2
from ccpu.linux.taskstate import AFTER, ALLOWED, Op, Status, after, allowed

S = Status


def test_status_numbers_are_containerds_and_words_are_the_protocols() -> None:
    assert {s.name: s.value for s in Status} == dict(task_pb2.Status.items())
    assert [str(s) for s in (S.CREATED, S.RUNNING, S.STOPPED, S.PAUSED)] == ["created", "running", "stopped", "paused"]
    assert f"{S.PAUSED}" == "paused"  # the agent's error messages


@pytest.mark.parametrize(("op", "ok"), [
    (Op.START, {S.CREATED}),
    (Op.DELETE, {S.CREATED, S.STOPPED}),
    (Op.EXEC, {S.RUNNING, S.PAUSED}),
    (Op.START_EXEC, {S.RUNNING}),
    (Op.PAUSE, {S.RUNNING}),
    (Op.RESUME, {S.PAUSED}),
    (Op.UPDATE, {S.RUNNING, S.PAUSED}),
    (Op.RESTACK, {S.CREATED, S.RUNNING, S.PAUSED}),
])
def test_what_each_operation_is_allowed_in(op: Op, ok: set[Status]) -> None:
    assert {s for s in Status if allowed(op, s)} == ok


def test_every_operation_has_a_row() -> None:
    assert set(ALLOWED) == set(Op)
    assert all(allowed(op, S.CREATED) or allowed(op, S.RUNNING) or allowed(op, S.PAUSED) for op in AFTER)


def test_after_an_operation_unless_an_exit_came_first() -> None:
    assert after(Op.START, S.CREATED) == S.RUNNING
    assert after(Op.PAUSE, S.RUNNING) == S.PAUSED
    assert after(Op.RESUME, S.PAUSED) == S.RUNNING
    assert after(Op.UPDATE, S.PAUSED) == S.PAUSED  # no state change
    for op in (Op.START, Op.PAUSE, Op.RESUME):
        assert after(op, S.STOPPED) == S.STOPPED  # exited while the runtime was asked
