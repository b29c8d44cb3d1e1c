"""The project's import structure: every module imports alone, no import cycles, layering.

(a) Each module under ccpu/ (not the generated ccpu/api/gen), shim/ and snapshotter/ is imported
    in a process of its own, forked from a clean interpreter that has imported nothing of the
    project: a module that only imports after another one has been imported fails here.
    ``__main__`` modules are programs (``python -m``), run on import by convention: not imported.
(b) The static import graph (every import statement, also inside functions; not ``if
    TYPE_CHECKING:`` ones) has no cycle between modules, except those in KNOWN_CYCLES.
(c) ccpu/linux imports only the standard library; ccpu/agent only the standard library and
    the project modules the guest ships (ccpu.guest.initramfs) from its allowed set.

Modules are found by walking the tree when the test runs, not from a list.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ccpu", "shim", "snapshotter")
SKIP = ("ccpu.api.gen",)

#: Cycles known and owned by someone else, each as the set of modules in it.  The test fails when
#: one of these is gone, so that it is removed from here too; no other cycle is allowed.
KNOWN_CYCLES: list[frozenset[str]] = []

#: what ccpu/agent may import from the project (and the guest must ship)
AGENT_MAY_IMPORT = ("ccpu.agent", "ccpu.linux", "ccpu.stack", "ccpu.errdefs")
#: third-party imports an agent module may try, each guarded by ImportError with a clear error
#: in its place (never at import time): zstd layers on a remote machine (docs/remote.md)
AGENT_OPTIONAL = {"ccpu.agent.layerpull": {"zstandard"}}

#: every project module the agent loads before it answers `hello` (ccpu/agent/__main__.py "Ready
#: first": under TCG each import is boot time; the container machinery loads after ready)
AGENT_READY_PATH = frozenset({
    "ccpu", "ccpu.agent", "ccpu.agent.__main__", "ccpu.agent.endpoint", "ccpu.agent.hello",
    "ccpu.agent.jsonbound", "ccpu.agent.protocol", "ccpu.agent.tpm", "ccpu.agent.wire", "ccpu.errdefs",
})
#: standard-library modules the ready path must not load (only container work needs them; asyncio
#: and logging, ~1.6 s of the guest's boot under TCG, load once `hello` is answered: ccpu/agent/hello.py)
AGENT_NOT_BEFORE_READY = frozenset({"ctypes", "shutil", "tempfile", "pathlib", "fnmatch", "asyncio", "logging",
                                    "concurrent", "subprocess", "ssl", "inspect",
                                    # the init's flags are parsed by hand (ccpu/agent/__main__.py
                                    # parse_args), annotations need no typing at run time, and the
                                    # init runs main with -c, not -m
                                    "argparse", "gettext", "locale", "typing", "contextlib", "warnings",
                                    "runpy", "importlib.util"})


def _skipped(name: str) -> bool:
    return any(name == s or name.startswith(s + ".") for s in SKIP)


def project_modules() -> dict[str, Path]:
    """module name -> file, for every module of PACKAGES (packages by their __init__.py)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(ROOT / pkg):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = Path(dirpath).relative_to(ROOT)
            if "__init__.py" not in filenames:
                dirnames[:] = []  # not a package: nothing below is importable as ours
                continue
            for f in sorted(filenames):
                if not f.endswith(".py"):
                    continue
                parts = list(rel.parts) + ([] if f == "__init__.py" else [f[:-3]])
                name = ".".join(parts)
                if not _skipped(name):
                    out[name] = Path(dirpath) / f
    return out


# ---------------------------------------------------------------------------------------------
# (b), (c): the static graph


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_names(name: str, path: Path) -> set[str]:
    """Absolute names of what module ``name`` imports: ``from P import x`` gives ``P.x``, which
    is module P.x or else a name in module P (``import *``: ``P``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
            continue
        if node.level:
            base_parts = package.split(".")
            base_parts = base_parts[:len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        out.update(base if a.name == "*" else f"{base}.{a.name}" for a in node.names)
    return out


def graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (the deepest existing module of each name)."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imp in imported_names(name, path):
            target = imp
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        edges[name] = deps
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_path_in(scc, edges) for scc in sccs]


def _path_in(scc: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A cycle through the first module of ``scc``, staying inside it (breadth first: shortest)."""
    start = min(scc)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & scc):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in {scc}")  # pragma: no cover - an SCC always has one


def _stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names or name == "__future__"


def test_the_cycle_finder_finds_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    found = cycles(edges)
    assert sorted(found) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_function_level_imports_are_seen(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("from . import x\nfrom ..y import z\n"
                                   "def f():\n    import q.r\n"
                                   "if TYPE_CHECKING:\n    import only_for_types\n")
    assert imported_names("p.s.m", tmp_path / "m.py") == {"p.s.x", "p.y.z", "q.r"}


def test_no_import_cycles() -> None:
    found = cycles(graph(project_modules()))
    known = [c for c in found if frozenset(c) in KNOWN_CYCLES]
    new = [" -> ".join(c) for c in found if frozenset(c) not in KNOWN_CYCLES]
    assert not new, "import cycles:\n  " + "\n  ".join(new)
    gone = [sorted(k) for k in KNOWN_CYCLES if k not in {frozenset(c) for c in known}]
    assert not gone, f"these known cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_linux_imports_only_the_standard_library() -> None:
    modules = project_modules()
    bad = {}
    for name, path in modules.items():
        if name == "ccpu.linux" or name.startswith("ccpu.linux."):
            wrong = sorted(i for i in imported_names(name, path)
                           if not _stdlib(i) and not (i == "ccpu.linux" or i.startswith("ccpu.linux.")))
            if wrong:
                bad[name] = wrong
    assert not bad, f"ccpu/linux is stdlib only: {bad}"


def test_agent_imports_only_the_stdlib_and_what_the_guest_ships() -> None:
    from ccpu.guest import initramfs

    modules = project_modules()
    edges = graph(modules)
    shipped = {m for m, p in modules.items()
               if str(p.relative_to(ROOT)) in initramfs.PROJECT_FILES
               or any(p.relative_to(ROOT).is_relative_to(d) for d in initramfs.PROJECT_DIRS)}
    bad = {}
    for name, path in modules.items():
        if not (name == "ccpu.agent" or name.startswith("ccpu.agent.")):
            continue
        foreign = {i for i in imported_names(name, path) if not _stdlib(i)}
        ours = edges[name]
        outside = sorted(i for i in foreign if i.split(".")[0] not in PACKAGES  # third party
                         and i not in AGENT_OPTIONAL.get(name, set()))
        disallowed = sorted(m for m in ours if m != "ccpu"
                            and not any(m == a or m.startswith(a + ".") for a in AGENT_MAY_IMPORT))
        unshipped = sorted(m for m in ours if m not in shipped)
        if outside or disallowed or unshipped:
            bad[name] = {"third party": outside, "not allowed": disallowed, "not in the guest": unshipped}
    assert not bad, f"ccpu/agent imports: {json.dumps(bad, indent=1)}"


def test_the_agents_ready_path_loads_only_what_hello_needs() -> None:
    """What the guest's init runs (`python3 -S -I -c '...main()'`, ccpu/guest/init.sh start_agent) up
    to serving: the import and the argument parsing (the init's own flags) load the pinned project
    modules and nothing of the container machinery (which the agent imports after `hello`:
    tests/unit/test_agent_ready.py), nor argparse or typing."""
    # as main() does up to the answer: the arguments, then the first `hello` read and answered on a
    # socketpair (the test's end wrote it first)
    code = ("import json, sys, socket; sys.path.insert(0, sys.argv[1]); import ccpu.agent.__main__ as m; "
            "ns = m.parse_args(['--fd', '3', '--runc-root', '/r', '--runc', sys.executable, '--bundle-root', '/b', "
            "'--layer-root', '/repo/layers', '--layer-root', '/c', '--init-done', '/run/done', "
            "'--cgroup-parent', '/fractal', '--memory-reserve-mb', '64', '--nics']); "
            "a, b = socket.socketpair(); "
            "a.sendall(m.hello.wire.encode_control({'id': 1, 'op': 'hello', 'args': {'version': 1}})); "
            "g = m.hello.answer_first(b.fileno(), m.hello.features(ns.nics, False, m.hello.attest_available())); "
            "assert isinstance(g, m.hello.Greeted), g; "
            "print(json.dumps(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-S", "-I", "-c", code, str(ROOT)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout))
    ours = {m for m in loaded if m.split(".")[0] in PACKAGES}
    assert ours == AGENT_READY_PATH, f"extra: {sorted(ours - AGENT_READY_PATH)}, gone: {sorted(AGENT_READY_PATH - ours)}"
    assert not loaded & AGENT_NOT_BEFORE_READY

    from ccpu.agent.__main__ import CONTAINER_MODULES

    assert not AGENT_READY_PATH & set(CONTAINER_MODULES)


# ---------------------------------------------------------------------------------------------
# (a): each module alone

# Runs in a fresh interpreter: imports no project module itself, forks one child per module
# (a clean copy of this interpreter each time), at most two at a time, and prints a JSON
# object of {module: error} for the ones that failed.
_RUNNER = r"""
import json, os, sys, traceback
names = json.loads(sys.stdin.read())
failed, running = {}, {}

def reap():
    pid, status = os.wait()
    name, r = running.pop(pid)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode(errors="replace")
    if status != 0:
        failed[name] = err or f"exit status {status}"

for name in names:
    if len(running) >= 2:
        reap()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            __import__(name)
        except BaseException:
            os.write(w, traceback.format_exc(limit=-4).encode()[-4000:])
            code = 1
        os._exit(code)
    os.close(w)
    running[pid] = (name, r)
while running:
    reap()
print(json.dumps(failed))
"""


@pytest.fixture(scope="module")
def import_failures() -> dict[str, str]:
    names = sorted(n for n in project_modules() if not n.endswith(".__main__"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(names), capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_module_imports_alone(import_failures: dict[str, str]) -> None:
    assert not import_failures, "modules that do not import on their own:\n" + "\n".join(
        f"--- {name}\n{err}" for name, err in import_failures.items())


def test_the_import_runner_catches_an_order_dependent_module(tmp_path: Path) -> None:
    """A module that needs another to have been imported first fails in its own child."""
    pkg = tmp_path / "orderpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import sys\nsys.modules['orderpkg'].ready = True\n")
    (pkg / "b.py").write_text("import sys\nassert getattr(sys.modules['orderpkg'], 'ready', False)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(["orderpkg.a", "orderpkg.b"]),
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert list(json.loads(r.stdout)) == ["orderpkg.b"]


def test_test_modules_have_unique_basenames() -> None:
    """Test dirs without an ``__init__.py`` (tests/unit, tests/integration) import their files by
    basename: two files of one name collide at collection ("import file mismatch") when the whole
    suite runs, though each dir alone passes -- a CI-only failure, caught here in a unit run."""
    seen: dict[str, list[str]] = {}
    for p in (ROOT / "tests").rglob("test_*.py"):
        if not (p.parent / "__init__.py").exists():
            seen.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    assert not {name: where for name, where in seen.items() if len(where) > 1}
