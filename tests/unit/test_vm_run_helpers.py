"""vm run's share specs and console milestones (pure)."""

from __future__ import annotations

import pytest

from ccpu.vm.run import ShareSpec, console_milestones, parse_share


def test_parse_share() -> None:
    assert parse_share("/a", 0) == ShareSpec("/a", "/work", False)
    assert parse_share("/a", 1) == ShareSpec("/a", "/share1", False)
    assert parse_share("/a:/data:ro", 0) == ShareSpec("/a", "/data", True)
    assert parse_share("/a::ro", 2) == ShareSpec("/a", "/share2", True)
    for bad in ("", "/a:/b:rx", "/a:/b:ro:x"):
        with pytest.raises(ValueError):
            parse_share(bad, 0)


def test_console_milestones() -> None:
    log = "[    1.0] x\nfractal-init: 2.38 init started (mode=run)\nnoise\nfractal-init: 2.90 run\n"
    assert console_milestones(log) == [(2.38, "init started (mode=run)"), (2.90, "run")]
