"""shim/zygote.py: a fork-server retires when any module of ours it loaded changed on disk."""

from __future__ import annotations

from pathlib import Path


def test_the_zygote_notices_an_edit_of_any_module_it_loaded(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A daemon forked from the zygote runs the code the zygote imported: an edit of any loaded
    module of ours (not only the few files start's code_version looks at) retires it."""
    import types

    from shim import zygote

    monkeypatch.setattr(zygote, "_CODE_ROOT", str(tmp_path))
    (tmp_path / "ccpu").mkdir()
    mods = {}
    for name in ("a", "b"):
        f = tmp_path / "ccpu" / f"{name}.py"
        f.write_text("x = 1\n")
        mods[name] = types.SimpleNamespace(__file__=str(f))
    mods["outside"] = types.SimpleNamespace(__file__="/usr/lib/python3/os.py")
    mods["builtin"] = types.SimpleNamespace()
    snap = zygote.code_snapshot(mods)
    assert sorted(snap) == sorted(str(tmp_path / "ccpu" / f"{n}.py") for n in ("a", "b"))
    assert zygote.changed_file(snap) is None
    (tmp_path / "ccpu" / "b.py").write_text("x = 22\n")  # in place, as an editor may write
    assert zygote.changed_file(snap) == str(tmp_path / "ccpu" / "b.py")
    (tmp_path / "ccpu" / "b.py").unlink()
    assert zygote.changed_file(snap) == str(tmp_path / "ccpu" / "b.py")
