"""Default locations, shared by the daemons and the CLI (one place to change them)."""

DEFAULT_ROOT = "/var/lib/fractal"
DEFAULT_SNAPSHOTTER_ADDRESS = "/run/fractal/snapshotter.sock"
SNAPSHOTTER_NAME = "fractal"
