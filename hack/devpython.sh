# Sourced by hack/setup.sh: which Python the dev install goes into.
#
# Why: a distribution's own python3 (Debian 12+, Ubuntu 23.04+) is "externally managed"
# (PEP 668: an EXTERNALLY-MANAGED file next to its stdlib), and `pip install -e` into it stops
# with externally-managed-environment.  Then the dev install goes into a venv in the clone
# ($ROOT/.venv, created once; Makefile's PYTHON picks it up).  Any other interpreter (pyenv's,
# a venv's, CI's) is used as it is, exactly as before.
#
#   dev_python PY ROOT   -> prints the interpreter to install into (creates ROOT/.venv if needed)

externally_managed() {  # $1: python; exit 0 if pip must not install into it
  "$1" - <<'PYEOF'
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if not in_venv and os.path.isfile(marker) else 1)
PYEOF
}

dev_python() {  # $1: python, $2: clone root
  local py="$1" root="$2" venv="$2/.venv"
  if ! externally_managed "$py"; then
    echo "$py"
    return 0
  fi
  if [ ! -x "$venv/bin/python3" ]; then
    echo "setup:   $py is externally managed (PEP 668): dev install goes into $venv" >&2
    "$py" -m venv "$venv" >&2 || return 1
  fi
  echo "$venv/bin/python3"
}
