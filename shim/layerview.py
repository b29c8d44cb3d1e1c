"""A VM sandbox's view of the repo: only the layers its containers use (stdlib only).

Why: the guest is not trusted (guest root must be assumed, docs/security.md), and sharing the
whole ``<repo>/layers`` would let every VM read every tenant's image layers.  So the share's
source is not the repo but ``<vm run dir>/layers``: a small tmpfs of the shim's own (root, 0700,
private: nothing mounted below it propagates to another mount namespace), holding one read-only
bind mount (ro, nosuid, nodev; not recursive) of ``<repo>/layers/<id>`` at ``<id>`` for each layer
a container of the sandbox stacks.  Same names as in the repo, so the guest path of a layer is
unchanged (``/repo/layers/<id>``, shim.vm.guest_layer_path); same files, no copy.

The view follows the containers: a container's set of layers is set at Create (its image's
layers), widened before a live ``fractal layers add`` and set to the new stack after each restack
(shim/layers.py), dropped at Delete.  A layer is bound while at least one container's current
stack uses it.  Binds made after boot reach the guest: virtiofsd (``--sandbox chroot``) and QEMU's
9p server resolve every guest lookup in the shim's mount namespace, below the view.

Every mount is made fd-relative (ccpu.mountfd: openat2 confined below the repo's layer dir,
open_tree/move_mount onto ``<view fd>/<id>``) and recorded with its mount id in
``<vm run dir>/layers.mounts``; undoing detaches exactly the recorded mounts, after checking
their ids, and nothing is ever found by walking a path the guest can write (the run dir is the
shim's; the guest's writable share is ``volumes/``, a sibling).  :func:`undo_recorded` does the
same for a dead shim (``delete`` -> shim.vm.cleanup_dead).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from collections.abc import Iterable

from ccpu import mountfd
from ccpu.linux.mount import MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY
from ccpu.linux.openat2 import openat2
from ccpu.linux.statx import mount_id_at

log = logging.getLogger("shim.layerview")

VIEW = "layers"
RECORD = "layers.mounts"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TMPFS = {"mode": "0700", "size": "1m", "nr_inodes": "65536"}
VIEW_ATTRS = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
BIND_ATTRS = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV


class LayerViewError(RuntimeError):
    pass


def layer_name(host_dir: str, host_layers: str) -> str:
    """``<host_layers>/<id>[/...]`` -> ``<id>``.  Pure."""
    root = posixpath.normpath(host_layers)
    path = posixpath.normpath(host_dir)
    if not posixpath.isabs(path) or not path.startswith(root.rstrip("/") + "/"):
        raise LayerViewError(f"{host_dir} is not in the repo's layers ({host_layers})")
    name = path[len(root.rstrip("/")) + 1:].split("/", 1)[0]
    if not _NAME.fullmatch(name):
        raise LayerViewError(f"layer dir name {name!r} of {host_dir} is not a repo layer id")
    return name


def needed(owners: dict[str, frozenset[str]]) -> set[str]:
    """The layers to bind: those of any owner.  Pure."""
    return set().union(*owners.values()) if owners else set()


def _write_record(run_fd: int, view_id: int | None, binds: dict[str, int], at: str | None = None) -> None:
    rec: dict[str, object] = {"view": view_id, "binds": binds}
    if at is not None:
        rec["at"] = at
    data = json.dumps(rec).encode()
    tmp = RECORD + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=run_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, RECORD, src_dir_fd=run_fd, dst_dir_fd=run_fd)


def _read_record(run_fd: int) -> tuple[int | None, dict[str, int], str | None]:
    try:
        fd = openat2(run_fd, RECORD, os.O_RDONLY)
    except FileNotFoundError:
        return None, {}, None
    with os.fdopen(fd, "rb") as f:
        rec = json.loads(f.read(1 << 20) or b"{}")
    view = rec.get("view") if isinstance(rec.get("view"), int) else None
    binds = {str(k): v for k, v in (rec.get("binds") or {}).items()
             if isinstance(v, int) and _NAME.fullmatch(str(k))}
    at = rec.get("at")
    if at is not None and not valid_view_dir(at):
        raise ValueError(f"{RECORD}: view path {at!r} is not absolute and normal")
    return view, binds, at


def valid_view_dir(path: object) -> bool:
    """A view kept outside its run dir: an absolute normal path with a parent.  Pure."""
    return (isinstance(path, str) and posixpath.isabs(path) and posixpath.normpath(path) == path
            and posixpath.dirname(path) != path and len(path) < 4096)


def _place(run_fd: int, at: str | None) -> tuple[int, str, bool]:
    """(dir fd, name, whether the fd is ours to close) of the view: ``<run dir>/layers``, or
    ``at`` (a pooled VM's view, which must keep the path virtiofsd was started with)."""
    if at is None:
        return run_fd, VIEW, False
    return (os.open(posixpath.dirname(at), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC),
            posixpath.basename(at), True)


def _undo(run_fd: int, view_id: int | None, binds: dict[str, int], at: str | None = None) -> list[str]:
    """Detach the recorded binds, then the view; returns what could not be undone."""
    problems: list[str] = []
    try:
        parent, name, close = _place(run_fd, at)
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"{at}: {exc}"]
    try:
        view_fd = None
        try:
            view_fd = mountfd.open_dir(parent, name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"{name}: {exc}")
        if view_fd is not None:
            try:
                for layer, mid in binds.items():
                    try:
                        if mountfd.umount_at(view_fd, layer, mid):
                            os.rmdir(layer, dir_fd=view_fd)
                    except OSError as exc:
                        problems.append(f"{name}/{layer}: {exc}")
            finally:
                os.close(view_fd)
        if view_id is not None:
            try:
                mountfd.umount_at(parent, name, view_id)  # with it goes any bind made but not recorded
            except OSError as exc:
                problems.append(f"{name}: {exc}")
        if not problems:
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError:
                pass
    finally:
        if close:
            os.close(parent)
    return problems


def undo_recorded(run_dir: str) -> list[str]:
    """A dead shim's view: detach exactly the mounts its record names (ids checked); returns
    the problems (empty: all gone or nothing recorded)."""
    try:
        run_fd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        try:
            view_id, binds, at = _read_record(run_fd)
        except (OSError, ValueError) as exc:
            return [f"{RECORD}: unreadable ({exc})"]
        problems = _undo(run_fd, view_id, binds, at)
        if not problems:
            try:
                os.unlink(RECORD, dir_fd=run_fd)
            except OSError:
                pass
        return problems
    finally:
        os.close(run_fd)


class LayerView:
    """``<run dir>/layers`` of one VM sandbox (see the module docstring)."""

    def __init__(self, run_dir: str, host_layers: str, at: str | None = None) -> None:
        """``at``: the view's own path, outside the run dir (a pooled VM's: its run dir is renamed
        at adoption, and virtiofsd finds a submount by the path it was started with)."""
        if at is not None and not valid_view_dir(at):
            raise ValueError(f"view path {at!r} is not absolute and normal")
        self.run_dir = run_dir
        self.host_layers = host_layers
        self.at = at
        self.path = at or os.path.join(run_dir, VIEW)
        self._owners: dict[str, frozenset[str]] = {}
        self._binds: dict[str, int] = {}
        self._view_id: int | None = None
        self._run_fd: int | None = None
        self._view_fd: int | None = None
        self._layers_fd: int | None = None

    @property
    def bound(self) -> set[str]:
        return set(self._binds)

    def create(self) -> None:
        """Mount the (empty) view; the run dir exists and is the shim's."""
        if self._view_fd is not None:
            return
        try:
            self._layers_fd = os.open(self.host_layers, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise LayerViewError(f"the fractal repo has no layers dir {self.host_layers} ({exc.strerror}; "
                                 "is FRACTAL_ROOT the snapshotter's root?)") from None
        self._run_fd = os.open(self.run_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if self.at is not None:
            os.makedirs(os.path.dirname(self.at), mode=0o700, exist_ok=True)
        parent, name, close = _place(self._run_fd, self.at)
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            _write_record(self._run_fd, None, {}, self.at)  # its place first: undone even if we die here
            self._view_id = mountfd.tmpfs_at(parent, name, TMPFS, VIEW_ATTRS)
            _write_record(self._run_fd, self._view_id, {}, self.at)
            self._view_fd = mountfd.open_dir(parent, name)
        finally:
            if close:
                os.close(parent)

    def adopt(self) -> None:
        """Take over the view another process mounted in this run dir (a pooled VM's, renamed
        here: shim/pool.py): its record must name the tmpfs mounted there now (mount id checked)
        and no bind yet."""
        if self._view_fd is not None:
            return
        self._layers_fd = os.open(self.host_layers, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._run_fd = os.open(self.run_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        view_id, binds, at = _read_record(self._run_fd)
        if view_id is None or binds:
            raise LayerViewError(f"layer view of {self.run_dir}: the record names no empty view")
        self.at = at
        self.path = at or os.path.join(self.run_dir, VIEW)
        parent, name, close = _place(self._run_fd, at)
        try:
            self._view_fd = mountfd.open_dir(parent, name)
        finally:
            if close:
                os.close(parent)
        if mount_id_at(self._view_fd, "") != view_id:
            raise LayerViewError(f"layer view {self.path}: not the recorded mount {view_id}")
        self._view_id = view_id

    def names(self, dirs: Iterable[str]) -> frozenset[str]:
        return frozenset(layer_name(d, self.host_layers) for d in dirs)

    def set(self, owner: str, dirs: Iterable[str]) -> None:
        """``owner``'s layers are exactly ``dirs`` (host layer dirs) now; binds what is new,
        unbinds what no owner uses any more.  All or nothing for ``owner``."""
        self._change(owner, self.names(dirs))

    def add(self, owner: str, dirs: Iterable[str]) -> None:
        """``dirs`` too, before a restack that stacks them (unbound again by the next :meth:`set`)."""
        self._change(owner, self._owners.get(owner, frozenset()) | self.names(dirs))

    def drop(self, owner: str) -> None:
        if self._owners.pop(owner, None) is not None:
            self._sync()

    def _change(self, owner: str, names: frozenset[str]) -> None:
        before = self._owners.get(owner)
        self._owners[owner] = names
        try:
            self._sync()
        except BaseException:
            if before is None:
                self._owners.pop(owner, None)
            else:
                self._owners[owner] = before
            self._sync_quietly()
            raise

    def _sync_quietly(self) -> None:
        try:
            self._sync()
        except (OSError, LayerViewError) as exc:
            log.error("layer view %s: %s", self.path, exc)

    def _sync(self) -> None:
        if self._view_fd is None or self._run_fd is None or self._layers_fd is None:
            raise LayerViewError(f"layer view {self.path} is not mounted")
        want = needed(self._owners)
        for name in sorted(want - set(self._binds)):
            self._bind(name)
        for name in sorted(set(self._binds) - want):
            self._unbind(name)

    def _bind(self, name: str) -> None:
        assert self._view_fd is not None and self._layers_fd is not None and self._run_fd is not None
        try:
            src = mountfd.open_dir(self._layers_fd, name)
        except OSError as exc:
            raise LayerViewError(f"layer {name}: cannot open {os.path.join(self.host_layers, name)}: "
                                 f"{exc.strerror}") from None
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=self._view_fd)
            except FileExistsError:
                pass
            self._binds[name] = mountfd.bind_at(src, self._view_fd, name, BIND_ATTRS)
        finally:
            os.close(src)
        _write_record(self._run_fd, self._view_id, self._binds, self.at)
        log.debug("layer view %s: bound %s", self.path, name)

    def _unbind(self, name: str) -> None:
        assert self._view_fd is not None and self._run_fd is not None
        mid = self._binds.pop(name)
        if not mountfd.umount_at(self._view_fd, name, mid):
            log.warning("layer view %s: %s is not the mount %d we made: left alone", self.path, name, mid)
        else:
            try:
                os.rmdir(name, dir_fd=self._view_fd)
            except OSError as exc:
                log.warning("layer view %s: rmdir %s: %s", self.path, name, exc)
        _write_record(self._run_fd, self._view_id, self._binds, self.at)
        log.debug("layer view %s: unbound %s", self.path, name)

    def forget(self) -> None:
        """Close our fds and leave the mounts (their record goes with the run dir to whoever
        took it over: a shim adopting a pooled VM, shim/pool.py)."""
        for fd in (self._view_fd, self._layers_fd, self._run_fd):
            if fd is not None:
                os.close(fd)
        self._view_fd = self._layers_fd = self._run_fd = None
        self._binds.clear()
        self._owners.clear()
        self._view_id = None

    def close(self) -> list[str]:
        """Detach everything (the record's mounts, checked by id); returns the problems."""
        problems: list[str] = []
        if self._run_fd is not None:
            problems = _undo(self._run_fd, self._view_id, self._binds, self.at)
            if not problems:
                try:
                    os.unlink(RECORD, dir_fd=self._run_fd)
                except OSError:
                    pass
        for fd in (self._view_fd, self._layers_fd, self._run_fd):
            if fd is not None:
                os.close(fd)
        self._view_fd = self._layers_fd = self._run_fd = None
        self._binds.clear()
        self._owners.clear()
        self._view_id = None
        return problems
