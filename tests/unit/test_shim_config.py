"""Mode selection and VM settings (shim/config.py), a VM sandbox's run dir and placement (shim/vm.py)."""

from __future__ import annotations

import os

import pytest

from shim import config as c
from shim import vm


def _read(files: dict[str, str]):  # noqa: ANN202
    def read(path: str, base: c.Config, required: bool) -> c.Config:
        if path not in files:
            if required:
                raise c.ConfigError(f"config file {path} does not exist")
            return base
        return c.parse_toml(files[path], path, base)
    return read


def test_default_is_vm() -> None:
    cfg = c.resolve({}, runtime_config=None, global_file=None, read=_read({}))
    assert cfg.mode == "vm" and cfg.vm == c.VmSettings()


def test_precedence_annotation_over_runtime_file_over_global() -> None:
    files = {"/g.toml": 'mode = "host"\n[vm]\nmemory = "1G"\ncpus = 4\n',
             "/r.toml": 'mode = "vm"\n[vm]\ncpus = 1\nshare = "9p"\n'}
    cfg = c.resolve({}, runtime_config=None, global_file="/g.toml", read=_read(files))
    assert cfg.mode == "host" and cfg.vm.memory_mb == 1024 and cfg.vm.cpus == 4
    cfg = c.resolve({}, runtime_config="/r.toml", global_file="/g.toml", read=_read(files))
    assert cfg.mode == "vm" and cfg.vm.memory_mb == 1024 and cfg.vm.cpus == 1 and cfg.vm.share == "9p"
    cfg = c.resolve({"io.fractal.mode": "host", "io.fractal.share": "virtiofs",
                     "io.fractal.vm.memory": "256M", "io.fractal.vm.cpus": "3"},
                    runtime_config="/r.toml", global_file="/g.toml", read=_read(files))
    assert (cfg.mode, cfg.vm.share, cfg.vm.memory_mb, cfg.vm.cpus) == ("host", "virtiofs", 256, 3)


def test_default_file_is_optional_but_named_files_are_required() -> None:
    assert c.resolve({}, runtime_config=None, global_file=None, read=_read({})).mode == "vm"
    with pytest.raises(c.ConfigError, match="does not exist"):
        c.resolve({}, runtime_config=None, global_file="/missing.toml", read=_read({}))
    with pytest.raises(c.ConfigError, match="does not exist"):
        c.resolve({}, runtime_config="/missing.toml", global_file=None, read=_read({}))


@pytest.mark.parametrize("text, match", [
    ('mode = "kvm"', "mode"),
    ('moed = "vm"', "unknown key"),
    ('[vm]\nmemroy = "1G"', "unknown key vm.memroy"),
    ('[vm]\nmemory = "lots"', "size"),
    ('[vm]\nmemory = "16K"', "out of range"),
    ('[vm]\ncpus = 0', "out of range"),
    ('[vm]\naccel = "hvf"', "accel"),
    ('[vm]\nshare = "nfs"', "share"),
    ('[vm]\nboot_timeout = -1', "boot_timeout"),
    ('[vm]\nconsole_log_kib = 8', "console_log_kib"),
    ('[vm]\nconsole_log_kib = "1M"', "console_log_kib"),
    ("mode = ", "not valid TOML"),
    ('allowed_annotations = "mode"', "list of strings"),
    ("allowed_annotations = [1]", "list of strings"),
    ('allowed_annotations = ["("]', "not a regular expression"),
    ('[vm]\nmax_cpus = 0', "out of range"),
    ('[vm]\nmax_memory = "lots"', "size"),
    ("[vm]\nboot_timeout = inf", "boot_timeout"),
])
def test_bad_files(text: str, match: str) -> None:
    with pytest.raises(c.ConfigError, match=match):
        c.parse_toml(text, "/f.toml")


def test_bad_annotation() -> None:
    with pytest.raises(c.ConfigError, match="io.fractal.mode"):
        c.apply_annotations(c.Config(), {"io.fractal.mode": "container"})


@pytest.mark.parametrize("value, mb", [(512, 512), ("512", 512), ("512M", 512), ("1G", 1024),
                                       ("1GiB", 1024), ("2g", 2048), ("1.5G", 1536),
                                       ("262144K", 256)])
def test_memory(value: object, mb: int) -> None:
    assert c.parse_memory(value) == mb


def test_all_keys_accepted() -> None:
    cfg = c.parse_toml('mode = "vm"\n[vm]\nmemory = "768M"\ncpus = 2\naccel = "tcg"\n'
                       'share = "virtiofs"\nboot_timeout = 120\n', "/f")
    assert cfg.vm == c.VmSettings(768, 2, "tcg", "virtiofs", 120.0)
    assert c.parse_toml("[vm]\nconsole_log_kib = 64\n", "/f").vm.console_log_kib == 64


def test_conflict() -> None:
    assert c.conflict("vm", {}) is None
    assert c.conflict("vm", {"io.fractal.mode": "vm"}) is None
    assert "already runs in vm mode" in (c.conflict("vm", {"io.fractal.mode": "host"}) or "")
    assert "already runs in host mode" in (c.conflict("host", {"io.fractal.mode": "VM"}) or "")
    assert c.conflict("?", {"io.fractal.mode": "vm"}) is None  # a failed sandbox says why itself


def _pb_str(field: int, data: bytes) -> bytes:
    return bytes([field << 3 | 2, len(data)]) + data


def test_runtime_options_config_path() -> None:
    inner = _pb_str(1, b"") + _pb_str(2, b"/etc/fractal/vm.toml")
    for url in (b"runtimeoptions.v1.Options", b"types.googleapis.com/runtimeoptions.v1.Options"):
        raw = _pb_str(1, url) + _pb_str(2, inner)
        assert c.config_path_from_options(raw) == "/etc/fractal/vm.toml"
    runc = _pb_str(1, b"containerd.runc.v1.Options") + _pb_str(2, _pb_str(2, b"/x"))
    assert c.config_path_from_options(runc) is None
    assert c.config_path_from_options(b"") is None
    assert c.config_path_from_options(b"\xff\xff\xff") is None
    assert c.config_path_from_options(_pb_str(1, b"runtimeoptions.v1.Options")) is None


def test_runtime_options_against_protobuf() -> None:
    """The hand decoder against real protobuf encoding (Any of a message with field 2)."""
    from google.protobuf import any_pb2, wrappers_pb2

    # StringValue has `value = 1`; build Options{config_path = 2} by hand, wrap in a real Any
    value = _pb_str(2, b"/a/b.toml")
    raw = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=value).SerializeToString()
    assert c.config_path_from_options(raw) == "/a/b.toml"
    assert c.config_path_from_options(any_pb2.Any(
        type_url="google.protobuf.StringValue",
        value=wrappers_pb2.StringValue(value="x").SerializeToString()).SerializeToString()) is None


# -- VM run dir and placement ----------------------------------------------------------------

LAYERS = "/var/lib/fractal/layers"


def test_vm_run_dir() -> None:
    assert vm.vm_run_dir("/run/fractal", "default", "sb") == "/run/fractal/vms/default/sb"
    for ns, group in (("..", "x"), ("a", "b/c"), ("", "x")):
        with pytest.raises(ValueError):
            vm.vm_run_dir("/run/fractal", ns, group)


from ccpu.stack import LayerStack  # noqa: E402
from shim.rootfs import NoRootfs, PassThroughMounts  # noqa: E402


def test_placement_host_is_identity() -> None:
    from shim.hostsandbox import InprocSandbox

    sb = InprocSandbox(reaper=None, runc_root="/r", bundle_root="/b", layer_roots=[])
    assert sb.layer_path(f"{LAYERS}/a") == f"{LAYERS}/a"
    assert sb.placement("c", "/b/c", NoRootfs(), {}) == {"bundle": "/b/c", "rootfs": {"kind": "none"}}


def test_vm_placement(tmp_path) -> None:  # noqa: ANN001
    class View:  # the layer view mounts (tests/security/test_vm_layer_view.py); here: its calls
        path = str(tmp_path / "view")
        owners: dict = {}

        def create(self) -> None:
            pass

        def set(self, owner: str, dirs: list) -> None:
            self.owners[owner] = list(dirs)

        def drop(self, owner: str) -> None:
            self.owners.pop(owner, None)

        def close(self) -> list:
            return []

    sb = vm.VmSandbox(reaper=None, namespace="ns", group="g", repo_root="/var/lib/fractal",
                      run_dir=str(tmp_path), settings=c.VmSettings())
    sb.view = View()
    try:
        _check_placement(sb, tmp_path)
    finally:  # the sandbox's volume view is a real mount: undo it as the shim's stop does
        from shim.mountrecord import remove_run_dir

        remove_run_dir(sb.dir)


def _check_placement(sb, tmp_path) -> None:  # noqa: ANN001
    from ccpu import errdefs

    assert sb.layer_path(f"{LAYERS}/a") == "/repo/layers/a"
    spec = {"process": {"args": ["true"]}, "mounts": [{"destination": "/proc", "type": "proc"}]}
    rootfs = LayerStack((f"{LAYERS}/a",), "/u", "/w")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    args = sb.placement("c1", str(bundle), rootfs, spec)
    assert args == {"bundle": "/run/fractal/bundles/c1", "spec": spec,
                    "rootfs": {"kind": "layers", "lowers": ["/repo/layers/a"],
                               "upper": "/run/fractal/containers/c1/upper",
                               "work": "/run/fractal/containers/c1/work"},
                    # its own tmpfs holds upper and work: a quarter of the guest's 512M
                    "scratch": {"path": "/run/fractal/containers/c1", "size": 128 << 20},
                    "files": [], "dirs": [], "sysctls": {}}
    assert (bundle / "console.log").is_symlink()
    assert sb.view.owners == {"c1": [f"{LAYERS}/a"]}  # its layers become visible to the guest
    with pytest.raises(errdefs.FailedPrecondition, match="fractal snapshotter"):
        sb.placement("c2", str(bundle), PassThroughMounts(()), spec)
    with pytest.raises(errdefs.FailedPrecondition, match="bind of host path .*/dev/null"):
        sb.placement("c3", str(bundle), rootfs, {"mounts": [{"destination": "/x", "type": "bind",
                                                            "source": "/dev/null"}]})
    # a small host file is read now and sent along (a copy: later changes are not seen)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    hosts.chmod(0o640)
    args = sb.placement("c4", str(bundle), rootfs, {"mounts": [
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["rbind", "ro"]}]})
    # ... onto the container's own tmpfs: its writes to it count against its own limit
    assert args["files"] == [{"path": "/run/fractal/containers/c4/files/0-hosts",
                              "data": "MTI3LjAuMC4xIGxvY2FsaG9zdAo=", "mode": 0o640}]
    assert args["spec"]["mounts"][0]["source"] == "/run/fractal/containers/c4/files/0-hosts"
    # a container's own annotation sets its writable layer, within the operator's maximum
    ann = {"annotations": {"io.fractal.vm.scratch": "200M"}}
    assert sb.placement("c5", str(bundle), rootfs, {**spec, **ann})["scratch"]["size"] == 200 << 20
    with pytest.raises(errdefs.InvalidArgument, match="vm.scratch_max"):
        sb.placement("c6", str(bundle), rootfs, {**spec, "annotations": {"io.fractal.vm.scratch": "300M"}})


def test_scratch_and_reserve_settings() -> None:
    cfg = c.parse_toml('[vm]\nmemory = "1G"\n', "f")
    assert (cfg.vm.scratch_limit_mb, cfg.vm.scratch_ceiling_mb, cfg.vm.memory_reserve_mb) == (256, 512, 64)
    cfg = c.parse_toml('[vm]\nscratch = "32M"\nscratch_max = "64M"\nmemory_reserve = "96M"\n', "f")
    assert (cfg.vm.scratch_limit_mb, cfg.vm.scratch_ceiling_mb, cfg.vm.memory_reserve_mb) == (32, 64, 96)
    # a pod annotation sets the sandbox's default, never above the files' maximum
    assert c.apply_annotations(cfg, {"io.fractal.vm.scratch": "48M"}).vm.scratch_limit_mb == 48
    with pytest.raises(c.ConfigError, match="io.fractal.vm.scratch='1G' is above the operator's limit vm.scratch_max"):
        c.apply_annotations(cfg, {"io.fractal.vm.scratch": "1G"})
    for bad, why in (('scratch = "300M"', "above vm.scratch_max"), ('memory_reserve = "8M"', "out of range"),
                     ('scratch = "0"', "out of range")):
        with pytest.raises(c.ConfigError, match=why):
            c.parse_toml(f"[vm]\n{bad}\n", "f")


def test_timeouts() -> None:
    t = c.parse_toml("[timeouts]\ncreate = 300\ndefault = 5\n", "f").timeouts
    assert (t.for_op("create"), t.for_op("start"), t.for_op("pids"), t.for_op("exec")) == (300, 60, 5, 5)
    # later files and annotations keep them
    cfg = c.parse_toml('[vm]\ncpus = 1\n', "g", c.parse_toml("[timeouts]\ndelete = 7\n", "f"))
    assert c.apply_annotations(cfg, {"io.fractal.vm.cpus": "2"}).timeouts.delete == 7
    for bad, why in (("[timeouts]\nexec = 3", "unknown key timeouts.exec"), ("[timeouts]\ndefault = 0", "positive"),
                     ("timeouts = 3", "must be a table")):
        with pytest.raises(c.ConfigError, match=why):
            c.parse_toml(bad, "f")


def test_config_path_from_containerd2_bootstrap_params() -> None:
    """containerd 2.3+ wraps the runtime options in BootstrapParams.extensions (captured bytes' shape)."""
    from shim.config import config_path_from_options

    def field(num: int, payload: bytes) -> bytes:
        return bytes([(num << 3) | 2, len(payload)]) + payload

    options = field(1, b"runtimeoptions.v1.Options") + field(2, field(2, b"/tmp/nx/fractal-vm.toml"))
    params = (field(1, b"vm-cfg") + field(2, b"rc") + field(4, b"v2.4.2")
              + field(8, field(1, options)) + field(9, b"/run/containerd/s"))
    assert config_path_from_options(params) == "/tmp/nx/fractal-vm.toml"
    assert config_path_from_options(field(1, b"vm-cfg") + field(8, field(1, field(1, b"other.Type")))) is None


# ---------------------------------------------------------------------------------------------
# the pod annotation policy (allowed_annotations, VM maxima)

POD = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod1"}
HOST = c.HostLimits(memory_mb=8192, cpus=4)


def _pod_cfg(annotations: dict[str, str], text: str = "") -> c.Config:
    files = {"/g.toml": text}
    return c.resolve(annotations, runtime_config=None, global_file="/g.toml", read=_read(files),
                     host=HOST)


@pytest.mark.parametrize("name, value", [
    ("io.fractal.mode", "host"), ("io.fractal.mode", "vm"), ("io.fractal.sandbox", "other")])
def test_pods_cannot_choose_mode_or_sandbox_by_default(name: str, value: str) -> None:
    with pytest.raises(c.AnnotationDenied, match=f"annotation {name} is not allowed"):
        _pod_cfg({**POD, name: value})
    # node admins (ctr, nerdctl: no CRI annotations) may
    cfg = _pod_cfg({name: value})
    assert name == "io.fractal.sandbox" or cfg.mode == value


def test_pods_may_size_their_vm_within_the_maxima() -> None:
    cfg = _pod_cfg({**POD, "io.fractal.vm.memory": "8G", "io.fractal.vm.cpus": "4",
                    "io.fractal.share": "9p"})
    assert (cfg.vm.memory_mb, cfg.vm.cpus, cfg.vm.share) == (8192, 4, "9p")
    with pytest.raises(c.AnnotationDenied, match=r"io.fractal.vm.memory='9G' asks for more .*"
                                                  r"vm.max_memory = 8192M"):
        _pod_cfg({**POD, "io.fractal.vm.memory": "9G"})
    with pytest.raises(c.AnnotationDenied, match=r"vm.max_cpus = 4\)"):
        _pod_cfg({**POD, "io.fractal.vm.cpus": "5"})
    # the operator's maxima replace the host's
    text = '[vm]\nmax_memory = "1G"\nmax_cpus = 1\n'
    with pytest.raises(c.AnnotationDenied, match="vm.max_memory = 1024M"):
        _pod_cfg({**POD, "io.fractal.vm.memory": "2G"}, text)
    with pytest.raises(c.AnnotationDenied, match="vm.max_cpus = 1"):
        _pod_cfg({**POD, "io.fractal.vm.cpus": "2"}, text)
    # ... for pods only: a node admin's container is bounded by the value ranges alone
    assert _pod_cfg({"io.fractal.vm.cpus": "255"}, text).vm.cpus == 255
    # and the operator's own config is not held to the pod maxima
    assert _pod_cfg({}, text + "cpus = 8\n").vm.cpus == 8


def test_allowed_annotations_is_an_anchored_regex_list() -> None:
    text = 'allowed_annotations = ["mode", "vm\\\\..*"]\n'
    cfg = _pod_cfg({**POD, "io.fractal.mode": "host", "io.fractal.vm.cpus": "2"}, text)
    assert (cfg.mode, cfg.vm.cpus) == ("host", 2)
    # the list replaces the defaults: share is no longer allowed
    with pytest.raises(c.AnnotationDenied, match="io.fractal.share"):
        _pod_cfg({**POD, "io.fractal.share": "9p"}, text)
    # anchored: "mod" does not allow "mode" (kata's unanchored match would)
    with pytest.raises(c.AnnotationDenied, match="io.fractal.mode"):
        _pod_cfg({**POD, "io.fractal.mode": "host"}, 'allowed_annotations = ["mod"]\n')
    # an empty list allows nothing
    with pytest.raises(c.AnnotationDenied, match="io.fractal.vm.cpus"):
        _pod_cfg({**POD, "io.fractal.vm.cpus": "1"}, "allowed_annotations = []\n")
    # allowing the mode does not lift the maxima
    with pytest.raises(c.AnnotationDenied, match="max_cpus"):
        _pod_cfg({**POD, "io.fractal.vm.cpus": "8"}, 'allowed_annotations = [".*"]\n')


def test_every_annotation_has_a_handler() -> None:
    """A row added to ANNOTATIONS without its kind in _apply_one would fail every sandbox."""
    for rule in c.ANNOTATIONS:
        assert rule.name.startswith(c.ANN_PREFIX)
        if rule.kind != "sandbox":
            value = {"mode": "vm", "share": "9p", "memory": "512M", "cpus": "1"}.get(rule.kind, "1")
            c.apply_annotations(c.Config(), {rule.name: value})


def test_later_container_is_checked_too() -> None:
    """The shim checks every container of a sandbox, not only the first."""
    cfg = _pod_cfg(POD)
    c.check_annotations(cfg, {**POD, "io.fractal.vm.cpus": "2"})
    with pytest.raises(c.AnnotationDenied):
        c.check_annotations(cfg, {**POD, "io.fractal.mode": "host"})


def test_host_limits_probe() -> None:
    host = c.HostLimits.probe()
    assert host.cpus == os.cpu_count() and host.memory_mb and host.memory_mb > 64


# ---------------------------------------------------------------------------------------------
# hostile values: clean errors, never OverflowError / RecursionError


@pytest.mark.parametrize("value", ["1e400M", "1e308T", "infG", "nanM", "-infK", "9" * 5000,
                                   "1" + "0" * 40 + "M"])
def test_memory_overflow_is_a_config_error(value: str) -> None:
    with pytest.raises(c.ConfigError) as exc:
        c.parse_memory(value, "annotation io.fractal.vm.memory")
    assert len(str(exc.value)) < 300  # the value is cut short in the message


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "9" * 5000, 1e300])
def test_cpus_overflow_is_a_config_error(value: object) -> None:
    with pytest.raises(c.ConfigError):
        c.parse_cpus(value)


def test_nested_runtime_options_are_bounded() -> None:
    """Options nested deeper than containerd nests them give None, not RecursionError."""
    def field(num: int, payload: bytes) -> bytes:
        n, head = len(payload), bytearray([(num << 3) | 2])
        while True:
            head.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(head) + payload

    options = field(1, b"runtimeoptions.v1.Options") + field(2, field(2, b"/x.toml"))
    nested = options
    for _ in range(2):
        nested = field(8, field(1, nested))
    assert c.config_path_from_options(nested) is None
    deep = options
    for _ in range(5000):
        deep = field(8, field(1, deep))
    assert c.config_path_from_options(deep) is None
    assert c.config_path_from_options(field(8, field(1, options))) == "/x.toml"


# -- remote mode (docs/remote.md) ----------------------------------------------------------


def test_remote_mode_reads_endpoints_and_tls_dir() -> None:
    files = {"/g.toml": '[remote]\nendpoints = ["10.0.0.2:7443", "[fd00::2]:7443"]\n'
                        'tls_dir = "/etc/pki/fractal/"\nconnect_timeout = 3\n'}
    cfg = c.resolve({c.ANN_MODE: "remote"}, runtime_config=None, global_file="/g.toml", read=_read(files))
    assert cfg.mode == "remote"
    assert cfg.remote == c.RemoteSettings(("10.0.0.2:7443", "[fd00::2]:7443"), "/etc/pki/fractal", 3.0)
    assert "endpoints 10.0.0.2:7443" in cfg.describe()


def test_remote_mode_without_endpoints_is_refused() -> None:
    with pytest.raises(c.ConfigError, match=r"mode remote needs \[remote\] endpoints"):
        c.resolve({c.ANN_MODE: "remote"}, runtime_config=None, global_file=None, read=_read({}))
    files = {"/g.toml": 'mode = "remote"\n'}
    with pytest.raises(c.ConfigError, match="needs"):
        c.resolve({}, runtime_config=None, global_file="/g.toml", read=_read(files))


@pytest.mark.parametrize("table", [
    'endpoints = "10.0.0.2:7443"', "endpoints = []", 'endpoints = ["10.0.0.2"]',
    'endpoints = ["h:99999"]', 'tls_dir = "relative"', "connect_timeout = -1", 'password = "x"',
])
def test_bad_remote_settings(table: str) -> None:
    with pytest.raises(c.ConfigError, match="remote"):
        c.parse_toml(f"[remote]\n{table}\n", "/g.toml")


def test_a_pod_asks_for_remote_mode_only_if_the_operator_allows_it() -> None:
    files = {"/g.toml": '[remote]\nendpoints = ["10.0.0.2:7443"]\n'}
    with pytest.raises(c.AnnotationDenied, match="io.fractal.mode is not allowed"):
        c.resolve({**POD, c.ANN_MODE: "remote"}, runtime_config=None, global_file="/g.toml", read=_read(files))
    allowed = {"/g.toml": 'allowed_annotations = ["mode"]\n' + files["/g.toml"]}
    cfg = c.resolve({**POD, c.ANN_MODE: "remote"}, runtime_config=None, global_file="/g.toml", read=_read(allowed))
    assert cfg.mode == "remote"


def test_remote_sandbox_is_chosen_for_remote_mode() -> None:
    from shim.remotesandbox import RemoteSandbox
    from shim.sandboxkind import for_config

    cfg = c.Config(mode="remote", remote=c.RemoteSettings(("10.0.0.2:7443",)))
    sb = for_config(cfg, reaper=None, namespace="n", group="g", repo_root="/r", run_dir="/run/x",
                    runc_root="/run/x/runc", bundle_root="/b", layer_roots=["/r"])
    assert isinstance(sb, RemoteSandbox) and sb.mode == "remote"
    assert sb.describe()["endpoints"] == ["10.0.0.2:7443"]


def test_vm_attest_setting() -> None:
    assert c.parse_toml("[vm]\n", "f").vm.attest is False
    assert c.parse_toml("[vm]\nattest = true\n", "f").vm.attest is True
    with pytest.raises(c.ConfigError, match="vm.attest: expected true or false"):
        c.parse_toml('[vm]\nattest = "yes"\n', "f")


ATTEST = ('[remote]\nendpoints = ["10.0.0.2:7443"]\n[remote.attest]\nmanifest = "/b/manifest.json"\n'
          'ek_ca = ["/ca/root.pem"]\n[remote.attest.cmdline]\n"10.0.0.2:7443" = "console=ttyS0 fractal.ca=sha256:ab"\n')


def test_remote_attest_reads_manifest_cas_and_cmdlines() -> None:
    cfg = c.resolve({c.ANN_MODE: "remote"}, runtime_config=None, global_file="/g.toml",
                    read=_read({"/g.toml": ATTEST}))
    att = cfg.remote.attest
    assert att is not None and att.manifest == "/b/manifest.json" and att.ek_ca == ("/ca/root.pem",)
    assert att.cmdline("10.0.0.2:7443") == "console=ttyS0 fractal.ca=sha256:ab"
    assert att.cmdline("10.0.0.3:7443") is None


def test_remote_attest_needs_a_cmdline_per_endpoint() -> None:
    files = {"/g.toml": ATTEST.replace('endpoints = ["10.0.0.2:7443"]', 'endpoints = ["10.0.0.2:7443", "10.0.0.3:1"]')}
    with pytest.raises(c.ConfigError, match=r"no cmdline \(with manifest\) nor uki for endpoint\(s\) 10.0.0.3:1"):
        c.resolve({c.ANN_MODE: "remote"}, runtime_config=None, global_file="/g.toml", read=_read(files))


def test_remote_attest_uki_per_endpoint() -> None:
    """A machine booting its own UKI (`fractal guest uki`) needs no build manifest nor cmdline."""
    files = {"/g.toml": '[remote]\nendpoints = ["10.0.0.2:7443", "10.0.0.3:7443"]\n[remote.attest]\n'
                        'ek_ca = ["/ca/root.pem"]\n[remote.attest.uki]\n"10.0.0.2:7443" = "/m/a.efi.json"\n'
                        '"10.0.0.3:7443" = "/m/b.efi.json"\n'}
    cfg = c.resolve({c.ANN_MODE: "remote"}, runtime_config=None, global_file="/g.toml", read=_read(files))
    att = cfg.remote.attest
    assert att is not None and att.manifest is None
    assert att.uki("10.0.0.2:7443") == "/m/a.efi.json" and att.cmdline("10.0.0.2:7443") is None
    assert att.covers("10.0.0.3:7443") and not att.covers("10.0.0.4:7443")
    # both kinds side by side: one machine by the loader's command line, one by its own UKI
    mixed = ATTEST + '[remote.attest.uki]\n"10.0.0.3:7443" = "/m/b.efi.json"\n'
    mixed = mixed.replace('endpoints = ["10.0.0.2:7443"]', 'endpoints = ["10.0.0.2:7443", "10.0.0.3:7443"]')
    att = c.resolve({c.ANN_MODE: "remote"}, runtime_config=None, global_file="/g.toml",
                    read=_read({"/g.toml": mixed})).remote.attest
    assert att is not None and att.covers("10.0.0.2:7443") and att.uki("10.0.0.3:7443") == "/m/b.efi.json"


@pytest.mark.parametrize("table", [
    'manifest = "/m"\nek_ca = ["/c"]',  # no cmdline
    'manifest = "m"\nek_ca = ["/c"]\ncmdline = {"1.2.3.4:1" = "x"}',  # relative
    'manifest = "/m"\nek_ca = []\ncmdline = {"1.2.3.4:1" = "x"}',
    'manifest = "/m"\nek_ca = ["/c"]\ncmdline = {"nowhere" = "x"}',
    'manifest = "/m"\nek_ca = ["/c"]\ncmdline = {"1.2.3.4:1" = ""}',
    'manifest = "/m"\nek_ca = ["/c"]\ncmdline = {"1.2.3.4:1" = "x"}\nextra = 1',
    'ek_ca = ["/c"]\ncmdline = {"1.2.3.4:1" = "x"}',  # a cmdline without the build it is given to
    'manifest = "/m"\nek_ca = ["/c"]\nuki = {"1.2.3.4:1" = "/u.json"}',  # a manifest without cmdline
    'ek_ca = ["/c"]\nuki = {"1.2.3.4:1" = "u.json"}',  # relative
    'ek_ca = ["/c"]\nuki = {"nowhere" = "/u.json"}',
    'ek_ca = ["/c"]\nuki = {}',
    'ek_ca = ["/c"]',
    'manifest = "/m"\nek_ca = ["/c"]\ncmdline = {"1.2.3.4:1" = "x"}\nuki = {"1.2.3.4:1" = "/u.json"}',  # both
])
def test_bad_remote_attest_settings(table: str) -> None:
    with pytest.raises(c.ConfigError, match="remote"):
        c.parse_toml(f"[remote.attest]\n{table}\n", "/g.toml")
