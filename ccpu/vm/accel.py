"""KVM or TCG?  A pure decision plus a thin probe of the host.

/dev/kvm existing is not enough: on hosts without hardware virtualisation
exposed to us (no vmx/svm in /proc/cpuinfo, e.g. a VM without nested
virtualisation) the device opens fine but a KVM guest hangs at "Booting from
ROM".  So KVM needs both: /dev/kvm opens read-write AND the CPU advertises
vmx or svm.  Otherwise TCG, which is slow but always works.
``FRACTAL_ACCEL=kvm|tcg`` overrides the decision (kvm then fails loudly in
QEMU if it cannot work).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

ACCELS = ("kvm", "tcg")


@dataclass(frozen=True)
class Probe:
    """What the host offers."""

    kvm_rw: bool  # /dev/kvm opened O_RDWR
    cpu_virt: bool  # vmx or svm in the cpu flags
    override: str | None = None  # FRACTAL_ACCEL


@dataclass(frozen=True)
class Choice:
    accel: str
    reason: str


def cpu_has_virt(cpuinfo: str) -> bool:
    """Whether any `flags` line of /proc/cpuinfo lists vmx (Intel) or svm (AMD)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and {"vmx", "svm"} & set(value.split()):
            return True
    return False


def decide(p: Probe) -> Choice:
    if p.override:
        ov = p.override.strip().lower()
        if ov not in ACCELS:
            raise ValueError(f"FRACTAL_ACCEL={p.override!r}: expected one of {', '.join(ACCELS)}")
        return Choice(ov, f"FRACTAL_ACCEL={ov}")
    if p.kvm_rw and p.cpu_virt:
        return Choice("kvm", "/dev/kvm is usable and the CPU has vmx/svm")
    if not p.kvm_rw:
        return Choice("tcg", "/dev/kvm cannot be opened read-write")
    return Choice("tcg", "/dev/kvm exists but the CPU has no vmx/svm flag (KVM guests would hang)")


def probe() -> Probe:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
        kvm = True
    except OSError:
        kvm = False
    try:
        with open("/proc/cpuinfo") as f:
            virt = cpu_has_virt(f.read())
    except OSError:
        virt = False
    return Probe(kvm_rw=kvm, cpu_virt=virt, override=os.environ.get("FRACTAL_ACCEL") or None)


def choose() -> Choice:
    """Probe the host and decide; the choice is logged (it explains a 10x speed difference)."""
    c = decide(probe())
    log.info("accelerator %s: %s", c.accel, c.reason)
    return c
