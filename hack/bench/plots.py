"""The benchmark figures of docs/performance.md, drawn from a benchmark's own result dict.

Why one module: the three scripts that draw (snapshotter.py: disk vs namespaces, shim.py: start
latency, vm.py: the VM boot timeline) share the output rules, and those rules are what make the
figures fit to commit: SVG with text kept as text (small, readable in a diff), no creation date
and a fixed id salt, so the same figures give the same bytes and a file changes only when the
data do.  Each ``*_series`` function turns a result into plain data (pure, unit-tested); each
``plot_*`` draws that data into one file.  matplotlib is imported only here and only when a
figure is drawn (the ``bench`` extra: ``pip install '.[bench]'``); a benchmark without
``--plot`` does not need it.

A figure can be redrawn from a result saved with ``--json`` without measuring again:

    python3 hack/bench/plots.py disk|start|boot RESULT.json OUT.svg
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MiB = 1 << 20
#: (label, colour) per series name, the same colours in every figure
STYLE = {"fractal": "#1f6fb4", "overlayfs": "#d9822b", "runc": "#d9822b"}


class PlotError(RuntimeError):
    pass


# --------------------------------------------------------------------------- data (pure)


def disk_series(disk: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """snapshotter.py's ``result["disk"]`` -> {snapshotter: [(namespaces, MiB), ...]}, starting at 0
    namespaces (the empty store)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for sn in ("fractal", "overlayfs"):
        d = disk[sn]
        steps = d.get("usage_bytes")
        if not steps:
            raise PlotError("the disk result has no per-namespace usage (usage_bytes): rerun the benchmark")
        out[sn] = [(0, d["empty_bytes"] / MiB)] + [(i + 1, b / MiB) for i, b in enumerate(steps)]
    return out


def ecdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and the fraction of runs at or below each: a distribution that needs no bins
    (ten runs make a poor histogram)."""
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def start_series(run: Mapping[str, Any]) -> dict[str, list[float]]:
    """shim.py's ``result["run"]`` -> {"fractal/fractal": [seconds, ...], ...}."""
    raw = run.get("raw") or {}
    if not raw:
        raise PlotError("the run result has no raw times")
    return {k: list(v) for k, v in raw.items()}


def timeline_rows(boot: Mapping[str, Any]) -> list[tuple[str, list[tuple[float, float, str]]]]:
    """vm.py's ``result["timeline"]`` -> rows of (start, end, phase) segments in seconds.

    Two clocks, never mixed in one row: the shim's (from the start of the VM's boot: find the
    guest build, spawn QEMU, QEMU + firmware + kernel + init + agent until the agent's ``hello``)
    and the guest's (uptime, i.e. from the kernel's start: kernel until init's first milestone,
    then init's milestones).  The firmware time before the kernel is on the shim's row only."""
    host = boot["host"]
    rows: list[tuple[str, list[tuple[float, float, str]]]] = []
    marks = [(0.0, "start"), (host["guest"], "guest found"), (host["qemu_started"], "QEMU spawned"),
             (host["agent_ready"], "agent hello")]
    names = {"guest found": "find guest", "QEMU spawned": "spawn QEMU",
             "agent hello": "firmware, kernel, init, agent start"}
    rows.append(("shim (host clock)", [(a, b, names[wb]) for (a, _), (b, wb) in zip(marks, marks[1:]) if b > a]))
    guest = sorted(boot["guest"])
    segs: list[tuple[float, float, str]] = []
    prev, prev_what = 0.0, "kernel"
    for up, what in guest:
        if up > prev:
            segs.append((prev, up, prev_what))
        what = what.split(" (")[0]
        prev, prev_what = up, "init" if what == "init started" else what
    if segs:
        rows.append(("guest (uptime clock)", segs))
    if boot.get("first_output") is not None:
        rows.append(("ctr run -> first output", [(0.0, boot["first_output"], "ctr run (new sandbox)")]))
    return rows


# --------------------------------------------------------------------------- drawing


def require(argv_error: Any) -> None:
    """Fail at argument parsing, not after minutes of measuring: ``argv_error`` is the script's
    ``ArgumentParser.error``."""
    try:
        _pyplot()
    except PlotError as exc:
        argv_error(str(exc))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install '.[bench]' (docs/dependencies.md)") from None
    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "fractal", "font.size": 10,
                                "axes.spines.top": False, "axes.spines.right": False})
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=path.suffix.lstrip(".") or "svg", bbox_inches="tight", metadata={"Date": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_disk(series: Mapping[str, Sequence[tuple[int, float]]], image: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for sn, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=STYLE.get(sn), label=sn)
    n = max(p[0] for pts in series.values() for p in pts)
    ax.set_xticks(range(0, n + 1))
    ax.set_xlabel("namespaces that pulled the image")
    ax.set_ylabel("disk used (MiB)")
    ax.set_title(f"Snapshotter storage after pulling {image} into N namespaces")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_start_latency(series: Mapping[str, Sequence[float]], path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key in sorted(series):
        rt, _, sn = key.partition("/")
        xs, ys = ecdf(series[key])
        ax.step([x * 1e3 for x in xs], ys, where="post", color=STYLE.get(rt),
                linestyle="-" if sn == "fractal" else "--", label=f"{rt} shim, {sn} snapshotter")
    ax.set_xlabel("ctr run --rm IMAGE true, wall time (ms)")
    ax.set_ylabel("fraction of runs")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # beside: no curve hidden
    return _save(fig, path)


def plot_timeline(rows: Sequence[tuple[str, Sequence[tuple[float, float, str]]]], path: Path, title: str) -> Path:
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(7.2, 0.9 + 0.8 * len(rows)))
    colours = ["#1f6fb4", "#6aa84f", "#d9822b", "#a64d79", "#999999"]
    xmax = max((b for _, segs in rows for _, b, _ in segs), default=1.0)
    small: list[Any] = []  # segments too narrow for their label: named in the legend instead
    for y, (_, segs) in enumerate(reversed(rows)):
        for i, (a, b, what) in enumerate(segs):
            colour = colours[(i + 2 * y) % len(colours)]
            ax.broken_barh([(a, b - a)], (y - 0.35, 0.7), color=colour, alpha=0.85)
            label = f"{what}\n{b - a:.2f} s"
            if b - a >= 0.12 * xmax:
                ax.text(a + (b - a) / 2, y, label, ha="center", va="center", fontsize=7)
            else:
                small.append(Patch(color=colour, alpha=0.85, label=label.replace("\n", " ")))
    if small:
        ax.legend(handles=small, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(small), fontsize=7,
                  frameon=False)
    ax.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)])
    ax.set_xlabel("seconds")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Redraw a benchmark figure from its --json result.")
    ap.add_argument("figure", choices=["disk", "start", "boot"])
    ap.add_argument("result", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    require(ap.error)
    r = json.loads(args.result.read_text())
    try:
        if args.figure == "disk":
            plot_disk(disk_series(r["disk"]), r["args"]["image"], args.out)
        elif args.figure == "start":
            title = f"Container start, {r['run']['runs']} runs each (FRACTAL_AGENT={r['agent']})"
            plot_start_latency(start_series(r["run"]), args.out, title)
        else:
            timeline = dict(r["nth"]["timeline"])
            timeline["first_output"] = r["boot"]["first_output"]["median"] if r.get("boot") else None
            plot_timeline(timeline_rows(timeline), args.out, boot_title(r))
    except (KeyError, TypeError, PlotError) as exc:
        print(f"plots: {args.result} has no {args.figure} figure's data: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def boot_title(result: Mapping[str, Any]) -> str:
    return f"VM boot ({result['accel']}, {result['share']}, guest kernel {result.get('guest_kernel', '?')})"


if __name__ == "__main__":
    sys.exit(main())
