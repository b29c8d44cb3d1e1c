"""The agent's two argument parsers agree (ccpu/agent/__main__.py parse_args).

The guest's init command line is parsed by hand (argparse is ~0.1 s of the agent's boot under
TCG); anything else goes to argparse.  These check the hand parser gives exactly argparse's
values where it answers, and hands every other command line to argparse (same errors)."""

from __future__ import annotations

import sys

import pytest

from ccpu.agent import __main__ as agent_main

PY = sys.executable
#: the init's command line (ccpu/guest/init.sh start_agent, agent mode over a port)
INIT = ["--fd", "3", "--runc-root", "/run/runc", "--bundle-root", "/run/fractal/bundles",
        "--layer-root", "/repo/layers", "--layer-root", "/run/fractal/containers",
        "--init-done", "/run/fractal/init.done", "--cgroup-parent", "/fractal", "--memory-reserve-mb", "64",
        "--nics", "--runc", PY]


@pytest.mark.parametrize("argv", [
    INIT,
    [*INIT, "--debug"],
    [*INIT, "--log", "/tmp/agent.log", "--memory-reserve-mb", "128"],  # a repeated scalar: the last wins
    ["--fd", "5", "--runc-root", "/r", "--bundle-root", "/b", "--runc", PY],  # host mode's child
    ["--fd", "0", "--runc-root", "", "--bundle-root", "/b", "--runc", PY],
])
def test_the_hand_parser_gives_argparses_values(argv: list[str]) -> None:
    fast = agent_main._parse_fast(argv)
    assert fast is not None, "the init's command line must not need argparse"
    assert vars(fast) == vars(agent_main._parse_argparse(argv))
    assert vars(agent_main.parse_args(argv)) == vars(fast)


@pytest.mark.parametrize("argv", [
    ["--fd=3", "--runc-root", "/r", "--bundle-root", "/b"],  # --flag=value
    ["--fd", "3", "--runc-root", "/r", "--bundle-root", "/b", "--drain-timeout", "2"],  # not an init flag
    ["--fd", "+3", "--runc-root", "/r", "--bundle-root", "/b"],  # int() would read it, as argparse does
    ["--fd", "3", "--runc-root", "/r", "--bundle-root", "/b", "--nic"],  # an abbreviation
    ["--fd", "3", "--runc-root", "/r", "--bundle-root", "/b", "--", "x"],
    ["--fd", "3", "--runc-root", "/r", "--bundle-root", "/b", "--cgroup-parent", "-x"],  # a value like a flag
    ["--fd", "3", "--runc-root", "/r", "--bundle-root", "/b", "--listen", "unix:/x"],
])
def test_anything_else_goes_to_argparse(argv: list[str]) -> None:
    assert agent_main._parse_fast([*argv, "--runc", PY]) is None


@pytest.mark.parametrize("argv, message", [
    (["--fd", "3", "--bundle-root", "/b"], "--runc-root"),  # required
    (["--fd", "3", "--runc-root", "/r"], "--bundle-root"),
    (["--runc-root", "/r", "--bundle-root", "/b"], "one of --fd or --listen"),
    (["--fd", "x", "--runc-root", "/r", "--bundle-root", "/b"], "invalid int value"),
    (["--fd", "3", "--runc-root", "/r", "--bundle-root", "/b", "--memory-reserve-mb"], "expected one argument"),
    (["--fd", "3", "--runc-root", "/r", "--bundle-root", "/b", "--runc", "/no/such/runc"], "not found"),
    (["--fd", "3", "--runc-root", "/r", "--bundle-root", "/b", "--bogus"], "unrecognized arguments"),
])
def test_bad_command_lines_get_argparses_errors(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        agent_main.parse_args([*argv, *(["--runc", PY] if "--runc" not in argv else [])])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_fast_path_keeps_argparse_out() -> None:
    """The reason for the hand parser: the init's command line does not import argparse."""
    import json
    import subprocess

    code = ("import json, sys; import ccpu.agent.__main__ as m; ns = m.parse_args(sys.argv[1:]); "
            "print(json.dumps([type(ns).__name__, 'argparse' in sys.modules]))")
    r = subprocess.run([PY, "-S", "-c", code, *INIT], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(agent_main.__file__).rsplit("/ccpu/", 1)[0]})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["SimpleNamespace", False]
