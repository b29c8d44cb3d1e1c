"""What ``fractal`` itself is made of, with no import of its own: the command groups (name, one-line
help, the module that fills in its parser), the exit codes, the version, its logging set-up.

A leaf module so that both the edge (ccpu/cli/__init__.py) and the argparse parser
(ccpu/cli/parser.py) can use it without importing each other.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Group:
    """A command group: its name, its one-line help and the module that fills in its parser
    (``register(parser)``).  A plain class, not a dataclass: see the imports."""

    __slots__ = ("name", "module", "help")

    def __init__(self, name: str, module: str, help: str) -> None:  # noqa: A002
        self.name, self.module, self.help = name, module, help

    def __repr__(self) -> str:
        return f"Group({self.name!r}, {self.module!r}, {self.help!r})"


GROUPS = (
    Group("install", "ccpu.cli.install", "wire fractal into containerd (config, systemd unit, shim)"),
    Group("uninstall", "ccpu.cli.uninstall", "undo what `fractal install` did (the user's files restored byte for byte)"),
    Group("doctor", "ccpu.cli.doctor", "check containerd, the snapshotter, the shim, QEMU ... and say what to fix"),
    Group("ps", "ccpu.cli.ps", "fractal sandboxes, their mode, containers and pids"),
    Group("repo", "ccpu.cli.repo", "inspect the layer repo"),
    Group("layers", "ccpu.cli.layers", "add or remove layers of a running container (live layers)"),
    Group("image", "ccpu.cli.images", "import images into containerd, unpacked for fractal"),
    Group("guest", "ccpu.cli.guest", "the VM guest image (kernel + initramfs)"),
    Group("vm", "ccpu.cli.vm", "run things in the fractal VM"),
    Group("boot", "ccpu.cli.boot", "boot an image (or a docker-export tgz) as a whole machine, its own init as PID 1"),
    Group("pki", "ccpu.cli.pki", "certificates for remote mode's mutual TLS (a CA, the host's, agents')"),
    Group("agent", "ccpu.cli.agent", "run the fractal agent on a machine (remote mode, mutual TLS)"),
    Group("metrics", "ccpu.cli.metrics", "Prometheus metrics of the snapshotter and every shim"),
    Group("collect", "ccpu.cli.collect", "write a bug-report bundle (versions, configs, doctor, logs; secrets redacted)"),
)


def version() -> str:
    """The installed distribution's version; in a source tree without one, its pyproject's."""
    from importlib import metadata

    try:
        return metadata.version("fractal")
    except metadata.PackageNotFoundError:
        pass
    import tomllib
    from pathlib import Path

    try:
        with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def setup_logging(debug: bool) -> None:
    """Log records to stderr (debug ones with ``--debug``).  Done before every command except
    those that set ``lazy_logging`` (``fractal layers add``: logging is ~5 ms of its imports and
    its fast path logs nothing), which call this where they start to need it."""
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
