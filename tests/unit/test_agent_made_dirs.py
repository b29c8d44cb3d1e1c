"""The agent makes (and removes again) the bundle and upper/work dirs a VM guest lacks."""

from __future__ import annotations

from ccpu.agent import placed


def test_makedirs_reports_what_it_made_and_remove_takes_it_back(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "exists").mkdir()
    made = placed.makedirs(str(tmp_path / "exists" / "c1" / "upper"))
    assert made == [str(tmp_path / "exists" / "c1"), str(tmp_path / "exists" / "c1" / "upper")]
    made += placed.makedirs(str(tmp_path / "exists" / "c1" / "work"))
    assert made[-1] == str(tmp_path / "exists" / "c1" / "work")
    (tmp_path / "exists" / "c1" / "upper" / "file").write_text("x")
    assert placed.makedirs(str(tmp_path / "exists")) == []
    placed.remove_made(made)
    assert not (tmp_path / "exists" / "c1").exists()
    assert (tmp_path / "exists").is_dir()
