#!/usr/bin/env bash
# Bring this machine to the state fractal's build and tests need. Idempotent and
# quick when nothing changed (every step checks before it acts), because CI and
# every fresh clone run it: machines are handed over with arbitrary leftovers, so
# the project's own files must install everything it needs.
#
#   hack/setup.sh [--with-debian] [--skip-images] [--run] [--with-guest-kernel]
#
# --with-guest-kernel: the opt-in guest kernel built for the guest (ccpu/guest/kbuild.py, docs/vm.md
# "A kernel built for the guest"): installs its build tools (flex bison libelf-dev bc) and builds
# it (minutes, both cores).  Debian's kernel stays the default; nothing else needs this.
#
# --run: only what the main job (`make run`, hack/demo.py) needs: of the Go peers only crictl
# (the demo's Kubernetes step); containerd 2.x, nerdctl and critest are built by `make test`.
#
# Env: FRACTAL_CACHE (default /var/cache/fractal; outside the clone so clones on
# one machine share built images), PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FRACTAL_CACHE:-/var/cache/fractal}"
PY="${PYTHON:-python3}"
WITH_DEBIAN=0
SKIP_IMAGES=0
FOR_RUN=0
WITH_GUEST_KERNEL=0
for arg in "$@"; do
  case "$arg" in
    --with-debian) WITH_DEBIAN=1 ;;
    --skip-images) SKIP_IMAGES=1 ;;
    --run) FOR_RUN=1 ;;
    --with-guest-kernel) WITH_GUEST_KERNEL=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "setup: unknown argument $arg" >&2; exit 2 ;;
  esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

APT_PACKAGES=(
  containerd runc umoci skopeo docker-registry busybox-static
  golang-github-containerd-containerd-dev golang-github-gogo-protobuf-dev
  golang-github-gogo-googleapis-dev golang-github-containerd-cgroups-dev
  debootstrap qemu-system-x86 iproute2 e2fsprogs
  # CNI plugins (/usr/lib/cni) for CRI pods with their own network namespace (docs/cri.md)
  containernetworking-plugins
  # `fractal image import docker://...` is tested against podman's Docker-API service (docs/images.md)
  podman
  # attested VMs (vm.attest, docs/hardware.md): UEFI firmware, a TPM per VM and its local CA,
  # tpm2-tools (host: makecredential/checkquote; guest: its image carries them), systemd's EFI stub
  # for the unified kernel image (objcopy from binutils assembles it); mtools writes a machine's UKI onto a USB-stick image
  ovmf swtpm swtpm-tools tpm2-tools systemd-boot-efi binutils mtools
  # an attested machine's agent makes its boot TLS key with the openssl tool (the guest image carries it)
  openssl
  # tests only: an independent Authenticode implementation to check ours (PCR 4) against
  osslsigncode
  # VM guest (docs/vm.md): Debian's own python3.11 goes into the initramfs; virtiofsd builds need the -dev libs
  python3.11 libcap-ng-dev libseccomp-dev pkg-config
  # the small guest's read-only system image (mkfs.erofs; docs/vm.md "The small guest")
  erofs-utils
  # benchmark only: hack/bench/sysimage.py builds the squashfs candidates of the system image
  squashfs-tools
  # the fidelity test image's probe is compiled statically at build time (hack/fsprobe.c, docs/vm.md)
  gcc libc6-dev
)

step_start=$EPOCHREALTIME
step() { step_start=$EPOCHREALTIME; echo "setup: $*"; }
step_done() { awk -v a="$step_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "setup:   done in %.1fs\n", b - a }'; }

# Background steps.  The slow ones -- virtiofsd (cargo), the Go peers (crictl for `make run`),
# the VM guest (a kernel download) and, for the tests, the clean host trees (debootstrap) -- need
# nothing from each other nor from the steps after apt (the Go peers not even apt), so they run
# alongside them: a fresh machine's setup takes about as long as its longest build instead of
# the sum (docs/development.md, "A fresh machine's make run").  Each one's output goes to
# $LOGS/setup-NAME.log while it runs, so the console stays one line per event; `join` waits for
# it and prints its log with a [NAME] prefix, its own time and CPU time, and when it was joined.
# FRACTAL_SETUP_SERIAL=1 runs the same functions in the foreground, in order.
declare -A BG_PID BG_T0 BG_RC
LOGS="$CACHE/logs"
if [ "$(id -u)" -ne 0 ]; then LOGS="${TMPDIR:-/tmp}/fractal-setup-logs"; fi  # the cache is root's
bg() {  # bg NAME FUNCTION: start FUNCTION in the background
  local name=$1 fn=$2
  if [ "${FRACTAL_SETUP_SERIAL:-0}" = 1 ]; then  # in the foreground; `join` reports the status
    step "$name"; BG_RC[$name]=0; "$fn" || BG_RC[$name]=$?; step_done; return 0
  fi
  mkdir -p "$LOGS"
  BG_T0[$name]=$EPOCHREALTIME
  # the last line is the step's own time and CPU (bash's `time`: user and system of all its processes)
  ( set +e; TIMEFORMAT="took %1Rs; cpu: user %1Us, system %1Ss"; time "$fn" ) >"$LOGS/setup-$name.log" 2>&1 &
  BG_PID[$name]=$!
  echo "setup: $name: started in the background (log $LOGS/setup-$name.log)"
}
join() {  # join NAME: wait for a background step; its exit status is returned
  local name=$1 rc=0
  [ -n "${BG_PID[$name]:-}" ] || return "${BG_RC[$name]:-0}"
  wait "${BG_PID[$name]}" || rc=$?
  echo "setup: $name (background)"
  sed "s/^/setup:   [$name] /" "$LOGS/setup-$name.log"
  awk -v a="${BG_T0[$name]}" -v b="$EPOCHREALTIME" -v rc="$rc" \
    'BEGIN { printf "setup:   %s (joined %.1fs after its start)\n", rc == 0 ? "done" : "FAILED (exit " rc ")", b - a }'
  unset "BG_PID[$name]"
  return "$rc"
}
# an interrupted setup does not leave builds running behind it
kill_tree() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$c"; done; kill "$1" 2>/dev/null || true; }
trap 'for p in "${BG_PID[@]}"; do kill_tree "$p"; done' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The build steps, run by `bg` (definitions here, calls below in order).
build_virtiofsd() {
  # virtiofsd is not in Debian bookworm; built from crates.io once into $CACHE/virtiofsd.
  # Without cargo the VM falls back to 9p shares.
  if [ -x "$CACHE/virtiofsd/bin/virtiofsd" ]; then
    echo "present ($("$CACHE/virtiofsd/bin/virtiofsd" --version 2>/dev/null | head -1))"
  elif CARGO="$(command -v cargo || echo "$HOME/.cargo/bin/cargo")" && [ -x "$CARGO" ]; then
    $SUDO "$CARGO" install virtiofsd --version '^1.14' --locked --root "$CACHE/virtiofsd" --quiet \
      || echo "WARNING: virtiofsd did not build; the VM uses 9p shares"
  else
    echo "no cargo: skipped (the VM uses 9p shares)"
  fi
}
PEERS=()
if [ "$FOR_RUN" -eq 1 ]; then PEERS=(crictl); fi  # the demo needs crictl only
build_peers() {
  # containerd 2.x/1.7, nerdctl, crictl/critest (docs/compat.md): built from the Go module proxy,
  # pinned, into $CACHE/peers/<name>-<version>/bin by hack/peers.sh (skips what is built: ~0.1 s
  # warm).  A peer that does not build is reported and its tests skip (fail under CI).
  FRACTAL_CACHE="$CACHE" $SUDO bash "$ROOT/hack/peers.sh" "${PEERS[@]}"
}
start_peers() {
  if [ "${FRACTAL_SKIP_PEERS:-0}" = 1 ]; then
    echo "setup: peers: skipped (FRACTAL_SKIP_PEERS=1)"
  else
    echo "setup: peers in $CACHE/peers: ${PEERS[*]:-all}${PEERS:+ (--run: the others are test-only)}"
    bg peers build_peers
  fi
}

# --- 0. the Go peers start first when a Go toolchain is there (they need nothing from apt) ---
$SUDO mkdir -p "$CACHE"
peers_started=0
if command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ]; then start_peers; peers_started=1; fi

# --- 1. apt packages -----------------------------------------------------------
step "checking apt packages"
missing=()
installed="$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null || true)"
for p in "${APT_PACKAGES[@]}"; do
  grep -qx "$p installed" <<<"$installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup:   installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup:   all ${#APT_PACKAGES[@]} present"
fi
step_done

# Go builds the conformance tests (containerd's own snapshotter testsuite as a library).
# Machines of this kind ship Go in /usr/local/go; elsewhere Debian's golang-go will do.
if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
  echo "setup:   installing golang-go (no Go toolchain found)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends golang-go
fi
[ "$peers_started" -eq 1 ] || start_peers
# The VM guest (docs/vm.md: the distribution's kernel + initramfs + system image), cached by its
# inputs under $CACHE/guest (a warm run only re-hashes them, ~2 s).  It needs apt's busybox-static,
# runc, erofs-utils and python3, and of this project only the stdlib-only ccpu.guest (run from the
# clone: no pip install needed), so it builds while pip installs.
build_guest() { cd "$ROOT" && FRACTAL_CACHE="$CACHE" $SUDO "$PY" -m ccpu.cli guest build; }
bg guest build_guest
# Opt-in: the kernel built for the guest (its tools only on request; the default guest needs none)
GUEST_KERNEL_PACKAGES=(flex bison libelf-dev bc)
build_guest_kernel() {
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${GUEST_KERNEL_PACKAGES[@]}"
  cd "$ROOT" && FRACTAL_CACHE="$CACHE" $SUDO "$PY" -m ccpu.cli guest kernel
}
if [ "$WITH_GUEST_KERNEL" -eq 1 ]; then bg guest-kernel build_guest_kernel; fi
# virtiofsd needs apt's libcap-ng-dev, libseccomp-dev and pkg-config
bg virtiofsd build_virtiofsd

# --- 2. Python package (editable) + extras ---------------------------------------
# A distribution's externally managed python3 (PEP 668) gets a venv in the clone instead
# (hack/devpython.sh); every other interpreter is used as given.
# shellcheck source=hack/devpython.sh
. "$ROOT/hack/devpython.sh"
if externally_managed "$PY" && ! "$PY" -c 'import ensurepip' 2>/dev/null; then
  echo "setup:   installing python3-venv ($PY is externally managed and has no venv module)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
fi
PY="$(dev_python "$PY" "$ROOT")"
# The marker is keyed on pyproject.toml, the extras, the interpreter and this clone's path; the
# editable install must also point at *this* clone (another clone may have
# installed itself last).
step "checking Python dependencies ($PY)"
EXTRAS="build,images,test,bench"
key="$( { sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1; "$PY" -c 'import sys; print(sys.prefix)'; echo "$ROOT $EXTRAS"; } | sha256sum | cut -d' ' -f1)"
marker="$CACHE/pip/$key"
if [ -f "$marker" ] && "$PY" -P - "$ROOT" <<'EOF'
import importlib.metadata as m, json, sys
try:
    d = m.distribution("fractal")
    for req in ("grpcio", "grpcio-tools", "protobuf", "pytest", "hypothesis"):
        m.version(req)
except m.PackageNotFoundError:
    sys.exit(1)
url = json.loads(d.read_text("direct_url.json") or "{}").get("url", "")
sys.exit(0 if url.rstrip("/") == "file://" + sys.argv[1] else 1)
EOF
then
  echo "setup:   up to date"
else
  echo "setup:   pip install -e '.[$EXTRAS]'"
  "$PY" -m pip install -q --root-user-action=ignore --disable-pip-version-check -e "$ROOT[$EXTRAS]"
  $SUDO mkdir -p "$CACHE/pip"
  $SUDO touch "$marker"
fi
step_done
# clean hosts for the install walk-through and the guest build on other distributions
# (tests/integration/test_distro_install.py): debootstrap minbase trees of Debian 12/13 and Ubuntu
# 24.04 with their own python3 (~1-4 min each, cold, mostly the mirror's; cached by suite + package
# list in $CACHE/hostroots).  Test-only: not for --run.  After the Python step: its
# wheelhouse needs that python's pip.
build_hostroots() { $SUDO "$PY" "$ROOT/hack/hostroots.py" --cache "$CACHE" build; }
if [ "$FOR_RUN" -eq 0 ]; then bg hostroots build_hostroots; fi

# --- 3. protobuf stubs -------------------------------------------------------------
step "containerd API stubs"
"$PY" "$ROOT/hack/gen_protos.py"
step_done

# --- 4. test images ----------------------------------------------------------------
if [ "$SKIP_IMAGES" -eq 0 ]; then
  step "test images in $CACHE/images"
  extra=()
  if [ "$WITH_DEBIAN" -eq 1 ] || [ "${FRACTAL_WITH_DEBIAN:-0}" = 1 ]; then extra+=(--with-debian); fi
  $SUDO "$PY" "$ROOT/hack/testimages.py" --cache "$CACHE" build "${extra[@]}"
  step_done
fi
# --- 5. join the background builds: the guest, virtiofsd, the Go peers, the host trees ---------
join guest || { echo "setup: the VM guest did not build" >&2; exit 1; }
if [ "$WITH_GUEST_KERNEL" -eq 1 ]; then
  join guest-kernel || echo "setup:   WARNING: the guest kernel did not build (fractal guest kernel says why)"
fi
join virtiofsd || echo "setup:   WARNING: virtiofsd did not build; the VM uses 9p shares"
join peers || echo "setup:   WARNING: the peers step failed"
if [ "$FOR_RUN" -eq 0 ]; then
  join hostroots || echo "setup:   WARNING: a host tree did not build; test_distro_install reports which"
fi
echo "setup: ok"
