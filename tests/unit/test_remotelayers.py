"""shim/remotelayers.py: a host layer dir -> its chain ID, from the repo's metadata (a real
repo made by ccpu/repo), and the refusals for what cannot be sent to a machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ccpu import errdefs
from ccpu.repo.store import Repo
from shim.remotelayers import chain_ids_of

CHAIN = "sha256:" + "ab" * 32


def test_chain_ids_come_from_the_repo_and_other_dirs_are_refused(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "repo")
    repo.prepare("a", "", {"containerd.io/snapshot.ref": CHAIN})
    repo.commit("base", "a", {"containerd.io/snapshot.ref": CHAIN})
    repo.prepare("b", "base", {})
    repo.commit("nolabel", "b", {})
    layers = sorted(os.listdir(tmp_path / "repo" / "layers"), key=int)
    dirs = [str(tmp_path / "repo" / "layers" / d) for d in layers]
    assert chain_ids_of(str(tmp_path / "repo"), dirs[:1]) == [CHAIN]
    with pytest.raises(errdefs.FailedPrecondition, match="no chain ID"):
        chain_ids_of(str(tmp_path / "repo"), dirs)
    with pytest.raises(errdefs.FailedPrecondition, match="not a layer of the fractal repo"):
        chain_ids_of(str(tmp_path / "repo"), ["/etc"])
    with pytest.raises(errdefs.FailedPrecondition, match="not a layer of the fractal repo"):
        chain_ids_of(str(tmp_path / "repo"), [dirs[0] + "/../../active/1"])
