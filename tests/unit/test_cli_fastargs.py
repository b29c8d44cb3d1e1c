"""``fractal layers add|rm`` parsed without argparse (ccpu/cli/fastargs.py) must read every
command line it accepts exactly as argparse does, and hand every other one to argparse."""

from __future__ import annotations

import itertools
import random

import pytest

from ccpu import cli
from ccpu.cli import fastargs
from ccpu.cli import layers as L
from ccpu.cli import parser as P


def by_argparse(argv: list[str]) -> dict | str:
    try:
        ns = P.build_parser(argv).parse_args(argv)
    except SystemExit as e:
        return f"exit {e.code}"
    out = vars(ns)
    out.pop("parser", None)
    return out


def by_fastargs(argv: list[str]) -> dict | None:
    args = fastargs.parse_layers(argv)
    if args is None:
        return None
    out = dict(vars(args))
    assert out.pop("parser") is None
    return out


GLOBALS = [[], ["--debug"], ["-n", "team"], ["--namespace=team"], ["-a", "/x.sock", "-n", "ns"],
           ["--address", "/a.sock", "--debug"], ["-n", "layers"]]
ADD_OPTS = [[], ["--json"], ["--position", "bottom"], ["--position=2"], ["--plain-http", "--no-pull"],
            ["-n", "mine"], ["--address=/b.sock", "--json"], ["--position", "top", "--position", "1"]]
RM_OPTS = [[], ["--json"], ["-n", "mine"], ["-a", "/c.sock"]]
POSITIONALS = [["c1", "img"], ["c1", "img1", "img2", "sha256:abcd"]]

#: plain command lines: the fast path must take them (or it saves nothing)
PLAIN = [g + ["layers", verb] + o + p + o2
         for g in GLOBALS
         for verb, opts in (("add", ADD_OPTS), ("rm", RM_OPTS))
         for o, o2 in itertools.product(opts, [[], ["--json"]])
         for p in POSITIONALS]

#: what the fast path must leave to argparse (it returns None) -- or read the same way
ODD = [
    ["layers", "add", "c1"], ["layers", "rm", "c1"], ["layers", "add"], ["layers"], [],
    ["layers", "add", "--help"], ["-h"], ["--version"], ["layers", "ls", "c1"],
    ["layers", "add", "--pos", "top", "c1", "img"],            # an abbreviation argparse may take
    ["layers", "add", "-nfoo", "c1", "img"], ["layers", "add", "-n=foo", "c1", "img"],
    ["layers", "add", "--", "c1", "img"], ["layers", "add", "c1", "--", "-img"],
    ["layers", "add", "-n", "-x", "c1", "img"], ["layers", "add", "c1", "img", "-n"],
    ["layers", "add", "--position", "sideways", "c1", "img"], ["layers", "add", "--position", "-1", "c1", "img"],
    ["layers", "add", "c1", "--json", "img"], ["layers", "add", "c1", "img", "--json", "img2"],
    ["layers", "--debug", "add", "c1", "img"], ["layers", "add", "--debug", "c1", "img"],
    ["layers", "rm", "--position", "top", "c1", "img"], ["layers", "rm", "--plain-http", "c1", "x"],
    ["--debug=1", "layers", "add", "c1", "img"], ["-n"], ["-n", "team"], ["ps"], ["repo", "ls"],
    ["layers", "add", "--json=1", "c1", "img"], ["layers", "add", "-", "img"], ["layers", "add", "c1", "-"],
    ["layers", "add", "--address=", "c1", "img"], ["layers", "add", "c1", "img", "--position="],
]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_plain_command_lines_take_the_fast_path_and_read_as_argparse_reads_them(argv: list[str]) -> None:
    fast = by_fastargs(argv)
    assert fast is not None, argv
    assert fast == by_argparse(argv)
    assert fast["func"] in (L.cmd_add, L.cmd_rm)


@pytest.mark.parametrize("argv", ODD, ids=lambda a: " ".join(a) or "(empty)")
def test_anything_else_is_argparses_or_reads_the_same(argv: list[str]) -> None:
    fast = by_fastargs(argv)
    if fast is not None:
        assert fast == by_argparse(argv)


def test_shuffled_command_lines_agree_with_argparse() -> None:
    """Tokens of plain command lines in other orders: whatever the fast path accepts, argparse
    reads the same (a fixed seed: the same corpus every run)."""
    rng = random.Random(13)
    accepted = 0
    for _ in range(400):
        argv = list(rng.choice(PLAIN))
        head = argv.index("layers") + 2
        tail = argv[head:]
        rng.shuffle(tail)
        argv = argv[:head] + tail
        fast = by_fastargs(argv)
        if fast is not None:
            accepted += 1
            assert fast == by_argparse(argv), argv
    assert accepted > 0


def test_main_runs_the_command_the_fast_path_names(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake(args) -> int:  # noqa: ANN001
        seen.update(vars(args))
        return 0

    monkeypatch.setattr(L, "cmd_add", fake)
    monkeypatch.setattr(cli, "build_parser", lambda argv=None: pytest.fail("argparse built"))
    assert cli.main(["-n", "team", "layers", "add", "--position", "bottom", "c1", "img"]) == 0
    assert seen["namespace"] == "team" and seen["position"] == "bottom" and seen["images"] == ["img"]
