"""Shim logs through containerd (docs/logging.md): the shim daemon writes logrus-style records to
the ``<bundle>/log`` FIFO, containerd copies them into its own stderr (the env's containerd.log);
records logged while a request about a container is handled carry ``container=<id>`` and
``namespace=<ns>``; containerd at debug level passes ``-debug`` and the shim logs at debug."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from hack.containerd_env import FractalEnv

RUNTIME = "io.containerd.fractal.v1"
PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ ]+)')


def records(log: Path) -> list[dict[str, str]]:
    """Our shim's records in a containerd log: runtime=io.containerd.fractal.v1 with the shim's
    logger and pid fields (containerd's own records about our runtime have neither)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if f"runtime={RUNTIME}" not in line:
            continue
        rec = {k: json.loads(v) if v.startswith('"') else v for k, v in PAIR.findall(line)}
        if "logger" in rec and "pid" in rec:
            out.append(rec)
    return out


def wait_records(log: Path, pred, what: str, timeout: float = 10.0) -> list[dict[str, str]]:  # noqa: ANN001
    """The log is copied by containerd asynchronously: poll for a record that matches."""
    deadline = time.monotonic() + timeout
    while True:
        recs = records(log)
        if any(pred(r) for r in recs):
            return recs
        if time.monotonic() > deadline:
            shim = "\n".join(str(r) for r in recs[-20:])
            raise AssertionError(f"no shim record {what} in {log}; last shim records:\n{shim}")
        time.sleep(0.1)


def test_shim_records_carry_container_and_namespace(fenv: FractalEnv, registry, namespace: str) -> None:  # noqa: ANN001
    ref = registry.ref("busybox")
    fenv.pull(ref, namespace=namespace)
    cid = "logc1"
    r = fenv.run(ref, cid, "echo", "hi", namespace=namespace, runtime=RUNTIME)
    assert "hi" in r.stdout
    log = fenv.containerd.log_path
    recs = wait_records(log, lambda r: r.get("container") == cid and r.get("namespace") == namespace,
                        f"with container={cid} namespace={namespace}")
    mine = [r for r in recs if r.get("namespace") == namespace]
    created = [r for r in mine if r.get("msg", "").startswith(f"created {cid} ")]
    assert created, mine
    c = created[0]
    assert c["container"] == cid and c["sandbox"] == cid and c["level"] == "info"
    assert c["logger"] == "shim.task" and c["pid"].isdigit()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", c["time"]), c
    # the exit comes from an agent event, not a request: it still names the container
    recs = wait_records(log, lambda r: r.get("msg", "") == f"{cid} exited with 0", f"'{cid} exited with 0'")
    exited = [r for r in recs if r.get("msg", "") == f"{cid} exited with 0" and r.get("namespace") == namespace]
    assert exited and exited[0].get("container") == cid, exited
    mine = [r for r in records(log) if r.get("namespace") == namespace]
    # every record of this sandbox names its namespace and sandbox, request or not
    assert all(r.get("sandbox") == cid for r in mine), mine
    assert any(r.get("msg", "").startswith("serving ") and "container" not in r for r in mine), mine
    # containerd runs at info: no -debug, no debug records
    assert not any(r["level"] == "debug" for r in mine), mine


def test_containerd_debug_level_turns_on_shim_debug(registry) -> None:  # noqa: ANN001
    """containerd passes -debug to `start` when it logs at debug level; the shim honours it."""
    with FractalEnv(log_level="debug") as env:
        ns = env.new_namespace()
        ref = registry.ref("busybox")
        env.pull(ref, namespace=ns)
        cid = "logdbg1"
        env.run(ref, cid, "true", namespace=ns, runtime=RUNTIME)
        log = env.containerd.log_path
        recs = wait_records(log, lambda r: r.get("level") == "debug" and r.get("container") == cid
                            and r.get("msg") == "containerd.task.v2.Task Create",
                            f"level=debug for Create of {cid}")
        mine = [r for r in recs if r.get("namespace") == ns]
        methods = {r["msg"].rsplit(" ", 1)[-1] for r in mine if r["level"] == "debug"
                   and r.get("logger") == "shim.request"}
        assert {"Create", "Start", "Wait", "Delete"} <= methods, methods
        problems = env.remove_namespace(ns)
        assert not problems, problems
