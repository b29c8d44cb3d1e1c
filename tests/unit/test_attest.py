"""The host's attestation check (ccpu/attest.py) against a real TPM: an swtpm manufactured with
fractal's local CA (ccpu/vm/tpm.py), driven with tpm2-tools the way the guest's agent does
(ccpu/agent/tpm.py), its PCR 11 extended the way systemd-stub measures UKI sections.

Recorded once per module: the keys, an opened credential and a quote over a known nonce; each
test then checks that reply, or a reply changed in one way, and expects the verdict."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ccpu import attest
from ccpu.agent import tpm as agent_tpm
from ccpu.guest import uki
from ccpu.vm import tpm

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None or shutil.which("tpm2") is None
                                or not os.path.exists(tpm.LOCALCA), reason="needs swtpm, swtpm-tools, tpm2-tools")

SECTIONS = {".linux": hashlib.sha256(b"kernel").hexdigest(), ".osrel": hashlib.sha256(b"ID=x\n").hexdigest(),
            ".cmdline": hashlib.sha256(b"console=ttyS0").hexdigest(),
            ".initrd": hashlib.sha256(b"initramfs").hexdigest()}
CMDLINE = "console=ttyS0 fractal.mode=agent"
BOUND_KEY = hashlib.sha256(b"the SPKI of the machine's boot TLS key").digest()
OTHER_KEY = hashlib.sha256(b"the SPKI of another machine's key").digest()


class Recorded:
    def __init__(self, keys: attest.Keys, reply: dict, nonce: bytes, secret: bytes, ca: tpm.Ca) -> None:
        self.keys, self.reply, self.nonce, self.secret, self.ca = keys, reply, nonce, secret, ca
        # a machine's quote (ccpu/agent/tpm.py with bind=): qualifying data names TLS key BOUND_KEY
        self.bound_reply: dict = {}
        self.bound_nonce = b""

    @property
    def cas(self) -> list[Path]:
        return [self.ca.root_cert, self.ca.issuer_cert]


def _measure_like_the_stub(run) -> None:  # noqa: ANN001
    for name in uki.MEASURED_ORDER:
        if name in SECTIONS:
            named = hashlib.sha256(name.encode() + bytes(1)).hexdigest()
            run("pcrextend", f"11:sha256={named}")
            run("pcrextend", f"11:sha256={SECTIONS[name]}")
    cmdline = hashlib.sha256((CMDLINE + chr(0)).encode("utf-16-le")).hexdigest()
    run("pcrextend", f"12:sha256={cmdline}")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    d = tmp_path_factory.mktemp("tpm")
    ca = tpm.ensure_ca(d / "ca")
    tpm.manufacture(d / "state", ca)
    sock = d / "srv.sock"
    proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={d / 'state'}", "--server",
                             f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={sock}.ctrl",
                             "--flags", "startup-clear"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "TPM2TOOLS_TCTI": f"swtpm:path={sock}"}

    def run(*argv: str) -> None:  # no resource manager here: flush what each command left loaded
        subprocess.run(["tpm2", *argv], check=True, capture_output=True, env=env, cwd=d)
        subprocess.run(["tpm2", "flushcontext", "-t"], check=True, capture_output=True, env=env)

    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        _measure_like_the_stub(run)
        run("createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pem", "-f", "pem")
        run("createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256", "-s", "rsassa",
            "-u", "ak.pem", "-f", "pem", "-n", "ak.name")
        run("nvread", agent_tpm.EK_CERT_NV, "-C", "o", "-o", "ek.crt")
        b64 = {n: base64.b64encode((d / f).read_bytes()).decode()
               for n, f in (("ek_public", "ek.pem"), ("ak_public", "ak.pem"), ("ak_name", "ak.name"),
                            ("ek_certificate", "ek.crt"))}
        keys = attest.Keys.from_reply(b64)
        secret = os.urandom(attest.SECRET_BYTES)
        (d / "cred").write_bytes(attest.make_credential(keys, secret))
        subprocess.run(["tpm2", "startauthsession", "--policy-session", "-S", "session.ctx"], check=True,
                       capture_output=True, env=env, cwd=d)
        subprocess.run(["tpm2", "policysecret", "-S", "session.ctx", "-c", "e"], check=True, capture_output=True,
                       env=env, cwd=d)
        run("activatecredential", "-c", "ak.ctx", "-C", "ek.ctx", "-i", "cred", "-o", "secret",
            "-P", "session:session.ctx")
        nonce = attest.new_nonce()
        run("quote", "-c", "ak.ctx", "-l", agent_tpm.PCR_SELECTION, "-q", nonce.hex(), "-g", "sha256",
            "-m", "quote.msg", "-s", "quote.sig", "-o", "quote.pcrs")
        files = (("secret", "secret"), ("message", "quote.msg"), ("signature", "quote.sig"),
                 ("pcr_values", "quote.pcrs"))
        reply = {k: base64.b64encode((d / f).read_bytes()).decode() for k, f in files}
        rec = Recorded(keys, reply, nonce, secret, ca)
        rec.bound_nonce = attest.new_nonce()
        run("quote", "-c", "ak.ctx", "-l", agent_tpm.PCR_SELECTION, "-q",
            agent_tpm.qualifying_data(rec.bound_nonce.hex(), BOUND_KEY), "-g", "sha256",
            "-m", "quote.msg", "-s", "quote.sig", "-o", "quote.pcrs")
        rec.bound_reply = {**{k: base64.b64encode((d / f).read_bytes()).decode() for k, f in files},
                           "bound_key": BOUND_KEY.hex()}
        return rec
    finally:
        proc.terminate()
        proc.wait(10)


def _want() -> attest.Expected:
    return attest.expected({"uki": {"sections": SECTIONS}}, CMDLINE)


def test_a_quote_of_the_predicted_pcrs_verifies(recorded: Recorded) -> None:
    subject = attest.check_ek(recorded.keys, recorded.cas)
    v = attest.check_quote(recorded.keys, recorded.reply, nonce=recorded.nonce, secret=recorded.secret,
                           want=_want(), ek_subject=subject)
    # the prediction from the sections is what the TPM computed from the same extends
    assert v.pcrs[11] == uki.pcr11(SECTIONS)
    assert v.pcrs[12] == uki.cmdline_pcr12(CMDLINE)
    assert set(v.pcrs) == set(agent_tpm.PCRS)


def test_a_replayed_quote_is_refused(recorded: Recorded) -> None:
    """The same (valid, signed) quote answering a new request: its nonce is the old one."""
    with pytest.raises(attest.AttestationError, match="replayed"):
        attest.check_quote(recorded.keys, recorded.reply, nonce=attest.new_nonce(), secret=recorded.secret,
                           want=_want())


def test_another_initramfs_is_refused_naming_pcr_11(recorded: Recorded) -> None:
    other = {**SECTIONS, ".initrd": hashlib.sha256(b"initramfs, one byte changed").hexdigest()}
    want = attest.expected({"uki": {"sections": other}}, CMDLINE)
    with pytest.raises(attest.AttestationError, match=r"PCR 11 \(the UKI's sections .*\.initrd=") as e:
        attest.check_quote(recorded.keys, recorded.reply, nonce=recorded.nonce, secret=recorded.secret, want=want)
    assert "PCR 12" not in str(e.value)


def test_another_command_line_is_refused_naming_pcr_12(recorded: Recorded) -> None:
    want = attest.expected({"uki": {"sections": SECTIONS}}, CMDLINE + " init=/bin/sh")
    with pytest.raises(attest.AttestationError, match=r"PCR 12 \(the kernel command line"):
        attest.check_quote(recorded.keys, recorded.reply, nonce=recorded.nonce, secret=recorded.secret, want=want)


def test_a_changed_signature_is_refused(recorded: Recorded) -> None:
    sig = bytearray(base64.b64decode(recorded.reply["signature"]))
    sig[-1] ^= 1
    reply = {**recorded.reply, "signature": base64.b64encode(bytes(sig)).decode()}
    with pytest.raises(attest.AttestationError, match="does not verify"):
        attest.check_quote(recorded.keys, reply, nonce=recorded.nonce, secret=recorded.secret, want=_want())


def test_an_unopened_credential_is_refused(recorded: Recorded) -> None:
    with pytest.raises(attest.AttestationError, match="did not open the credential"):
        attest.check_quote(recorded.keys, recorded.reply, nonce=recorded.nonce, secret=os.urandom(32),
                           want=_want())


def test_an_ek_certificate_of_another_ca_is_refused(recorded: Recorded, tmp_path: Path) -> None:
    other = tpm.ensure_ca(tmp_path / "ca")
    tpm.manufacture(tmp_path / "state", other)  # makes the other CA
    with pytest.raises(attest.AttestationError, match="does not (chain|verify)"):
        attest.check_ek(recorded.keys, [other.root_cert, other.issuer_cert])


def test_an_ek_certificate_for_another_key_is_refused(recorded: Recorded) -> None:
    keys = attest.Keys(recorded.keys.ak_public_pem, recorded.keys.ek_certificate, recorded.keys.ak_public_pem,
                       recorded.keys.ak_name)
    with pytest.raises(attest.AttestationError, match="another key"):
        attest.check_ek(keys, recorded.cas)


def test_a_build_without_uki_cannot_be_attested() -> None:
    with pytest.raises(attest.AttestationError, match="no unified kernel image"):
        attest.expected({"initramfs": {}}, None)


def test_bad_replies_are_refused_by_name() -> None:
    with pytest.raises(attest.AttestationError, match="ak_name"):
        attest.Keys.from_reply({"ek_public": "eA==", "ak_public": "eA==", "ek_certificate": ""})
    with pytest.raises(attest.AttestationError, match="not base64"):
        attest.Keys.from_reply({"ek_public": "!!", "ak_public": "eA==", "ak_name": "eA==", "ek_certificate": ""})


# --- a machine's quote binds its boot TLS key (issue 15 item 5) ---------------------------------


def test_a_quote_naming_the_sessions_tls_key_verifies(recorded: Recorded) -> None:
    v = attest.check_quote(recorded.keys, recorded.bound_reply, nonce=recorded.bound_nonce, secret=recorded.secret,
                           want=_want(), tls_key=BOUND_KEY)
    assert v.pcrs[11] == uki.pcr11(SECTIONS)


def test_a_quote_naming_another_tls_key_is_refused_as_a_relay(recorded: Recorded) -> None:
    """A relay: the host talks TLS to OTHER_KEY, which forwards a genuine machine's quote (fresh
    nonce and all) naming the machine's own key."""
    with pytest.raises(attest.AttestationError, match="names another TLS key.*relayed"):
        attest.check_quote(recorded.keys, recorded.bound_reply, nonce=recorded.bound_nonce,
                           secret=recorded.secret, want=_want(), tls_key=OTHER_KEY)


def test_a_relay_that_lies_about_the_key_is_still_refused(recorded: Recorded) -> None:
    reply = {**recorded.bound_reply, "bound_key": OTHER_KEY.hex()}
    with pytest.raises(attest.AttestationError, match="not for this request"):
        attest.check_quote(recorded.keys, reply, nonce=recorded.bound_nonce, secret=recorded.secret,
                           want=_want(), tls_key=OTHER_KEY)


def test_a_bound_quote_with_an_old_nonce_is_refused(recorded: Recorded) -> None:
    with pytest.raises(attest.AttestationError, match="replayed"):
        attest.check_quote(recorded.keys, recorded.bound_reply, nonce=attest.new_nonce(), secret=recorded.secret,
                           want=_want(), tls_key=BOUND_KEY)


def test_an_unbound_quote_is_refused_where_a_key_must_be_named(recorded: Recorded) -> None:
    """A machine's quote over the bare nonce proves nothing about the TLS peer: refused."""
    with pytest.raises(attest.AttestationError, match="not for this request"):
        attest.check_quote(recorded.keys, recorded.reply, nonce=recorded.nonce, secret=recorded.secret,
                           want=_want(), tls_key=BOUND_KEY)


def test_a_uki_booted_from_a_boot_entry_predicts_pcr4_after_the_separator_and_pcr12_zero() -> None:
    u = {"sections": SECTIONS, "authenticode": "11" * 32, "linux_authenticode": "22" * 32, "boot": "entry",
         "cmdline": "console=ttyS0 fractal.ca=sha256:ab"}
    want = attest.expected({"uki": u}, None)
    assert want.pcrs[uki.PCR_BOOT_APP] == uki.pcr4("11" * 32, "22" * 32, direct_kernel=False)
    assert want.pcrs[uki.PCR_BOOT_APP] != attest.expected({"uki": {**u, "boot": "loader"}}, None).pcrs[4]
    assert want.pcrs[uki.PCR_CMDLINE] == bytes(32)
    assert "no command line from a loader" in want.meaning[uki.PCR_CMDLINE]
    assert "from a boot entry" in want.meaning[uki.PCR_BOOT_APP]
    # a loader's command line cannot be predicted for it, and an unknown boot is refused
    with pytest.raises(attest.AttestationError, match="built-in command line"):
        attest.expected({"uki": u}, "console=ttyS0")
    with pytest.raises(attest.AttestationError, match="unknown"):
        attest.expected({"uki": {**u, "boot": "pxe"}}, None)
    # a build's manifest of before the field: booted by the loader, as then
    old = attest.expected({"uki": {k: v for k, v in u.items() if k != "boot"}}, "x")
    assert old.pcrs[uki.PCR_BOOT_APP] == uki.pcr4("11" * 32, "22" * 32) and old.pcrs[12] == uki.cmdline_pcr12("x")
