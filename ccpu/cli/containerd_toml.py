"""Edits of a user's containerd config.toml as text: what ``fractal install`` adds, nothing else.

Why text and not a TOML library: the user's file must come back byte for byte on ``fractal
uninstall`` and stay readable by the user in between, so every edit is one of three small,
visible kinds, each marked ``# fractal install``:

* one ``imports`` entry (a line inserted after ``version = N``, or the path put first in an
  existing ``imports = [``);
* a key inserted right after the header of a table the user already has, or a one-line
  ``key = value`` replaced in it (containerd 1.6's global CRI ``snapshotter``);
* new tables appended at the end, between ``# >>> fractal`` and ``# <<< fractal`` (a new table
  at the end of a TOML file cannot change any table before it).

Each result is re-parsed with tomllib and must hold every key and value of the original (save
the ones set on purpose) plus what was added; otherwise nothing is written and the caller says
to add the lines by hand.  Pure: text in, text out.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MARK = "# fractal install"
BLOCK_BEGIN = "# >>> fractal: written by `fractal install` (`fractal uninstall` removes it)"
BLOCK_END = "# <<< fractal"

Path_ = tuple[str, ...]


class EditError(Exception):
    """The file cannot be edited safely; the message says what to add by hand."""


def q(value: object) -> str:
    """A TOML basic string."""
    s = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def toml_value(value: object) -> str:
    """TOML for the few value kinds install writes: str, list of str."""
    if isinstance(value, str):
        return q(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(q(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r}")


def header(path: Path_) -> str:
    """``[a."b.c".d]``: bare keys where TOML allows them, else quoted."""
    return "[" + ".".join(k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else q(k) for k in path) + "]"


def lookup(data: object, path: Sequence[str]) -> object:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def header_path(line: str) -> tuple[Path_, bool] | None:
    """(key path, is an array-of-tables header) of a table header line, else None.
    The line alone is parsed by tomllib, so quoting and trailing comments are TOML's."""
    if not line.lstrip().startswith("["):
        return None
    try:
        node: object = tomllib.loads(line)
    except tomllib.TOMLDecodeError:
        return None
    path: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        (key, node), = node.items()
        path.append(key)
    if node == {}:
        return tuple(path), False
    if node == [{}]:
        return tuple(path), True
    return None


def _sections(lines: list[str]) -> list[tuple[int, Path_ | None, bool]]:
    """(line index, path, array?) of every header; path None = the top-level section at 0."""
    out: list[tuple[int, Path_ | None, bool]] = [(0, None, False)]
    for i, ln in enumerate(lines):
        h = header_path(ln)
        if h is not None:
            out.append((i, h[0], h[1]))
    return out


# ------------------------------------------------------------------------------------------
# the three kinds of edit


def import_covers(imports: list[str], dropin: str, config_dir: str) -> bool:
    """Whether an existing imports entry (a path or glob, relative to the config's dir) names ``dropin``."""
    for entry in imports:
        pat = entry if os.path.isabs(entry) else os.path.join(config_dir, entry)
        if pat == dropin or fnmatch.fnmatch(dropin, pat):
            return True
    return False


_IMPORTS_RE = re.compile(r"^(\s*imports\s*=\s*)\[")
_VERSION_RE = re.compile(r"^\s*version\s*=")


def add_import(text: str, dropin: str, config_dir: str) -> str:
    """``text`` with ``dropin`` in its top-level ``imports``; unchanged if already covered."""
    data = tomllib.loads(text)
    imports = data.get("imports", [])
    if not isinstance(imports, list):
        raise EditError(f"`imports` in the containerd config is not a list; add {q(dropin)} to it by hand")
    if import_covers(imports, dropin, config_dir):
        return text
    lines = text.splitlines(keepends=True)
    top_end = next((i for i, ln in enumerate(lines) if header_path(ln)), len(lines))
    if "imports" in data:
        for i in range(top_end):
            m = _IMPORTS_RE.match(lines[i])
            if m:
                lines[i] = lines[i][:m.end()] + q(dropin) + ", " + lines[i][m.end():]
                break
        else:
            raise EditError(f"could not find the `imports = [` line in the containerd config; add "
                            f"{q(dropin)} to imports by hand")
    else:
        at = next((i + 1 for i in range(top_end) if _VERSION_RE.match(lines[i])), 0)
        if at and not lines[at - 1].endswith("\n"):
            lines[at - 1] += "\n"
        lines.insert(at, f"imports = [{q(dropin)}]  {MARK}\n")
    new = "".join(lines)
    check_preserved(text, new, lambda d: dropin in d.get("imports", []))
    return new


def set_in_table(text: str, table: Path_, key: str, value: object) -> str | None:
    """``key = value`` in the user's explicit ``[table]``: inserted after its header, or its
    one-line value replaced.  None when the file has no ``[table]`` header (the caller appends
    the table instead)."""
    lines = text.splitlines(keepends=True)
    secs = _sections(lines)
    for n, (start, path, array) in enumerate(secs):
        if path != table or array:
            continue
        end = secs[n + 1][0] if n + 1 < len(secs) else len(lines)
        line = f"{key} = {toml_value(value)}  {MARK}\n"
        key_re = re.compile(rf"^(\s*){re.escape(key)}\s*=")
        for i in range(start + 1, end):
            m = key_re.match(lines[i])
            if m:
                try:
                    tomllib.loads(lines[i])
                except tomllib.TOMLDecodeError:
                    raise EditError(f"{header(table)} {key} spans several lines; set "
                                    f"{key} = {toml_value(value)} there by hand") from None
                lines[i] = m.group(1) + line
                return "".join(lines)
        indent = re.match(r"^\s*", lines[start]).group(0) + "  "  # type: ignore[union-attr]
        if not lines[start].endswith("\n"):
            lines[start] += "\n"
        lines.insert(start + 1, indent + line)
        return "".join(lines)
    return None


def append_block(text: str, body: str) -> str:
    """``body`` appended between the markers (a separating blank line first)."""
    if not body:
        return text
    sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return text + sep + BLOCK_BEGIN + "\n" + body.rstrip("\n") + "\n" + BLOCK_END + "\n"


def table_text(path: Path_, items: dict[str, object], array: bool = False, comment: str = "") -> str:
    h = header(path)
    lines = [f"[{h}]" if array else h]
    if comment:
        lines.insert(0, f"# {comment}")
    lines += [f"  {k} = {toml_value(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# the check every edit passes


def contains(big: object, small: object) -> bool:
    """Every key/value of ``small`` is in ``big`` (lists: ``big`` may have more items)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and contains(big[k], v) for k, v in small.items())
    if isinstance(small, list) and isinstance(big, list):
        return all(item in big for item in small)
    return big == small


def patched(data: dict, sets: Sequence[tuple[Path_, object]]) -> dict:
    """``data`` with the values at ``sets``' paths replaced (what an edit changes on purpose)."""
    out = copy.deepcopy(data)
    for path, value in sets:
        node = out
        for key in path[:-1]:
            nxt = node.get(key)
            if not isinstance(nxt, dict):
                nxt = node[key] = {}
            node = nxt
        node[path[-1]] = value
    return out


def check_preserved(old: str, new: str, added: Callable[[dict], bool],
                    sets: Sequence[tuple[Path_, object]] = ()) -> None:
    try:
        new_data = tomllib.loads(new)
    except tomllib.TOMLDecodeError as e:
        raise EditError(f"the edited containerd config would not parse ({e}); nothing written. "
                        "Add the lines from `fractal install --print` by hand") from None
    if not contains(new_data, patched(tomllib.loads(old), sets)) or not added(new_data):
        raise EditError("editing the containerd config would change existing settings; nothing "
                        "written. Add the lines from `fractal install --print` by hand")


@dataclass(frozen=True)
class Setting:
    """One key install wants in one table of containerd's config."""

    table: Path_
    key: str
    value: object

    @property
    def path(self) -> Path_:
        return (*self.table, self.key)
