"""hack/devpython.sh (sourced by hack/setup.sh): an externally managed python3 (PEP 668, stock
Debian/Ubuntu) gets the dev install in ROOT/.venv; any other interpreter is used unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def dev_python(py: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f'set -euo pipefail; . "{REPO}/hack/devpython.sh"; dev_python "$1" "$2"',
                           "sh", py, str(root)], capture_output=True, text=True, timeout=60)


def _fake_python(tmp_path: Path, managed: bool) -> Path:
    """A stand-in interpreter: answers the PEP 668 probe (a script on stdin) and `-m venv DIR`."""
    log = tmp_path / "calls"
    fake = tmp_path / "python3"
    fake.write_text(f"""#!/bin/bash
echo "$*" >> {log}
if [ "$1" = - ]; then cat >/dev/null; exit {0 if managed else 1}; fi
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && printf '#!/bin/sh\\n' > "$3/bin/python3" && chmod +x "$3/bin/python3"; exit $?; fi
exit 3
""")
    fake.chmod(0o755)
    return fake


def test_this_machines_python_is_used_as_given(tmp_path: Path) -> None:
    r = dev_python(sys.executable, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == sys.executable and not (tmp_path / ".venv").exists()


def test_an_externally_managed_python_gets_a_venv_once(tmp_path: Path) -> None:
    py = _fake_python(tmp_path, managed=True)
    root = tmp_path / "clone"
    root.mkdir()
    r = dev_python(str(py), root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{root}/.venv/bin/python3" and "externally managed" in r.stderr
    again = dev_python(str(py), root)
    assert again.stdout.strip() == f"{root}/.venv/bin/python3" and again.stderr == ""
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls.count(f"-m venv {root}/.venv") == 1, calls


def test_an_unmanaged_python_is_not_wrapped(tmp_path: Path) -> None:
    py = _fake_python(tmp_path, managed=False)
    r = dev_python(str(py), tmp_path)
    assert r.stdout.strip() == str(py) and not (tmp_path / ".venv").exists()


def test_a_venv_that_cannot_be_made_fails_setup(tmp_path: Path) -> None:
    py = _fake_python(tmp_path, managed=True)
    (tmp_path / ".venv").write_text("a file where the venv should go")
    r = dev_python(str(py), tmp_path)
    assert r.returncode != 0
