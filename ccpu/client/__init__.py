"""Clients of the daemons fractal plugs into, for the `fractal` CLI (ccpu/cli).

* ``address``: which containerd, in which namespace (ctr's flags and environment); stdlib only
* ``containerd``: containers, tasks and labels through containerd's gRPC API
* ``images``: an image's layers (chain IDs) from containerd's image and content stores
* ``snapshots``: the fractal snapshotter's snapshots and layer directories, through containerd

The CLI reads the repo's layers through the snapshotter's API, never its metadata.db
(docs/architecture.md): the snapshotter owns that file and its schema.
"""
