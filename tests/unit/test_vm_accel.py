"""KVM only with a usable /dev/kvm and vmx/svm; TCG otherwise; FRACTAL_ACCEL overrides."""

from __future__ import annotations

import pytest

from ccpu.vm.accel import Probe, cpu_has_virt, decide


def test_kvm_needs_both_device_and_cpu_flag() -> None:
    assert decide(Probe(kvm_rw=True, cpu_virt=True)).accel == "kvm"
    assert decide(Probe(kvm_rw=True, cpu_virt=False)).accel == "tcg"  # this machine: KVM guests hang
    assert decide(Probe(kvm_rw=False, cpu_virt=True)).accel == "tcg"
    assert "vmx/svm" in decide(Probe(kvm_rw=True, cpu_virt=False)).reason


def test_override() -> None:
    assert decide(Probe(kvm_rw=False, cpu_virt=False, override="kvm")).accel == "kvm"
    assert decide(Probe(kvm_rw=True, cpu_virt=True, override="TCG")).accel == "tcg"
    with pytest.raises(ValueError):
        decide(Probe(kvm_rw=True, cpu_virt=True, override="hvf"))


def test_cpuinfo_flags() -> None:
    assert cpu_has_virt("processor\t: 0\nflags\t\t: fpu vme vmx sse\n")
    assert cpu_has_virt("flags : fpu svm\n")
    assert not cpu_has_virt("flags\t\t: fpu vme sse hypervisor\nvmx flags\t: ept\n")
