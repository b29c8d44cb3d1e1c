#!/usr/bin/env python3
"""How much sooner QMP tells a guest's end than QEMU's exit does (issue 12: "a guest
SHUTDOWN/RESET/GUEST_PANICKED event is seen at once").

Each round boots one guest (``ccpu.vm.machine.Machine``, ``vm run`` mode, a QMP channel watched
from boot: ``Qmp.watch``), has it power off (``echo o > /proc/sysrq-trigger``) or panic (``echo c``:
``panic=-1`` resets, ``-no-reboot`` ends QEMU), and takes, on the host's clock, the moment the
watcher reported the end and the moment QEMU's process exited -- the latter is what a sandbox
without the watcher learns the end from.  Alternated, medians.

    python3 hack/bench/guest_end.py [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from ccpu.guest import initramfs  # noqa: E402
from ccpu.vm import runproto  # noqa: E402
from ccpu.vm.machine import ConsoleFile, Machine, MachineSpec  # noqa: E402
from ccpu.vm.run import PORT_ERR, PORT_OUT, PORT_RUN  # noqa: E402

TRIGGERS = {"poweroff": "o", "panic": "c"}


def one(guest: initramfs.Guest, trigger: str) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory(prefix="fractal-bench-end-") as tmp:
        spec = MachineSpec(kernel=str(guest.kernel), initramfs=str(guest.initramfs), workdir=tmp,
                           system_image=str(guest.image) if guest.image else None,
                           console=ConsoleFile(os.path.join(tmp, "console.log")), mode="run", accel="auto",
                           ports=(PORT_RUN, PORT_OUT, PORT_ERR), hotplug_nics=1)
        vm = Machine(spec)
        seen: list[tuple[float, str]] = []
        got = threading.Event()
        try:
            vm.boot()
            assert vm.nics is not None and vm.nics.qmp is not None

            def on_end(words: str) -> None:
                seen.append((time.monotonic(), words))
                got.set()

            vm.nics.qmp.watch(on_end)
            vm.ports[PORT_RUN].sendall(runproto.request(runproto.new_marker(),
                                                        ["sh", "-c", f"sleep 1; echo {trigger} > /proc/sysrq-trigger"]))
            vm.wait(timeout=300)
            exited = time.monotonic()
            got.wait(5)
        finally:
            for c in vm.ports.values():
                c.close()
            vm.stop()
        if not seen:
            raise SystemExit(f"no guest end reported on QMP (trigger {trigger}); QEMU exited {vm.exit_status}")
        return {"lead_s": exited - seen[0][0], "words": seen[0][1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    guest = initramfs.build(offline=True)
    res: dict[str, list[dict[str, float | str]]] = {k: [] for k in TRIGGERS}
    for i in range(args.rounds):
        for name in (list(TRIGGERS) if i % 2 == 0 else list(TRIGGERS)[::-1]):
            r = one(guest, TRIGGERS[name])
            print(f"[{time.strftime('%H:%M:%S')}] round {i} {name}: QMP {float(r['lead_s']):.3f} s before QEMU's "
                  f"exit ({r['words']})", file=sys.stderr, flush=True)
            res[name].append(r)
    load = os.getloadavg()
    print(f"{args.rounds} rounds, load average {' '.join(f'{x:.1f}' for x in load)}:")
    for name, rs in res.items():
        leads = [float(r["lead_s"]) for r in rs]
        print(f"  {name:8s} the guest's end on QMP before QEMU's exit: median {statistics.median(leads):.3f} s "
              f"(min {min(leads):.3f}, max {max(leads):.3f}); reported as: {rs[0]['words']}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "load_average": load, "results": res}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
