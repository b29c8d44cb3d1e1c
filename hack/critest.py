#!/usr/bin/env python3
"""Run cri-tools' critest (CRI conformance, built by hack/peers.sh) against fractal.

    python3 hack/critest.py [--containerd 1|2] [--parallel N] [--timeout SECONDS]
                            [--focus REGEX]... [--skip REGEX]... [--report FILE.md] [--json FILE]

What it does:

1. starts a local registry (hack/registry.py) and pushes the images critest pulls, under the
   names critest asks for with ``--registry-prefix 127.0.0.1:PORT``.  critest v1.36.0 rewrites a
   fully qualified image ``DOMAIN/PATH:TAG`` to ``PREFIX/PATH:TAG`` (pkg/framework/util.go
   ``PrepareImageName``), so ``registry.k8s.io/e2e-test-images/busybox:1.29-2`` becomes
   ``127.0.0.1:PORT/e2e-test-images/busybox:1.29-2``.  These machines reach no public registry,
   so **every image is a stand-in** built from our busybox test image with umoci (see
   :data:`STAND_INS`); the one image that cannot be faked is the digest-pinned
   ``test-image-digest@sha256:9700f9a2...`` (its spec fails);
2. starts a :class:`hack.containerd_env.FractalEnv` (containerd 1.6 or 2.x) with the CRI plugin,
   runtime handler ``fractal`` (``io.containerd.fractal.v1``; the env's FRACTAL_CONFIG says host
   mode) and a CNI bridge network (``CriConfig(network="bridge")``);
3. runs ``critest --runtime-endpoint --image-endpoint --runtime-handler fractal --registry-prefix
   --ginkgo.json-report ...`` (``--parallel N`` needs the ``ginkgo`` CLI, built here once from the
   module cache into ``$FRACTAL_CACHE/peers/ginkgo-<version>``; without it the run is serial);
4. prints a report (passed/failed/skipped, each failure with its first line and location) and
   writes it as Markdown (``--report``) and raw JSON (``--json``).

Exit status: 0 when no spec failed, 1 when some did, 2 when the run itself could not happen.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hack.containerd_env import (CACHE, CNI_PLUGIN_DIR, CriConfig, FractalEnv, HarnessError,  # noqa: E402
                                 peer_bin_dir, peer_missing, run_cmd)

GINKGO_VERSION = "v2.28.1"  # what cri-tools v1.36.0's go.mod requires

R = "registry.k8s.io/"
G = "gcr.io/k8s-staging-cri-tools/"
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/false\n"
_GROUP = "root:x:0:\nwww-data:x:33:\n"
_NNP_C = r"""#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\n", (int)geteuid()); return 0; }
"""

_PGREP = """#!/bin/sh
# stand-in for procps pgrep NAME: pids whose comm is NAME
rc=1
for d in /proc/[0-9]*; do
  read -r c < "$d/comm" 2>/dev/null || continue
  [ "$c" = "$1" ] && { echo "${d#/proc/}"; rc=0; }
done
exit $rc
"""
#: nginx stand-in: comm "nginx", cmdline "nginx: master process ..." (ContainerPID spec greps
#: /proc/1/cmdline), /var/run/nginx.pid, and busybox httpd serving port 80 as its child
_NGINX_C = r"""#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/wait.h>
int main(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "master") != 0) {
    char *nargv[] = {"nginx: master process nginx -g daemon off;", "master", NULL};
    execv("/usr/sbin/nginx", nargv);
    return 127;
  }
  mkdir("/var/run", 0755);
  FILE *f = fopen("/var/run/nginx.pid", "w");
  if (f) { fprintf(f, "%d\n", (int)getpid()); fclose(f); }
  if (fork() == 0) {
    execl("/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/usr/share/nginx/html", (char *)NULL);
    _exit(127);
  }
  for (;;) { if (wait(NULL) < 0) pause(); }
}
"""

#: the sandbox ("pause") process: comm "pause" like the real one (with a shared pod PID
#: namespace, specs run `pgrep sleep` and must not find the sandbox), reaps zombies
_PAUSE_C = r"""#include <signal.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
static void quit(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, quit); signal(SIGTERM, quit); signal(SIGCHLD, reap);
  for (;;) pause();
}
"""

#: every image critest v1.36.0 uses (pkg/validate/consts.go, multi_container_linux.go,
#: security_context_linux.go, pkg/framework/util.go), as the full reference critest names, and
#: how our stand-in is made from the busybox test image: ("cmd", [...]) config Cmd,
#: ("user", U) config User, ("file", path, text[, mode]) a file added, ("cbin", path, C source)
#: a static setuid-root binary compiled with gcc.
STAND_INS: dict[str, list[tuple]] = {
    # framework.DefaultLinuxContainerImage: most specs' containers
    R + "e2e-test-images/busybox:1.29-2": [
        # the real image's applets are hard links: masking /bin/ls (MaskedPaths spec) must not
        # mask the busybox binary behind a symlink, so /bin/ls is a copy here
        ("hostfile", "bin/ls", "/bin/busybox", 0o755),
        # applets Debian's busybox-static lacks: pgrep (execSync timeout spec), ipcs -m (HostIpc)
        ("file", "bin/pgrep", _PGREP, 0o755), ("file", "bin/ipcs", "#!/bin/sh\ncat /proc/sysvipc/shm\n", 0o755),
        ("cmd", ["sh"])],
    # webServerLinuxImage / nginxContainerImage: specs look for /var/run/nginx.pid, `pidof nginx`
    # and HTTP on port 80; /usr/sbin/nginx is a shell script (comm "nginx") running busybox httpd
    R + "e2e-test-images/nginx:1.14-2": [
        ("file", "usr/share/nginx/html/index.html", "<html><body>fractal nginx stand-in</body></html>\n"),
        ("file", "var/run/.keep", ""), ("cbin", "usr/sbin/nginx", _NGINX_C, 0o755), ("cmd", ["/usr/sbin/nginx"])],
    # multi-container spec: serves port 80 and logs "httpd"
    R + "e2e-test-images/httpd:2.4.39-4": [
        ("file", "htdocs/index.html", "<html><body>It works! (fractal httpd stand-in)</body></html>\n"),
        ("cmd", ["sh", "-c", "echo httpd stand-in listening on 80; exec httpd -f -vv -p 80 -h /htdocs"])],
    # NoNewPrivs specs: a setuid-root program printing its effective uid, run as uid 1000
    R + "e2e-test-images/nonewprivs:1.3": [("cbin", "usr/local/bin/nnp", _NNP_C, 0o4755), ("cmd", ["/usr/local/bin/nnp"])],
    # hostNetWebServerLinuxImage: nginx on port 12003 (images/hostnet-nginx/default.conf)
    G + "hostnet-nginx-amd64:latest": [
        ("file", "usr/share/nginx/html/index.html", "<html><body>fractal hostnet stand-in</body></html>\n"),
        ("cmd", ["httpd", "-f", "-p", "12003", "-h", "/usr/share/nginx/html"])],
    G + "test-image-latest:latest": [("file", "testfile", "latest\n")],
    G + "test-image-tag:test": [("file", "testfile", "tag\n")],
    G + "test-image-tag:all": [("file", "testfile", "all\n")],
    G + "test-image-1:latest": [("file", "testfile", "1\n")],
    G + "test-image-2:latest": [("file", "testfile", "2\n")],
    G + "test-image-3:latest": [("file", "testfile", "3\n")],
    # different tags, same image: one build pushed three times
    G + "test-image-tags:1": [("file", "testfile", "tags\n")],
    G + "test-image-tags:2": [("file", "testfile", "tags\n")],
    G + "test-image-tags:3": [("file", "testfile", "tags\n")],
    G + "test-image-user-uid:latest": [("user", "1002")],
    G + "test-image-user-username:latest": [("file", "etc/passwd", _PASSWD), ("file", "etc/group", _GROUP),
                                            ("user", "www-data")],
    G + "test-image-user-uid-group:latest": [("user", "1003:1003")],
    G + "test-image-user-username-group:latest": [("file", "etc/passwd", _PASSWD), ("file", "etc/group", _GROUP),
                                                  ("user", "www-data:www-data")],
    # images/image-predefined-group: user 1000 in a group 50000 defined in /etc/group
    G + "test-image-predefined-group:latest": [
        ("file", "etc/passwd", "root:x:0:0:root:/root:/bin/sh\ndefault-user:x:1000:1000::/home/default-user:/bin/sh\n"),
        ("file", "etc/group", "root:x:0:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"),
        ("user", "1000")],
    # testSameImageDifferentRegistries (+ k8s.gcr.io/pause:3.9, same path) and our sandbox image
    R + "pause:3.9": [("cbin", "pause", _PAUSE_C, 0o755), ("cmd", ["/pause"])],
    # our sandbox image: NOT the same image as pause:3.9, or the "remove image from one
    # registry" spec sees a third tag on it
    "127.0.0.1/fractal/pause:critest": [("file", "fractal-sandbox", "critest\n"),
                                       ("cbin", "pause", _PAUSE_C, 0o755), ("cmd", ["/pause"])],
}
#: can only be the real image: critest pins it by digest
NOT_FAKEABLE = [G + "test-image-digest@sha256:9700f9a2f5bf2c45f2f605a0bd3bce7cf37420ec9d3ed50ac2758413308766bf"]
#: registries critest names; pulls from them go to the local registry (mirror mode)
MIRRORED = ("registry.k8s.io", "gcr.io", "k8s.gcr.io")

#: default --ginkgo.skip: nothing (the report shows everything); use --skip to leave specs out
DEFAULT_SKIP: list[str] = []


def log(msg: str) -> None:
    print(f"critest.py: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- images


def build_stand_in(base: Path, steps: list[tuple], out: Path) -> Path:
    """A copy of the busybox OCI layout ``base`` changed by ``steps`` (umoci), at ``out``."""
    shutil.copytree(base, out)
    image = f"{out}:latest"
    files = [s for s in steps if s[0] in ("file", "cbin", "hostfile")]
    if files:
        # a layer tar written here (not `umoci insert`, which left /bin/ls a symlink when a
        # regular file was inserted over it): parent dirs, then the files
        import io
        import tarfile

        with tempfile.TemporaryDirectory() as tmp:
            tar_path = Path(tmp) / "layer.tar"
            with tarfile.open(tar_path, "w") as tar:
                dirs: set[str] = set()
                for kind, rel, text, *mode in files:
                    parts = rel.split("/")[:-1]
                    for i in range(1, len(parts) + 1):
                        d = "/".join(parts[:i])
                        if d not in dirs:
                            dirs.add(d)
                            ti = tarfile.TarInfo(d)
                            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                            tar.addfile(ti)
                    if kind == "hostfile":
                        data = Path(text).read_bytes()
                    elif kind == "cbin":
                        (Path(tmp) / "prog.c").write_text(text)
                        run_cmd(["gcc", "-static", "-O2", "-o", str(Path(tmp) / "prog"), str(Path(tmp) / "prog.c")])
                        data = (Path(tmp) / "prog").read_bytes()
                    else:
                        data = text.encode()
                    ti = tarfile.TarInfo(rel)
                    ti.size = len(data)
                    ti.mode = mode[0] if mode else (0o755 if kind != "file" else 0o644)
                    tar.addfile(ti, io.BytesIO(data))
            run_cmd(["umoci", "raw", "add-layer", "--image", image, "--history.created_by",
                     "hack/critest.py stand-in", str(tar_path)])
    args: list[str] = []
    for s in steps:
        if s[0] == "cmd":
            args += [a for c in s[1] for a in ("--config.cmd", c)]
        elif s[0] == "user":
            args += ["--config.user", s[1]]
    if args:
        run_cmd(["umoci", "config", "--image", image, *args])
    return out


def push_images(server, work: Path) -> dict[str, str]:  # noqa: ANN001
    """Build and push every stand-in under its path and tag (what a mirror of the image's
    registry serves) and, for ``--registry-prefix``, also as ``PATH:latest`` (critest's
    PrepareImageName drops the tag).  Returns {critest's reference -> pushed ref}."""
    from hack import testimages

    base = testimages.build("busybox")
    built: dict[str, Path] = {}
    pushed: dict[str, str] = {}
    for i, (name, steps) in enumerate(STAND_INS.items()):
        key = repr(steps)
        if key not in built:
            built[key] = build_stand_in(base, steps, work / f"img{i}")
        path, _, tag = name.split("/", 1)[1].rpartition(":")
        pushed[name] = server.push(built[key], path, tag)
        if tag != "latest" and not any(n.split("/", 1)[1].startswith(path + ":latest") for n in STAND_INS):
            server.push(built[key], path, "latest")
    return pushed


# ---------------------------------------------------------------------------------- ginkgo


def ensure_ginkgo() -> Path | None:
    """The ginkgo CLI critest --parallel execs, built once with Go from cri-tools' module
    (its go.mod pins ginkgo); None (with the reason logged) if that is not possible."""
    dest = CACHE / "peers" / f"ginkgo-{GINKGO_VERSION}" / "bin" / "ginkgo"
    if dest.is_file():
        return dest.parent
    go = shutil.which("go") or "/usr/local/go/bin/go"
    modcache = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True).stdout.strip()
    src = Path(modcache) / "sigs.k8s.io" / "cri-tools@v1.36.0"
    if not (src / "go.mod").is_file():
        log(f"no ginkgo CLI: {src} not in the module cache (run hack/peers.sh cri-tools); running serially")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        mod = Path(tmp) / "m"
        shutil.copytree(src, mod)
        for p in mod.rglob("*"):
            p.chmod(p.stat().st_mode | 0o200)
        t0 = time.monotonic()
        r = subprocess.run([go, "build", "-mod=mod", "-o", str(dest), "github.com/onsi/ginkgo/v2/ginkgo"],
                           cwd=mod, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        log(f"building the ginkgo CLI failed; running serially:\n{r.stderr[-2000:]}")
        return None
    log(f"built ginkgo {GINKGO_VERSION} in {time.monotonic() - t0:.0f}s -> {dest}")
    return dest.parent


# ---------------------------------------------------------------------------------- report


def spec_name(spec: dict) -> str:
    return " ".join([*(spec.get("ContainerHierarchyTexts") or []), spec.get("LeafNodeText", "")]).strip()


def summarize(report_json: Path) -> dict:
    """{'passed': [...], 'failed': [(name, reason, location)], 'skipped': [...], 'other': [...]}"""
    data = json.loads(report_json.read_text())
    out: dict = {"passed": [], "failed": [], "skipped": [], "other": [], "seconds": 0.0}
    for suite in data:
        out["seconds"] += (suite.get("RunTime") or 0) / 1e9
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                if spec.get("State") in ("failed", "panicked", "timedout", "interrupted", "aborted"):
                    f = spec.get("Failure") or {}
                    out["failed"].append((f"[{spec.get('LeafNodeType')}] {spec_name(spec)}",
                                          (f.get("Message") or "").strip(),
                                          (f.get("Location") or {}).get("FileName", "")))
                continue
            state = spec.get("State")
            name = spec_name(spec)
            if state == "passed":
                out["passed"].append(name)
            elif state in ("skipped", "pending"):
                why = ((spec.get("Failure") or {}).get("Message") or "").strip().splitlines()
                out["skipped"].append(f"{name} — {why[0][:200]}" if why else name)
            elif state in ("failed", "panicked", "timedout", "interrupted", "aborted"):
                f = spec.get("Failure") or {}
                loc = f.get("Location") or {}
                where = f"{Path(loc.get('FileName', '')).name}:{loc.get('LineNumber', '')}"
                out["failed"].append((name, (f.get("Message") or state).strip(), where))
            else:
                out["other"].append((name, state))
    return out


def render_report(s: dict, meta: dict) -> str:
    lines = [f"# critest {meta['critest_version']} against fractal (containerd {meta['containerd']}, {meta.get('mode', 'host')} mode)", "",
             f"{len(s['passed'])} passed, {len(s['failed'])} failed, {len(s['skipped'])} skipped "
             f"in {meta['seconds']:.0f} s (parallel {meta['parallel']}; images via {meta['images']}; "
             f"focus {meta['focus'] or '-'}; "
             f"skip {meta['skip'] or '-'})", ""]
    if s["failed"]:
        lines += ["## Failed", ""]
        for name, reason, where in sorted(s["failed"]):
            first = " ".join(reason.splitlines()[:3])[:400]
            lines.append(f"- **{name}** ({where}): {first}")
        lines.append("")
    lines += ["## Passed", ""] + [f"- {n}" for n in sorted(s["passed"])] + [""]
    if s["skipped"] and not meta["focus"]:  # with a focus: the specs left out, not interesting
        lines += ["## Skipped", ""] + [f"- {n}" for n in sorted(s["skipped"])] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    for peer in ["cri-tools"] + (["containerd2"] if args.containerd == "2" else []):
        why = peer_missing(peer)
        if why:
            log(why)
            return 2
    critest = peer_bin_dir("cri-tools") / "critest"
    vout = subprocess.run([str(critest), "--version"], capture_output=True, text=True, cwd="/").stdout
    version = next((ln.split()[-1] for ln in vout.splitlines() if "version" in ln), "?")
    from hack.registry import LocalRegistry

    work = Path(tempfile.mkdtemp(prefix="critest-"))
    ginkgo_dir = ensure_ginkgo() if args.parallel > 1 else None
    parallel = args.parallel if ginkgo_dir else 1
    try:
        with LocalRegistry(work / "registry") as server:
            t0 = time.monotonic()
            pushed = push_images(server, work)
            log(f"pushed {len(pushed)} stand-in images to {server.address} in {time.monotonic() - t0:.1f}s "
                f"(not fakeable: {', '.join(NOT_FAKEABLE)})")
            network = "bridge" if (CNI_PLUGIN_DIR / "bridge").is_file() else None
            if network is None:
                log(f"no CNI plugins in {CNI_PLUGIN_DIR}: pods get an unconfigured netns")
            mirrors = {} if args.registry_prefix else {host: server.address for host in MIRRORED}
            cri = CriConfig(sandbox_image=pushed["127.0.0.1/fractal/pause:critest"], insecure_registries=(server.address,),
                            network=network, mirrors=mirrors, portmap=args.portmap)
            with FractalEnv(snapshotter=True, containerd=args.containerd, cri=cri) as env:
                # the sandbox mode for every pod (shims read FRACTAL_CONFIG when they start)
                env.fractal_config.write_text(f'mode = "{args.mode}"  # hack/critest.py --mode\n')
                log(f"env {env.id} (containerd {args.containerd}, {args.mode} mode) up; logs in {env.log_dir}")
                sock = f"unix://{env.address}"
                report_json = work / "report.json"
                cmd = [str(critest), f"--runtime-endpoint={sock}", f"--image-endpoint={sock}",
                       "--runtime-handler=fractal",
                       *([f"--registry-prefix={server.address}"] if args.registry_prefix else []),
                       # --parallel=1 given explicitly makes ginkgo refuse ("Use of go test -parallel")
                       *([f"--parallel={parallel}"] if parallel > 1 else []),
                       f"--ginkgo.json-report={report_json}",
                       f"--ginkgo.timeout={int(args.timeout)}s", "--ginkgo.no-color"]
                cmd += [f"--ginkgo.focus={f}" for f in args.focus]
                cmd += [f"--ginkgo.skip={s}" for s in (args.skip or DEFAULT_SKIP)]
                if args.verbose:
                    cmd.append("--ginkgo.v")
                cenv = {k: v for k, v in os.environ.items()
                        if k not in ("CONTAINER_RUNTIME_ENDPOINT", "IMAGE_SERVICE_ENDPOINT", "CRI_CONFIG_FILE")}
                if ginkgo_dir:
                    cenv["PATH"] = f"{ginkgo_dir}{os.pathsep}{cenv.get('PATH', '')}"
                log("running: " + " ".join(cmd))
                t0 = time.monotonic()
                out_path = work / "critest.out"
                with open(out_path, "w") as out:
                    try:
                        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=cenv,
                                            timeout=args.timeout + 120).returncode
                    except subprocess.TimeoutExpired:
                        rc = None
                seconds = time.monotonic() - t0
                if args.keep_logs:
                    dest = Path(args.keep_logs)
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copy(out_path, dest / "critest.out")
                    for f in env.log_dir.iterdir():
                        shutil.copy(f, dest / f.name)
        if not report_json.is_file():
            log(f"critest wrote no report (exit {rc}); its output:\n{out_path.read_text()[-4000:]}")
            return 2
        s = summarize(report_json)
        meta = {"critest_version": version, "containerd": args.containerd, "mode": args.mode,
                "seconds": seconds, "parallel": parallel,
                "images": "--registry-prefix" if args.registry_prefix else "mirrors of " + ", ".join(MIRRORED), "focus": " ".join(args.focus),
                "skip": " ".join(args.skip or DEFAULT_SKIP)}
        text = render_report(s, meta)
        print(text)
        if args.report:
            Path(args.report).write_text(text)
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "summary": s}, indent=1))
        if rc is None:
            log(f"critest timed out after {args.timeout + 120:.0f}s")
        return 1 if s["failed"] or rc else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--containerd", choices=("1", "2"), default="1", help="1.6 (distribution) or 2.x (peers.sh)")
    ap.add_argument("--mode", choices=("host", "vm"), default="host",
                    help="fractal sandbox mode of every pod: host (runc on this machine) or vm (one QEMU guest per pod)")
    ap.add_argument("--parallel", type=int, default=2, help="ginkgo nodes (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=1800, help="ginkgo suite timeout, seconds")
    ap.add_argument("--focus", action="append", default=[], help="--ginkgo.focus regex (repeatable)")
    ap.add_argument("--skip", action="append", default=[], help="--ginkgo.skip regex (repeatable)")
    ap.add_argument("--registry-prefix", action="store_true",
                    help="pass --registry-prefix LOCAL_REGISTRY instead of mirroring critest's registries "
                         "(critest 1.36.0 then drops image tags and creates containers from the "
                         "unprefixed names, which fails: see docs/cri.md)")
    ap.add_argument("--portmap", action="store_true",
                    help="add CNI portmap to the bridge network (hostPort specs; it adds iptables "
                         "chains CNI-HOSTPORT-* to the host's nat table, which stay afterwards)")
    ap.add_argument("--report", help="write the Markdown report here")
    ap.add_argument("--json", help="write the summary as JSON here")
    ap.add_argument("--keep-logs", help="copy critest's output and the env's daemon logs into this dir")
    ap.add_argument("-v", "--verbose", action="store_true", help="--ginkgo.v")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except HarnessError as exc:
        log(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
