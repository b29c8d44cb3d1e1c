"""KVM or TCG?  A pure decision plus a thin probe of the host.

/dev/kvm existing is not enough: on hosts without hardware virtualisation
exposed to us (no vmx/svm in /proc/cpuinfo, e.g. a VM without nested
virtualisation) the device opens fine but a KVM guest hangs at "Booting from
ROM".  So KVM needs both: /dev/kvm opens read-write AND the CPU advertises
vmx or svm.  Otherwise TCG, which is slow but always works.
``FRACTAL_ACCEL=kvm|tcg|hvf`` overrides the decision (kvm then fails loudly in
QEMU if it cannot work).

On macOS (untested here: ccpu/vm/hostos.py) the hardware accelerator is Hypervisor.framework
(``hvf``), usable when ``sysctl kern.hv_support`` is 1 AND the Mac's CPU is x86-64: hvf runs
only guests of the host's own architecture and fractal's guest is x86-64 today, so an Apple
Silicon Mac gets TCG (an arm64 guest is what it would take: docs/vm.md "arm64").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

ACCELS = ("kvm", "tcg", "hvf")
HOST_ACCELS = {"Linux": ("kvm", "tcg"), "Darwin": ("hvf", "tcg")}


@dataclass(frozen=True)
class Probe:
    """What the host offers."""

    kvm_rw: bool  # /dev/kvm opened O_RDWR
    cpu_virt: bool  # vmx or svm in the cpu flags
    override: str | None = None  # FRACTAL_ACCEL
    system: str = "Linux"  # platform.system()
    machine: str = "x86_64"  # platform.machine(): the host CPU's architecture
    hv_support: bool = False  # macOS: sysctl kern.hv_support == 1


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
        if ov not in HOST_ACCELS.get(p.system, ACCELS):
            raise ValueError(f"FRACTAL_ACCEL={ov}: not an accelerator of {p.system} (kvm: Linux, hvf: macOS)")
        return Choice(ov, f"FRACTAL_ACCEL={ov}")
    if p.system == "Darwin":
        if p.machine not in ("x86_64", "amd64"):
            return Choice("tcg", f"hvf runs only {p.machine} guests and fractal's guest is x86-64")
        if p.hv_support:
            return Choice("hvf", "macOS Hypervisor.framework (kern.hv_support = 1)")
        return Choice("tcg", "kern.hv_support is not 1 (no Hypervisor.framework)")
    if p.kvm_rw and p.cpu_virt:
        return Choice("kvm", "/dev/kvm is usable and the CPU has vmx/svm")
    if not p.kvm_rw:
        return Choice("tcg", "/dev/kvm cannot be opened read-write")
    return Choice("tcg", "/dev/kvm exists but the CPU has no vmx/svm flag (KVM guests would hang)")


def probe() -> Probe:
    import platform
    if platform.system() == "Darwin":
        import subprocess
        try:
            hv = subprocess.run(["sysctl", "-n", "kern.hv_support"], capture_output=True, text=True,
                                timeout=5).stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            hv = False
        return Probe(kvm_rw=False, cpu_virt=False, override=os.environ.get("FRACTAL_ACCEL") or None,
                     system="Darwin", machine=platform.machine(), hv_support=hv)
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
