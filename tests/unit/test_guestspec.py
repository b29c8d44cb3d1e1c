"""shim.guestspec: what a host spec becomes in the VM guest (pure; the stat is a table here)."""

from __future__ import annotations

import json

import pytest

from shim import guestspec as gs

HOSTS = "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/abc/hosts"
SHM = "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/abc/shm"
FS = {HOSTS: (gs.FILE, 120), "/etc/resolv.conf": (gs.FILE, 60), SHM: (gs.DIR, 0),
      "/srv/data": (gs.DIR, 0), "/big": (gs.FILE, gs.MAX_FILE + 1), "/dev/null": (gs.OTHER, 0)}


def kind_of(path: str) -> tuple[str, int]:
    return FS.get(path, (gs.MISSING, 0))


def cri_app_spec() -> dict:
    return {
        "process": {"args": ["sh"]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": HOSTS, "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf", "options": ["rbind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": SHM, "options": ["rbind", "rw"]},
        ],
        "linux": {"namespaces": [
            {"type": "pid"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "uts", "path": "/proc/42/ns/uts"},
            {"type": "mount"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
        ]},
        "hooks": {"createRuntime": [{"path": "/usr/bin/hook", "args": ["hook", "create"]}],
                  "poststop": [{"path": "/usr/bin/hook", "args": ["hook", "stop"]}]},
    }


def test_cri_app_container() -> None:
    spec = cri_app_spec()
    out = gs.translate(spec, "c1", "/run/fractal/bundles/c1", kind_of)
    mounts = {m["destination"]: m for m in out.spec["mounts"]}
    # files are copied into the guest bundle, options kept
    assert [(c.host_path, c.guest_path) for c in out.copies] == [
        (HOSTS, "/run/fractal/bundles/c1/files/0-hosts"),
        ("/etc/resolv.conf", "/run/fractal/bundles/c1/files/1-resolv.conf")]
    assert mounts["/etc/hosts"]["source"] == "/run/fractal/bundles/c1/files/0-hosts"
    assert mounts["/etc/resolv.conf"]["options"] == ["rbind", "ro"]
    # the pod's shm: one guest dir per host source, under the shared-dir root
    assert out.shm_dirs == [mounts["/dev/shm"]["source"]]
    assert out.shm_dirs[0].startswith(gs.GUEST_SHM_ROOT + "/")
    again = gs.translate(spec, "c2", "/run/fractal/bundles/c2", kind_of)
    assert again.shm_dirs == out.shm_dirs  # same pod, same shm
    # the netns path goes (the VM is the pod's network); /proc/<guest pid> paths stay
    assert out.spec["linux"]["namespaces"] == [
        {"type": "pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "mount"}]
    # hooks leave the guest spec and are returned for the host
    assert "hooks" not in out.spec
    assert sorted(out.host_hooks) == ["createRuntime", "poststop"]
    # the input is not modified
    assert spec["mounts"][1]["source"] == HOSTS and "hooks" in spec
    assert gs.network_namespace(spec) == "/var/run/netns/cni-1234"
    assert gs.network_namespace(out.spec) is None


def test_net_sysctls_follow_the_pod_netns() -> None:
    """runc refuses net.* sysctls without a netns of the container's own (containerd 2.x's CRI
    sets net.ipv4.ip_unprivileged_port_start): they go to the agent, for the guest's netns."""
    spec = {"linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}],
                      "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.msgmax": "8192"}}}
    out = gs.translate(spec, "c", "/b", kind_of)
    assert out.sysctls == {"net.ipv4.ip_unprivileged_port_start": "0"}
    assert out.spec["linux"]["sysctl"] == {"kernel.msgmax": "8192"}
    # with a netns of its own (or a guest pid's), runc applies them itself
    spec = {"linux": {"namespaces": [{"type": "network"}], "sysctl": {"net.core.somaxconn": "10"}}}
    assert gs.translate(spec, "c", "/b", kind_of).sysctls == {}


def test_guest_pid_network_namespace_stays() -> None:
    """CRI (host-network pods) joins the pause container's netns by /proc/<pid>: a guest pid."""
    spec = {"linux": {"namespaces": [{"type": "network", "path": "/proc/146/ns/net"}]}}
    assert gs.translate(spec, "c", "/b", kind_of).spec == spec
    assert gs.network_namespace(spec) is None


def test_new_network_namespace_stays() -> None:
    spec = {"linux": {"namespaces": [{"type": "network"}]}}
    assert gs.translate(spec, "c", "/b", kind_of).spec == spec


@pytest.mark.parametrize("mount, why", [
    ({"destination": "/x", "type": "none", "source": "/nope", "options": ["bind"]}, "missing host path /nope"),
    ({"destination": "/dev/null2", "type": "bind", "source": "/dev/null"}, "not a file or directory"),
    ({"destination": "/rel", "type": "bind", "source": "relative/path"}, "missing host path"),
])
def test_refused_mounts(mount: dict, why: str) -> None:
    with pytest.raises(gs.NotInVm, match=why):
        gs.translate({"mounts": [mount]}, "c", "/b", kind_of)


def test_volumes_go_through_the_share() -> None:
    """Host directories (and files too big to copy) are shared, not copied: one Volume each."""
    spec = {"mounts": [
        {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
        {"destination": "/big", "type": "bind", "source": "/big", "options": ["bind"]},
        {"destination": "/etc/hosts", "type": "bind", "source": HOSTS, "options": ["rbind"]},
    ]}
    out = gs.translate(spec, "c1", "/run/fractal/bundles/c1", kind_of)
    assert out.volumes == [gs.Volume("/srv/data", "c1/0", True, True, True),
                           gs.Volume("/big", "c1/1", False, False, False)]
    assert [m["source"] for m in out.spec["mounts"]] == [
        f"{gs.GUEST_VOLUMES}/c1/0", f"{gs.GUEST_VOLUMES}/c1/1", "/run/fractal/bundles/c1/files/0-hosts"]
    assert out.spec["mounts"][0]["options"] == ["rbind", "ro"]


def test_every_problem_is_listed() -> None:
    spec = {"mounts": [{"destination": "/a", "type": "bind", "source": "/dev/null"},
                       {"destination": "/b", "type": "bind", "source": "/nope"}],
            "linux": {"namespaces": [{"type": "ipc", "path": "/run/ipcns"}]},
            "hooks": {"startContainer": [{"path": "/x"}]}}
    with pytest.raises(gs.NotInVm) as info:
        gs.translate(spec, "c", "/b", kind_of)
    msg = str(info.value)
    for part in ("/a: bind of host path", "/b: bind of missing", "ipc namespace /run/ipcns",
                 "startContainer hooks", "io.fractal.mode=host"):
        assert part in msg


def test_total_copy_limit() -> None:
    """Beyond the copy budget, files are shared like volumes."""
    files = {f"/f{i}": (gs.FILE, gs.MAX_FILE) for i in range(3)}
    spec = {"mounts": [{"destination": p, "type": "bind", "source": p} for p in files]}
    out = gs.translate(spec, "c", "/b", lambda p: files[p])
    assert [c.host_path for c in out.copies] == ["/f0", "/f1"]
    assert [v.host_path for v in out.volumes] == ["/f2"]


@pytest.mark.parametrize("networks, cni", [
    (["none"], []), (["host"], []), (["container:abc"], []), (["bridge"], ["bridge"]),
    (["none", "mynet"], ["mynet"])])
def test_nerdctl_cni_networks(networks: list[str], cni: list[str]) -> None:
    """CNI networks are no longer refused: the shim plugs a NIC for them; the container's own
    new netns goes (it runs in the guest's, which gets the NIC); other networks keep theirs."""
    spec = {"annotations": {"nerdctl/networks": json.dumps(networks)},
            "linux": {"namespaces": [{"type": "network"}, {"type": "pid"}],
                      "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shmmax": "1"}}}
    out = gs.translate(spec, "c", "/b", kind_of)
    assert out.cni_networks == cni
    kept = [ns["type"] for ns in out.spec["linux"]["namespaces"]]
    assert kept == (["pid"] if cni else ["network", "pid"])
    # the net.* sysctls go with the netns: the agent sets them in the guest's
    assert out.sysctls == ({"net.ipv4.ip_unprivileged_port_start": "0"} if cni else {})
    assert "kernel.shmmax" in out.spec["linux"]["sysctl"]
    assert spec["linux"]["namespaces"][0] == {"type": "network"}  # the caller's spec is not changed
