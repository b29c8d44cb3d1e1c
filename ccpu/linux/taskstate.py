"""The task state machine, once: which state a process or container must be in for each
operation, and where the operation leaves it.  The shim (``shim/state.py``) and the agent
(``ccpu/agent/container.py``) both check against this table, so they cannot drift apart.

As containerd's runc shim::

    CREATED --start--> RUNNING --pause--> PAUSED --resume--> RUNNING
       |                  |                  |
       +------exit--------+-------exit-------+----> STOPPED --delete--> (gone)
    CREATED --delete--> (gone)

Status values are containerd.types.task Status numbers (what the shim reports to containerd);
``str()`` of one is its lower-case name, the agent protocol's ``status`` word.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Status(enum.IntEnum):
    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5  # the shim's, while it waits for the agent's pause

    def __str__(self) -> str:
        return self.name.lower()


class Op(enum.Enum):
    START = "start"  # a process (init or exec)
    DELETE = "delete"  # a process
    EXEC = "exec"  # add an exec: the container's init
    START_EXEC = "start an exec"  # the container's init, when an exec is started in it
    PAUSE = "pause"  # the container's init
    RESUME = "resume"  # the container's init
    UPDATE = "update"  # new resources: the container's init
    RESTACK = "restack"  # live layers (ccpu/agent/live.py): the container's init


#: the states an operation is allowed in (of the process, or of the container's init)
ALLOWED: Mapping[Op, frozenset[Status]] = {
    Op.START: frozenset({Status.CREATED}),
    Op.DELETE: frozenset({Status.CREATED, Status.STOPPED}),
    Op.EXEC: frozenset({Status.RUNNING, Status.PAUSED}),
    Op.START_EXEC: frozenset({Status.RUNNING}),
    Op.PAUSE: frozenset({Status.RUNNING}),
    Op.RESUME: frozenset({Status.PAUSED}),
    Op.UPDATE: frozenset({Status.RUNNING, Status.PAUSED}),
    Op.RESTACK: frozenset({Status.CREATED, Status.RUNNING, Status.PAUSED}),
}

#: where a successful operation leaves the state (operations not here leave it as it is)
AFTER: Mapping[Op, Status] = {
    Op.START: Status.RUNNING,
    Op.PAUSE: Status.PAUSED,
    Op.RESUME: Status.RUNNING,
}

def allowed(op: Op, status: Status) -> bool:
    return status in ALLOWED[op]


def after(op: Op, status: Status) -> Status:
    """The state once ``op`` succeeded, for a process now in ``status``: the op's new state if
    ``status`` is still one the op is allowed in, else ``status`` (what happened meanwhile, e.g.
    an exit, wins)."""
    return AFTER.get(op, status) if allowed(op, status) else status
