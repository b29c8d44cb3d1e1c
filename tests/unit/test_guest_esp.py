"""The USB-stick image (ccpu/guest/esp.py): its MBR, its reproducibility, the file at the removable media path."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from ccpu.guest import esp


def test_mbr_has_one_efi_system_partition_to_the_end() -> None:
    blob = esp.mbr(40960)
    assert len(blob) == 512 and blob[510:] == b"\x55\xaa"
    status, _, ptype, _, start, count = struct.unpack_from("<B3sB3sII", blob, 0x1BE)
    assert (status, ptype, start, count) == (0, 0xEF, 2048, 40960 - 2048)
    assert blob[0x1CE:0x1FE] == bytes(48)  # the other three entries empty
    with pytest.raises(esp.EspError):
        esp.mbr(2048)


def test_size_fits_the_application_in_whole_mib() -> None:
    assert esp.size_for(1000) == esp.MIN_SIZE
    big = esp.size_for(13_600_000)
    assert big % (1 << 20) == 0 and big > 13_600_000 + esp.START * esp.SECTOR


@pytest.mark.skipif(bool(esp.missing_tools()), reason="no mtools")
def test_two_images_of_one_application_are_the_same_bytes(tmp_path: Path) -> None:
    app = tmp_path / "app.efi"
    app.write_bytes(bytes(range(256)) * 4000)
    one = esp.build(app, tmp_path / "a.img")
    time.sleep(1.1)  # mtools would stamp the clock without SOURCE_DATE_EPOCH
    two = esp.build(app, tmp_path / "b.img")
    assert one.sha256 == two.sha256 and (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    assert esp.read_app(one.path) == app.read_bytes()
    assert one.path.read_bytes()[:512] == esp.mbr(one.size // 512)
    assert one.describe()["path"] == "EFI/BOOT/BOOTX64.EFI"
    assert not list(tmp_path.glob("*.tmp*"))


def test_missing_mtools_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    app = tmp_path / "app.efi"
    app.write_bytes(b"x")
    with pytest.raises(esp.EspError, match="apt-get install mtools"):
        esp.build(app, tmp_path / "a.img")
