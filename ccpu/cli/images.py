"""`fractal image import SOURCE` and `fractal image pull REF`: get an image into containerd,
unpacked for the fractal snapshotter, from where images usually sit.

SOURCE forms (docs/images.md):

* ``oci:DIR[:TAG]``        an OCI image layout on disk
* ``docker-archive:FILE``  a ``docker save`` tarball
* ``docker://NAME``        an image of a Docker-API engine (docker, ``podman system service``),
                           read through the ``docker`` Python SDK (``images`` extra)

All of them end the same way: a tar stream into ``ctr images import --snapshotter fractal -``
(containerd's own importer: content store, image record, unpack into the snapshotter in one go),
with a progress line on stderr.  ``pull`` fetches manifest and blobs from a registry with the
``oras`` Python package into a temporary OCI layout and imports that.

The pure parts (source parsing, tag selection, reachable blobs, names) are unit-tested; the rest
is I/O.

Registries and layouts are untrusted (issue 10 item 3): every digest is checked (ccpu/digest.py)
before it becomes a path or a URL, blobs of a layout are opened relative to the layout's
directory without following symlinks, documents (index, manifests) are read up to
MAX_DOCUMENT bytes, downloads stop at the size their descriptor declares, and a download that
fails its digest check leaves nothing behind.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import digest as digests
from ..client import registryauth
from ..defaults import SNAPSHOTTER_NAME
from .common import add_containerd_flags, add_json_flag, human, print_json

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
#: largest index / manifest / oci-layout read from a layout or a registry (containerd's own
#: fetcher refuses manifests above 4 MiB as well)
MAX_DOCUMENT = 4 << 20


class ImportError_(Exception):
    """The source cannot be imported; the message says why and what to do."""


class UsageError(ImportError_):
    """Flags that do not go together (exit 2, as argparse's own errors)."""


# ------------------------------------------------------------------------------------------
# progress: one self-rewriting line on a terminal, a few plain lines otherwise (stdlib only)


class Progress:
    def __init__(self, label: str, total: int | None, stream=None, width: int = 24) -> None:  # noqa: ANN001
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width = width
        self.t0 = time.monotonic()
        self._last = 0.0
        self._last_pct = -1

    def line(self) -> str:
        el = max(time.monotonic() - self.t0, 1e-6)
        rate = f"{human(self.done / el)}/s"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * self.width)
            return (f"{self.label} [{bar:<{self.width}}] {frac * 100:3.0f}% "
                    f"{human(self.done)}/{human(self.total)} {rate}")
        return f"{self.label} {human(self.done)} {rate}"

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self._last > 0.1:
                self._last = now
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()
        elif self.total:
            pct = int(min(self.done / self.total, 1.0) * 4) * 25  # 0 25 50 75 100
            if pct != self._last_pct and 0 < pct < 100:
                self._last_pct = pct
                self.stream.write(self.line() + "\n")

    def close(self) -> None:
        if self.total is not None:
            self.total = self.done  # finished: the archive's real size (docker save's is an estimate)
        self.stream.write(("\r" if self.tty else "") + self.line() + f" in {time.monotonic() - self.t0:.1f}s"
                          + ("\x1b[K" if self.tty else "") + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------------
# pure helpers


@dataclass(frozen=True)
class Source:
    kind: str  # oci | docker-archive | docker
    path: str  # directory, file or image name
    tag: str | None = None


def parse_source(text: str) -> Source:
    if text.startswith("oci:"):
        rest = text[4:]
        # DIR[:TAG]; a tag has no '/', the directory may contain ':' only before its last '/'
        head, sep, tag = rest.rpartition(":")
        if sep and "/" not in tag and head:
            return Source("oci", head, tag)
        return Source("oci", rest)
    if text.startswith("docker-archive:"):
        return Source("docker-archive", text[len("docker-archive:"):])
    if text.startswith("docker://"):
        return Source("docker", text[len("docker://"):])
    raise ImportError_(f"unknown source {text!r}: use oci:DIR[:TAG], docker-archive:FILE or docker://NAME")


def normalize_ref(ref: str) -> str:
    """Docker-style short names to containerd's full names: busybox -> docker.io/library/busybox:latest."""
    name, digest = (ref.split("@", 1) + [""])[:2]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and not digest:
        name += ":latest"
    first = name.split("/", 1)[0]
    if "/" not in name or not ("." in first or ":" in first or first == "localhost"):
        name = "docker.io/" + ("library/" + name if "/" not in name else name)
    return name + ("@" + digest if digest else "")


def select_manifest(index: dict, tag: str | None) -> dict:
    """The descriptor of ``index.json`` for ``tag`` (its ref.name annotation); the only one if no tag."""
    manifests = index.get("manifests") or []
    if not manifests:
        raise ImportError_("the OCI layout's index.json lists no manifests")
    names = [m.get("annotations", {}).get(REF_NAME) for m in manifests]
    if tag is None:
        if len(manifests) == 1:
            return manifests[0]
        raise ImportError_("the OCI layout holds several images; pick one with oci:DIR:TAG (tags: "
                           + ", ".join(n or "<none>" for n in names) + ")")
    for m, n in zip(manifests, names):
        if n == tag or (n and n.rsplit(":", 1)[-1] == tag and "/" in n):
            return m
    raise ImportError_(f"no tag {tag!r} in the OCI layout (tags: " + ", ".join(n or "<none>" for n in names) + ")")


def children(media_type: str, doc: dict) -> list[dict]:
    """Descriptors a manifest or index refers to, each checked (`descriptor`)."""
    if not isinstance(doc, dict):
        raise ImportError_("a manifest or index is not a JSON object")
    if media_type in INDEX_TYPES or "manifests" in doc:
        found = doc.get("manifests") or []
    else:
        found = ([doc["config"]] if "config" in doc else []) + (doc.get("layers") or [])
    if not isinstance(found, list):
        raise ImportError_("a manifest's layers / an index's manifests is not a list")
    return [descriptor(d) for d in found]


def descriptor(d: object) -> dict:
    """An OCI descriptor whose digest and size may be used (as a path, a URL, a download bound)."""
    if not isinstance(d, dict):
        raise ImportError_(f"descriptor is not a JSON object: {str(d)[:100]!r}")
    try:
        digests.check(d.get("digest"))
    except digests.InvalidDigest as e:
        raise ImportError_(f"refusing descriptor: {e}") from None
    size = d.get("size", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImportError_(f"descriptor {d['digest']}: size {str(size)[:40]!r} is not a byte count")
    return d


def parse_json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ImportError_(f"{what} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ImportError_(f"{what} is not a JSON object")
    return doc


def default_name(src: Source) -> str | None:
    if src.kind == "oci":
        base = re.sub(r"[^a-z0-9._-]+", "-", Path(src.path.rstrip("/")).name.lower()).strip("-._") or "image"
        return f"localhost/{base}:{src.tag or 'latest'}"
    if src.kind == "docker":
        return normalize_ref(src.path)
    return None  # docker-archive: the names in the archive (RepoTags)


def imported_names(ctr_output: str) -> list[str]:
    """Names from ``ctr images import``'s ``unpacking NAME (sha256:...)...done`` lines."""
    return re.findall(r"^unpacking (\S+) \(sha256:[0-9a-f]+\)", ctr_output, re.M)


def blob_path(layout: Path, digest: str) -> Path:
    """``layout/blobs/<alg>/<hex>``; only for a digest that passed the check (else ImportError_)."""
    try:
        algo, _, hexd = digests.check(digest).partition(":")
    except digests.InvalidDigest as e:
        raise ImportError_(str(e)) from None
    return layout / "blobs" / algo / hexd


# ------------------------------------------------------------------------------------------
# reading an untrusted layout: relative to its directory, never through a symlink


@dataclass
class Blob:
    """A blob file of a layout, open (so what is streamed is what was checked)."""

    file: io.BufferedReader
    size: int


_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_beneath(layout_fd: int, *parts: str) -> int | None:
    """fd of the regular file ``layout/parts...``; None if missing; ImportError_ if a symlink or not a file.

    Each component is opened relative to the previous one with O_NOFOLLOW, so neither a
    symlinked ``blobs`` dir nor a symlinked blob can lead outside the layout.
    """
    fds: list[int] = []
    try:
        fd = layout_fd
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                fd = os.open(part, _NOFOLLOW | (0 if last else os.O_DIRECTORY), dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ImportError_(f"{'/'.join(parts)} in the layout is a symlink or not a "
                                       f"{'file' if last else 'directory'}: refusing it") from None
                raise
            fds.append(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImportError_(f"{'/'.join(parts)} in the layout is not a regular file")
        return fds.pop()
    finally:
        for f in fds:
            os.close(f)


def _read_doc(layout_fd: int, parts: tuple[str, ...], what: str) -> bytes | None:
    fd = _open_beneath(layout_fd, *parts)
    if fd is None:
        return None
    with open(fd, "rb") as fh:
        data = fh.read(MAX_DOCUMENT + 1)
    if len(data) > MAX_DOCUMENT:
        raise ImportError_(f"{what} is larger than {MAX_DOCUMENT} bytes")
    return data


def _blob_parts(digest: str) -> tuple[str, ...]:
    try:
        algo, _, hexd = digests.check(digest).partition(":")
    except digests.InvalidDigest as e:
        raise ImportError_(str(e)) from None
    return ("blobs", algo, hexd)


# ------------------------------------------------------------------------------------------
# tar streams


class _Counting(io.RawIOBase):
    """A write-only file that forwards to ``out`` and feeds ``progress``."""

    def __init__(self, out, progress: Progress) -> None:  # noqa: ANN001
        self.out, self.progress = out, progress

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # noqa: ANN001
        self.out.write(b)
        self.progress.update(len(b))
        return len(b)


def tar_size(sizes: Iterable[int]) -> int:
    total = sum(512 + (s + 511) // 512 * 512 for s in sizes) + 1024
    return (total + 10239) // 10240 * 10240


Member = tuple[str, "Blob | bytes"]


def oci_members(layout: Path, tag: str | None, name: str) -> list[Member]:
    """(archive path, open blob or bytes) of an OCI archive holding only the selected image, named ``name``.

    The caller closes the blobs (`close_members`).  Nothing outside ``layout`` is read.
    """
    try:
        layout_fd = os.open(layout, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImportError_(f"{layout} is not an OCI image layout ({e.strerror})") from None
    members: list[Member] = []
    try:
        index_data = _read_doc(layout_fd, ("index.json",), "index.json")
        marker = _read_doc(layout_fd, ("oci-layout",), "oci-layout")
        if index_data is None or marker is None:
            raise ImportError_(f"{layout} is not an OCI image layout (no index.json / oci-layout)")
        index = parse_json(index_data, "index.json")
        children(INDEX_TYPES[0], index)  # every descriptor of the index is checked
        desc = dict(select_manifest(index, tag))
        annotations = desc.get("annotations") if isinstance(desc.get("annotations"), dict) else {}
        desc["annotations"] = {**annotations, REF_NAME: name, CONTAINERD_NAME: name}
        new_index = {"schemaVersion": 2, "mediaType": INDEX_TYPES[0], "manifests": [desc]}
        members += [("oci-layout", marker), ("index.json", json.dumps(new_index).encode())]
        seen: set[str] = set()
        todo = [desc]
        while todo:
            d = todo.pop()
            if d["digest"] in seen:
                continue
            seen.add(d["digest"])
            parts = _blob_parts(d["digest"])
            arc = "/".join(parts)
            mt = d.get("mediaType", "")
            if mt in INDEX_TYPES + MANIFEST_TYPES:
                data = _read_doc(layout_fd, parts, f"manifest {d['digest']}")
                if data is None:
                    if d is desc:
                        raise ImportError_(f"blob {d['digest']} missing from {layout}")
                    continue  # e.g. another platform's manifest in a single-platform copy
                members.append((arc, data))
                todo.extend(children(mt, parse_json(data, f"manifest {d['digest']}")))
                continue
            fd = _open_beneath(layout_fd, *parts)
            if fd is not None:
                fh = open(fd, "rb")
                members.append((arc, Blob(fh, os.fstat(fh.fileno()).st_size)))
        return members
    except BaseException:
        close_members(members)
        raise
    finally:
        os.close(layout_fd)


def close_members(members: list[Member]) -> None:
    for _, item in members:
        if isinstance(item, Blob):
            item.file.close()


def member_size(item: "Blob | bytes") -> int:
    return len(item) if isinstance(item, bytes) else item.size


def write_tar(members: list[Member], out, progress: Progress) -> None:  # noqa: ANN001
    with tarfile.open(fileobj=_Counting(out, progress), mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for arc, item in members:
            info = tarfile.TarInfo(arc)
            info.mode, info.mtime = 0o644, 0
            info.size = member_size(item)
            tar.addfile(info, io.BytesIO(item) if isinstance(item, bytes) else item.file)


# ------------------------------------------------------------------------------------------
# containerd side


@dataclass
class Target:
    address: str
    namespace: str
    snapshotter: str = SNAPSHOTTER_NAME
    ctr: str = "ctr"

    def argv(self, *args: str) -> list[str]:
        return [self.ctr, "--address", self.address, "--namespace", self.namespace, *args]

    def run(self, *args: str, timeout: float = 120) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("CONTAINERD_SNAPSHOTTER",)}
        r = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            raise ImportError_(f"ctr {' '.join(args[:2])}: {(r.stderr or r.stdout).strip()}")
        return r.stdout


def ctr_import(target: Target, feed: Callable[[object], None], label: str, total: int | None,
               stream=None) -> list[str]:  # noqa: ANN001
    """Run ``ctr images import --snapshotter S -`` with ``feed(stdin)`` writing the archive."""
    if shutil.which(target.ctr) is None:
        raise ImportError_(f"{target.ctr} not found on PATH (it comes with containerd)")
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINERD_SNAPSHOTTER",)}
    progress = Progress(label, total, stream)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(target.argv("images", "import", "--snapshotter", target.snapshotter, "-"),
                                stdin=subprocess.PIPE, stdout=out, stderr=err, env=env)
        broken = None
        try:
            feed(_Counting(proc.stdin, progress))
        except BrokenPipeError as e:
            broken = e
        finally:
            try:
                proc.stdin.close()  # type: ignore[union-attr]
            except BrokenPipeError:
                pass
        rc = proc.wait(timeout=1800)
        progress.close()
        out.seek(0)
        err.seek(0)
        text, etext = out.read(), err.read()
    if rc != 0 or broken:
        raise ImportError_(f"ctr images import failed: {(etext or text).strip() or broken}")
    names = imported_names(text)
    if not names:
        raise ImportError_(f"ctr images import imported nothing: {(text + etext).strip()}")
    return names


def rename(target: Target, names: list[str], new: str) -> list[str]:
    """Tag the imported image as ``new`` (and drop the archive's name)."""
    if names == [new]:
        return names
    target.run("images", "tag", "--force", names[0], new)
    for n in names:
        if n != new:
            target.run("images", "rm", n)
    return [new]


# ------------------------------------------------------------------------------------------
# the sources


def import_oci(target: Target, layout: Path, tag: str | None, name: str, stream=None,  # noqa: ANN001
               label: str | None = None) -> list[str]:
    members = oci_members(layout, tag, name)
    try:
        sizes = [member_size(i) for _, i in members]
        label = label or f"import {layout.name}{':' + tag if tag else ''}"
        return ctr_import(target, lambda fh: write_tar(members, fh, _NoProgress()), label, tar_size(sizes), stream)
    finally:
        close_members(members)


class _NoProgress:
    def update(self, n: int) -> None:
        pass


def _copy(src, dst, chunk: int = 1 << 20) -> None:  # noqa: ANN001
    while True:
        b = src.read(chunk)
        if not b:
            return
        dst.write(b)


def import_docker_archive(target: Target, path: Path, name: str | None, stream=None) -> list[str]:  # noqa: ANN001
    if not path.is_file():
        raise ImportError_(f"{path}: no such file")

    def feed(fh) -> None:  # noqa: ANN001
        with open(path, "rb") as src:
            _copy(src, fh)

    names = ctr_import(target, feed, f"import {path.name}", path.stat().st_size, stream)
    return rename(target, names, name) if name else names


def import_docker(target: Target, image: str, name: str | None, docker_host: str | None,
                  stream=None) -> list[str]:  # noqa: ANN001
    try:
        import docker  # the `images` extra
    except ModuleNotFoundError:
        raise ImportError_("docker:// needs the docker Python SDK: pip install 'fractal[images]'") from None
    try:
        client = docker.DockerClient(base_url=docker_host) if docker_host else docker.from_env()
        img = client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ImportError_(f"the engine has no image {image!r} (docker pull / podman pull it first)") from None
    except docker.errors.DockerException as e:
        raise ImportError_(f"cannot talk to the Docker API ({docker_host or os.environ.get('DOCKER_HOST') or 'default socket'}): {e}") from None
    tags = img.tags or []
    # the archive's RepoTags: the asked-for name when it is a tag of the image, else its first tag
    wanted = next((t for t in tags if t in (image, normalize_ref(image))), None)
    chunks = img.save(named=wanted or bool(tags))

    def feed(fh) -> None:  # noqa: ANN001
        for c in chunks:
            fh.write(c)

    names = ctr_import(target, feed, f"import {image}", img.attrs.get("Size") or None, stream)
    return rename(target, names, name or normalize_ref(image))


# ------------------------------------------------------------------------------------------
# pull with oras


def host_platform() -> tuple[str, str]:
    m = platform.machine()
    return "linux", {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(m, m)


def pick_platform(index: dict, want: tuple[str, str]) -> dict:
    for m in index.get("manifests") or []:
        p = m.get("platform") or {}
        if (p.get("os"), p.get("architecture")) == want:
            return m
    avail = [f"{(m.get('platform') or {}).get('os')}/{(m.get('platform') or {}).get('architecture')}"
             for m in index.get("manifests") or []]
    raise ImportError_(f"no {want[0]}/{want[1]} image in the index (has: {', '.join(avail)})")


def _reachable(registry: str, plain_http: bool, timeout: float = 5.0) -> None:
    import socket

    m = re.fullmatch(r"(.+):(\d+)", registry)
    host, port = (m.group(1), int(m.group(2))) if m else (registry, 80 if plain_http else 443)
    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout).close()
    except OSError as e:
        raise ImportError_(f"cannot reach {registry}: {e.strerror or e}") from None


def _read_bounded(r, limit: int, what: str) -> bytes:  # noqa: ANN001 - a requests.Response
    data = b""
    for chunk in r.iter_content(chunk_size=1 << 16):
        data += chunk
        if len(data) > limit:
            raise ImportError_(f"{what} is larger than {limit} bytes")
    return data


def challenge_scheme(www_authenticate: str | None) -> str | None:
    """The scheme of a 401's ``WWW-Authenticate`` (``basic``, ``bearer``), lower-case; None without one."""
    scheme = (www_authenticate or "").strip().split(" ", 1)[0].lower()
    return scheme or None


def oras_backend(scheme: str | None) -> str:
    """oras' auth backend for what the registry asks: ``basic`` for a Basic challenge (docker-registry
    with htpasswd, many private registries), ``token`` otherwise (Bearer: Docker Hub, ghcr, quay,
    Harbor; and registries that ask for nothing)."""
    return "basic" if scheme == "basic" else "token"


def _challenge(registry: str, prefix: str) -> str | None:
    """``GET /v2/`` without credentials (the distribution spec's auth probe): the 401's
    ``WWW-Authenticate`` header, or None when the registry lets anyone in."""
    import requests  # oras' own dependency

    try:
        r = requests.get(f"{prefix}://{registry}/v2/", timeout=30)
    except requests.RequestException as e:
        raise ImportError_(f"cannot reach {registry}: {type(e).__name__}"
                           + ("" if prefix == "http" else " (plain http registry? add --plain-http)")) from None
    with r:
        return r.headers.get("WWW-Authenticate", "") if r.status_code == 401 else None


def _unretried(reg):  # noqa: ANN001, ANN202 - an oras.provider.Registry
    """``reg.do_request`` without oras' retry decorator: that one sleeps 3+5+11+29+83 s on any
    exception, a refused login included; a pull reports a failure at once instead."""
    fn = getattr(type(reg).do_request, "__wrapped__", None)
    return (lambda *a, **kw: fn(reg, *a, **kw)) if fn else reg.do_request


def pull_to_layout(ref: str, layout: Path, plain_http: bool, stream=None,  # noqa: ANN001
                   credentials: "registryauth.Credentials | None" = None,
                   find_credentials: Callable[[str, str], "registryauth.Credentials | None"] | None = None) -> dict:
    """Fetch REF's manifest (the host platform's, if REF is an index) and its blobs into an OCI layout.

    Credentials: ``credentials`` (the command line), else the user's auth files
    (`registryauth.find`); they are handed to oras' own auth backend, which answers the
    registry's challenge (Basic, or a Bearer token fetched with them).  Returns the manifest
    descriptor written to index.json.
    """
    try:
        import oras.container
        import oras.defaults
        import oras.provider
    except ModuleNotFoundError:
        raise ImportError_("image pull needs the oras Python package: pip install 'fractal[images]'") from None
    container = oras.container.Container(ref)
    _reachable(container.registry, plain_http)  # oras retries with backoff for minutes otherwise
    prefix = "http" if plain_http else "https"
    scheme = challenge_scheme(_challenge(container.registry, prefix))
    creds = credentials
    if creds is None and scheme is not None:  # asked for: look in the auth files
        try:
            creds = (find_credentials or registryauth.find)(container.registry, container.api_prefix)
        except registryauth.RegistryAuthError as e:
            raise ImportError_(str(e)) from None
    if scheme == "basic" and creds is None:
        raise ImportError_(f"{container.registry} asks for credentials (HTTP 401): "
                           + registryauth.login_hint(container.registry))
    reg = oras.provider.Registry(hostname=container.registry, insecure=plain_http, auth_backend=oras_backend(scheme))
    if creds is not None:
        reg.auth.set_basic_auth(creds.username, creds.password)
    request = _unretried(reg)
    accept = ", ".join(INDEX_TYPES + MANIFEST_TYPES)

    def refused(status: int) -> ImportError_:
        if creds is None:
            return ImportError_(f"{container.registry} asks for credentials (HTTP {status}): "
                                + registryauth.login_hint(container.registry))
        return ImportError_(f"{container.registry} refused the credentials ({creds}) for "
                            f"{container.api_prefix} (HTTP {status}); "
                            + registryauth.login_hint(container.registry))

    def get(url: str, accept_hdr: str | None = None):  # noqa: ANN202 (url: digests checked by the caller)
        headers = {"Accept": accept_hdr} if accept_hdr else {}
        try:
            r = request(url, "GET", headers=headers, stream=True)
        except ValueError as e:  # oras: "Cannot respond to request for authentication."
            if "authentication" in str(e):
                raise refused(401) from None
            raise ImportError_(f"GET {url}: {e}") from None
        except Exception as e:  # noqa: BLE001 - requests' many errors, one message
            raise ImportError_(f"cannot reach {container.registry}: {type(e).__name__}: {e}"
                               + ("" if plain_http else " (plain http registry? add --plain-http)")) from None
        if r.status_code in (401, 403):
            r.close()
            raise refused(r.status_code)
        if r.status_code != 200:
            raise ImportError_(f"GET {url}: HTTP {r.status_code} {r.text[:200]}")
        return r

    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def save(data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blob_path(layout, digest).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def manifest(reference: str) -> tuple[dict, dict]:
        if ":" in reference:  # by digest: checked before it goes into the URL, and verified after
            try:
                digests.check(reference, "manifest digest")
            except digests.InvalidDigest as e:
                raise ImportError_(f"{ref}: {e}") from None
        url = f"{reg.prefix}://{container.registry}/v2/{container.api_prefix}/manifests/{reference}"
        with get(url, accept) as r:
            data = _read_bounded(r, MAX_DOCUMENT, f"manifest {reference}")
            mt = r.headers.get("Content-Type", "").split(";")[0]
        if ":" in reference and digests.of(reference, data) != reference:
            raise ImportError_(f"manifest {reference} from {ref}: digest mismatch (got {digests.of(reference, data)})")
        doc = parse_json(data, f"manifest {reference}")
        return save(data, mt or str(doc.get("mediaType") or MANIFEST_TYPES[0])), doc

    desc, doc = manifest(container.digest or container.tag)
    if desc["mediaType"] in INDEX_TYPES:
        chosen = pick_platform({"manifests": children(INDEX_TYPES[0], doc)}, host_platform())
        desc, doc = manifest(chosen["digest"])
        desc["platform"] = chosen.get("platform")
    blobs = children(desc["mediaType"], doc)  # every digest checked before any path or URL use
    for i, b in enumerate(blobs):
        p = blob_path(layout, b["digest"])
        (layout / "blobs" / p.parent.name).mkdir(exist_ok=True)
        if p.exists():
            continue
        url = f"{reg.prefix}://{container.get_blob_url(b['digest'])}"
        prog = Progress(f"pull {i + 1}/{len(blobs)} {b['digest'][7:19]}", b.get("size"), stream)
        h = digests.hasher(b["digest"])
        tmp = p.with_name(p.name + ".part")
        try:
            with get(url) as r, open(tmp, "wb") as fh:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    if prog.done + len(chunk) > b.get("size", 0):
                        raise ImportError_(f"blob {b['digest']} from {ref}: more than the "
                                           f"{b.get('size', 0)} bytes its descriptor declares")
                    fh.write(chunk)
                    h.update(chunk)
                    prog.update(len(chunk))
            prog.close()
            got = f"{h.name}:{h.hexdigest()}"
            if got != b["digest"]:
                raise ImportError_(f"blob {b['digest']} from {ref}: digest mismatch (got {got})")
            tmp.rename(p)
        finally:
            tmp.unlink(missing_ok=True)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return desc


# ------------------------------------------------------------------------------------------
# CLI


def _target(args) -> Target:  # noqa: ANN001
    from ..client.address import resolve_target

    address, namespace = resolve_target(args.address, args.namespace)
    return Target(address, namespace, snapshotter=args.snapshotter)


def _done(names: list[str], t0: float, target: Target, as_json: bool) -> None:
    if as_json:
        print_json({"images": names, "snapshotter": target.snapshotter, "namespace": target.namespace,
                    "seconds": round(time.monotonic() - t0, 3)})
        return
    for n in names:
        print(f"imported {n} (unpacked for snapshotter {target.snapshotter}, namespace {target.namespace}) "
              f"in {time.monotonic() - t0:.1f}s")


def source_arg(text: str) -> Source:
    """SOURCE's argparse type: an unknown form is a usage error (exit 2)."""
    try:
        return parse_source(text)
    except ImportError_ as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_image_import(args) -> int:  # noqa: ANN001
    t0 = time.monotonic()
    try:
        target = _target(args)
        src: Source = args.source
        if src.kind == "oci":
            names = import_oci(target, Path(src.path), src.tag, args.name or default_name(src))
        elif src.kind == "docker-archive":
            names = import_docker_archive(target, Path(src.path), args.name)
        else:
            names = import_docker(target, src.path, args.name, args.docker_host)
    except (ImportError_, OSError, subprocess.SubprocessError) as e:
        print(f"fractal image import: {e}", file=sys.stderr)
        return 1
    _done(names, t0, target, args.json)
    return 0


def read_password(stdin) -> str:  # noqa: ANN001
    """``--password-stdin``: the first line of stdin without its line end (docker login's rule)."""
    line = stdin.readline()
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ImportError_("--password-stdin: stdin gave no password")
    return password


def command_line_credentials(args) -> "registryauth.Credentials | None":  # noqa: ANN001
    """--username with --password-stdin (or a prompt on a terminal); a password is never a flag,
    so it shows up in no process list or shell history."""
    if args.password_stdin and not args.username:
        raise UsageError("--password-stdin needs --username")
    if not args.username:
        return None
    if args.password_stdin:
        password = read_password(sys.stdin)
    elif sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"Password for {args.username}: ")
    else:
        raise UsageError("--username needs --password-stdin when stdin is not a terminal")
    return registryauth.Credentials(args.username, password)


def cmd_image_pull(args) -> int:  # noqa: ANN001
    t0 = time.monotonic()
    try:
        target = _target(args)
        name = args.name or normalize_ref(args.ref)
        creds = command_line_credentials(args)
        with tempfile.TemporaryDirectory(prefix="fractal-pull-") as tmp:
            layout = Path(tmp)
            pull_to_layout(normalize_ref(args.ref) if "/" not in args.ref else args.ref, layout,
                           args.plain_http, credentials=creds)
            names = import_oci(target, layout, None, name, label=f"import {name}")
    except UsageError as e:
        print(f"fractal image pull: {e} (see 'fractal image pull --help')", file=sys.stderr)
        return 2
    except (ImportError_, OSError, subprocess.SubprocessError) as e:
        print(f"fractal image pull: {e}", file=sys.stderr)
        return 1
    _done(names, t0, target, args.json)
    return 0


def register(group) -> None:  # noqa: ANN001
    image = group.add_subparsers(dest="image_command", metavar="COMMAND")
    p = image.add_parser("import", help="import oci:DIR[:TAG], docker-archive:FILE or docker://NAME")
    p.add_argument("source", type=source_arg, help="oci:DIR[:TAG] | docker-archive:FILE | docker://NAME")
    add_containerd_flags(p)
    p.add_argument("--name", default=None, help="image name in containerd (default: from the source)")
    p.add_argument("--snapshotter", default=SNAPSHOTTER_NAME, help="unpack for this snapshotter (default %(default)s)")
    p.add_argument("--docker-host", default=None,
                   help="Docker API address for docker:// (default $DOCKER_HOST or the docker socket), "
                        "e.g. unix:///run/podman/podman.sock")
    add_json_flag(p, "print what was imported as JSON (progress stays on stderr)")
    p.set_defaults(func=cmd_image_import)
    p = image.add_parser("pull", help="pull REF from a registry (oras) and import it")
    p.add_argument("ref")
    add_containerd_flags(p)
    p.add_argument("--name", default=None, help="image name in containerd (default: REF)")
    p.add_argument("--plain-http", action="store_true", help="registry speaks http, not https")
    p.add_argument("-u", "--username", default=None,
                   help="registry user (default: the credentials of docker/podman login's auth files)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the registry password from stdin's first line (with --username)")
    p.add_argument("--snapshotter", default=SNAPSHOTTER_NAME, help="unpack for this snapshotter (default %(default)s)")
    add_json_flag(p, "print what was imported as JSON (progress stays on stderr)")
    p.set_defaults(func=cmd_image_pull)
