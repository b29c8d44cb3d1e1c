"""hack/guest_repro.py's comparison (issue 12 "Must hold": the guest build is reproducible): every
hash a manifest records is compared, a hash only one build has is a difference, the verdict names
what differs."""

from __future__ import annotations

from hack import guest_repro

MANIFEST = {
    "initramfs": {"file": "initramfs.cpio", "sha256": "a" * 64, "size": 10},
    "image": {"file": "system.erofs", "sha256": "b" * 64, "files": 3},
    "ready_zip": {"sha256": "c" * 64, "modules": ["base64"]},
    "inputs_key": "d" * 64,
    "options": {"kernel": "e" * 64, "uki_stub": "f" * 64, "layout": "image", "level": 6},
    "uki": {"sha256": "1" * 64, "pcr11": "2" * 64, "sections": {".linux": "3" * 64, ".initrd": "a" * 64}},
    "kernel_image": {"path": "/cache/kernel/vmlinux-pvh", "sha256": "4" * 64},
    "build_python": "3.11.7",
}


def test_every_recorded_hash_is_collected_and_nothing_else() -> None:
    got = guest_repro.manifest_hashes(MANIFEST)
    assert got == {
        "initramfs.sha256": "a" * 64, "image.sha256": "b" * 64, "ready_zip.sha256": "c" * 64,
        "inputs_key": "d" * 64, "options.kernel": "e" * 64, "options.uki_stub": "f" * 64,
        "uki.sha256": "1" * 64, "uki.pcr11": "2" * 64, "uki.sections..linux": "3" * 64,
        "uki.sections..initrd": "a" * 64, "kernel_image.sha256": "4" * 64,
    }


def test_equal_builds_exit_0() -> None:
    one = guest_repro.build_hashes(MANIFEST, {"initramfs.cpio": "a" * 64, "manifest.json": "9" * 64})
    rows = guest_repro.compare(one, dict(one))
    assert all(r.equal for r in rows) and len(rows) == 13
    status, line = guest_repro.verdict(rows)
    assert status == 0 and "all 13 hashes equal" in line
    table = guest_repro.render(rows)
    assert "file:manifest.json" in table and "DIFFERS" not in table


def test_a_different_hash_is_named() -> None:
    other = {**MANIFEST, "image": {**MANIFEST["image"], "sha256": "0" * 64}}
    rows = guest_repro.compare(guest_repro.build_hashes(MANIFEST, {}), guest_repro.build_hashes(other, {}))
    status, line = guest_repro.verdict(rows)
    assert status == 1 and line.endswith("hashes differ: image.sha256")
    line_of = {ln.split()[0]: ln.split()[1:] for ln in guest_repro.render(rows).splitlines()[1:]}
    assert line_of["image.sha256"] == ["b" * 16, "0" * 16, "DIFFERS"]
    assert line_of["initramfs.sha256"] == ["a" * 16, "a" * 16, "same"]


def test_a_hash_only_one_build_has_differs() -> None:
    two = {k: v for k, v in MANIFEST.items() if k != "ready_zip"}
    rows = guest_repro.compare(guest_repro.build_hashes(MANIFEST, {"x": "5" * 64}),
                               guest_repro.build_hashes(two, {}))
    status, line = guest_repro.verdict(rows)
    assert status == 1 and "file:x" in line and "ready_zip.sha256" in line
    assert "(absent)" in guest_repro.render(rows)


def test_nothing_to_compare_is_not_reproducible() -> None:
    assert guest_repro.verdict([])[0] == 1
