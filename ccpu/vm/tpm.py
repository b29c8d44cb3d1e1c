"""A VM's TPM: an swtpm process per VM, manufactured with an EK certificate from fractal's local CA.

Why a fresh TPM per VM (``swtpm_setup`` into the VM's run dir at every boot, ~1.5 s): a VM's TPM is
its identity; sharing one state between VMs would give them all the same EK, and keeping them
would need a record of which sandbox owned which.  The state dies with the run dir.

The CA (``$FRACTAL_CACHE/attest/ca``, made once under a lock by swtpm's own ``swtpm_localca``) is
what the host trusts: an EK certificate it did not sign is refused (ccpu/attest.py).  On a real
machine it would be the TPM vendor's CA instead (docs/hardware.md).

swtpm serves QEMU's ``-tpmdev emulator`` on a control socket in the VM's workdir; ``--terminate``
ends it when QEMU closes the connection, and the machine runner also kills it like a virtiofsd
(a helper of the VM: no orphan swtpm).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SWTPM = "swtpm"
SWTPM_SETUP = "swtpm_setup"
LOCALCA = "/usr/bin/swtpm_localca"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
SOCKET = "swtpm.sock"  # in the VM's workdir
STATE_DIR = "tpm"  # in the VM's workdir
LOG = "swtpm.log"
VARS = "OVMF_VARS.fd"  # the VM's own copy of the firmware's variable store


class TpmError(RuntimeError):
    """The VM's TPM or firmware cannot be set up (what is missing is named)."""


@dataclass(frozen=True)
class Ca:
    """fractal's local EK CA: swtpm_localca's files."""

    dir: Path

    @property
    def root_cert(self) -> Path:
        return self.dir / "swtpm-localca-rootca-cert.pem"

    @property
    def issuer_cert(self) -> Path:
        return self.dir / "issuercert.pem"

    @property
    def setup_conf(self) -> Path:
        return self.dir / "swtpm_setup.conf"


def missing_tools() -> list[str]:
    """What a VM with a TPM needs and this host lacks (apt: ovmf swtpm swtpm-tools tpm2-tools)."""
    out = [t for t in (SWTPM, SWTPM_SETUP, "tpm2") if shutil.which(t) is None]
    return out + [p for p in (LOCALCA, OVMF_CODE, OVMF_VARS) if not os.path.exists(p)]


def ca_dir(cache: Path) -> Path:
    return cache / "attest" / "ca"


def ensure_ca(dir: Path) -> Ca:
    """The CA's configuration files; swtpm_localca makes the keys at the first EK it signs (under
    the lock taken by :func:`manufacture`)."""
    dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = Ca(dir)
    conf = dir / "swtpm-localca.conf"
    if not conf.exists():
        conf.write_text(f"statedir = {dir}\nsigningkey = {dir}/signkey.pem\n"
                        f"issuercert = {dir}/issuercert.pem\ncertserial = {dir}/certserial\n")
    opts = dir / "swtpm-localca.options"
    if not opts.exists():
        opts.write_text("--platform-manufacturer fractal\n--platform-version 1\n--platform-model QEMU\n")
    if not ca.setup_conf.exists():
        ca.setup_conf.write_text(f"create_certs_tool = {LOCALCA}\ncreate_certs_tool_config = {conf}\n"
                                 f"create_certs_tool_options = {opts}\nactive_pcr_banks = sha256\n")
    return ca


def manufacture(state: Path, ca: Ca) -> None:
    """A new TPM in ``state``: EK (RSA + ECC) with certificates signed by ``ca``, sha256 bank."""
    state.mkdir(mode=0o700, exist_ok=True)
    with open(ca.dir / ".lock", "w") as lock:  # one swtpm_localca at a time: it creates the CA once
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = subprocess.run([SWTPM_SETUP, "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
                              "--config", str(ca.setup_conf), "--overwrite", "--pcr-banks", "sha256"],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise TpmError(f"swtpm_setup: {(res.stderr or res.stdout).strip()[-500:]}")
    if not ca.issuer_cert.exists():
        raise TpmError(f"swtpm_setup made no CA in {ca.dir}")


def swtpm_argv(state: Path, socket_path: str) -> list[str]:
    """swtpm serving QEMU's tpm-emulator on a control socket; it ends when QEMU disconnects.  Pure."""
    return [SWTPM, "socket", "--tpm2", "--tpmstate", f"dir={state}", "--ctrl", f"type=unixio,path={socket_path}",
            "--terminate", "--log", f"file={LOG},level=1"]


def vars_copy(workdir: str) -> str:
    """The VM's own OVMF variable store (the firmware writes it; each VM has its own)."""
    dest = os.path.join(workdir, VARS)
    shutil.copyfile(OVMF_VARS, dest)
    os.chmod(dest, 0o600)
    return dest
