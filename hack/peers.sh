#!/usr/bin/env bash
# Build the peers fractal is tested against -- containerd 2.x and 1.7, nerdctl, crictl/critest --
# from the Go module proxy, pinned, into $FRACTAL_CACHE/peers/<name>-<version>/bin.
# Idempotent: a peer whose binaries are all present (and whose .ok stamp matches the
# pinned version + build flags) is skipped.  Prints timings.  A peer that fails to build
# is reported and the others are still built; exit status is non-zero only with --strict.
#
#   hack/peers.sh [--strict] [--list] [NAME...]
#       NAME: containerd2 containerd17 nerdctl cri-tools crictl
#
# `crictl` alone is what the main job (`make run`: the demo's Kubernetes step) needs; the
# others (containerd 2.x and 1.7, nerdctl, critest = cri-tools) only the tests do, so `make run` on a
# fresh machine builds crictl only (~1 min instead of ~5, docs/compat.md).
#
# Env: FRACTAL_CACHE (default /var/cache/fractal), GO (default: go on PATH or /usr/local/go/bin/go).
# See docs/compat.md for what each peer is used for and measured build times.
set -uo pipefail

CACHE="${FRACTAL_CACHE:-/var/cache/fractal}"
PEERS="$CACHE/peers"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"

# Pinned versions.  Only some versions are reachable through the module proxy this
# project's machines use (others answer 403): these were checked.  containerd v2.4.x
# needs go >= 1.26.6.
CONTAINERD2_VERSION="v2.4.2"
# containerd 1.7 (the module github.com/containerd/containerd, no /v2): the 1.x line with the
# per-runtime CRI snapshotter, between Debian's 1.6 and 2.x (docs/compat.md).  go 1.23.
CONTAINERD17_VERSION="v1.7.30"
NERDCTL_VERSION="v2.2.2"
CRI_TOOLS_VERSION="v1.36.0"
# containerd's Makefile: the daemon needs no cgo once btrfs is out (btrfs needs libbtrfs
# headers; devmapper is not needed); the runc shim is built CGO_ENABLED=0 there too.
CONTAINERD_TAGS="no_btrfs no_devmapper no_zfs"
# 1.7 still has the aufs snapshotter (removed in 2.0): out too, it would modprobe aufs
CONTAINERD17_TAGS="no_btrfs no_devmapper no_zfs no_aufs"

STRICT=0
LIST=0
want=()
for arg in "$@"; do
  case "$arg" in
    --strict) STRICT=1 ;;
    --list) LIST=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    containerd2|containerd17|nerdctl|cri-tools|crictl) want+=("$arg") ;;
    *) echo "peers: unknown argument $arg" >&2; exit 2 ;;
  esac
done
[ "${#want[@]}" -eq 0 ] && want=(containerd2 containerd17 nerdctl cri-tools)

dir_of() {
  case "$1" in
    containerd2) echo "$PEERS/containerd-$CONTAINERD2_VERSION" ;;
    containerd17) echo "$PEERS/containerd-$CONTAINERD17_VERSION" ;;
    nerdctl) echo "$PEERS/nerdctl-$NERDCTL_VERSION" ;;
    cri-tools|crictl) echo "$PEERS/cri-tools-$CRI_TOOLS_VERSION" ;;
  esac
}
bins_of() {
  case "$1" in
    containerd2|containerd17) echo "containerd ctr containerd-shim-runc-v2" ;;
    nerdctl) echo "nerdctl" ;;
    cri-tools) echo "crictl critest" ;;
    crictl) echo "crictl" ;;
  esac
}
stamp_of() {  # what the .ok stamp must say for the build to count as current
  case "$1" in
    containerd2) echo "$CONTAINERD2_VERSION tags=$CONTAINERD_TAGS" ;;
    containerd17) echo "$CONTAINERD17_VERSION tags=$CONTAINERD17_TAGS" ;;
    nerdctl) echo "$NERDCTL_VERSION" ;;
    cri-tools|crictl) echo "$CRI_TOOLS_VERSION" ;;
  esac
}
# crictl shares cri-tools' dir: its own stamp, and a full cri-tools build counts for it too
stamp_file() { case "$1" in crictl) echo "$(dir_of "$1")/.ok.crictl" ;; *) echo "$(dir_of "$1")/.ok" ;; esac; }

if [ "$LIST" -eq 1 ]; then
  for p in "${want[@]}"; do echo "$p $(dir_of "$p")/bin $(bins_of "$p")"; done
  exit 0
fi

now() { echo "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

all_bins() {
  local d; d="$(dir_of "$1")"
  for b in $(bins_of "$1"); do [ -x "$d/bin/$b" ] || return 1; done
}
present() {
  local d f; d="$(dir_of "$1")"; f="$(stamp_file "$1")"
  if [ "$1" = crictl ] && present cri-tools; then return 0; fi
  [ -f "$f" ] && [ "$(cat "$f")" = "$(stamp_of "$1")" ] || return 1
  for b in $(bins_of "$1"); do [ -x "$d/bin/$b" ] || return 1; done
}

# A module copied out of the module cache into a writable build dir ($2).  Needed when
# `go install pkg@version` refuses (replace directives in go.mod) or for `go test -c`.
module_copy() {
  local mod="$1" ver="$2" dst="$3" src
  src="$("$GO" mod download -json "$mod@$ver" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  [ -n "$src" ] && [ -d "$src" ] || { echo "peers:   go mod download $mod@$ver failed" >&2; return 1; }
  rm -rf "$dst"; mkdir -p "$(dirname "$dst")"
  cp -r "$src" "$dst" && chmod -R u+w "$dst"
}

build_containerd2() {
  local d="$1" m="github.com/containerd/containerd/v2/cmd"
  GOBIN="$d/bin" CGO_ENABLED=0 "$GO" install -tags "$CONTAINERD_TAGS" \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD2_VERSION" \
    "$m/containerd@$CONTAINERD2_VERSION" "$m/ctr@$CONTAINERD2_VERSION" \
    "$m/containerd-shim-runc-v2@$CONTAINERD2_VERSION"
}

build_containerd17() {
  # `go install ...@v1.7.30` refuses: 1.7's go.mod has an `exclude` directive (a module used
  # as a dependency must not have one).  So build from a copy of the module, as for crictl;
  # same tags and CGO_ENABLED=0 as 2.x.
  local d="$1" src="$1/src" v="-X github.com/containerd/containerd/version.Version=$CONTAINERD17_VERSION"
  module_copy github.com/containerd/containerd "$CONTAINERD17_VERSION" "$src" || return 1
  ( cd "$src" && for b in containerd ctr containerd-shim-runc-v2; do
      CGO_ENABLED=0 "$GO" build -mod=mod -trimpath -tags "$CONTAINERD17_TAGS" -ldflags "-s -w $v" \
        -o "$d/bin/$b" "./cmd/$b" || exit 1
    done ) || return 1
  rm -rf "$src"
}

build_nerdctl() {
  # nerdctl's go.mod replaces github.com/containerd/nerdctl/mod/tigron (its test framework,
  # a nested module that is not in the module zip, and not served by the proxy here) with
  # ./mod/tigron, so `go install @version` refuses.  Build from a copy of the module without
  # that requirement; the only non-_test.go file importing it, cmd/nerdctl/helpers/
  # testing_linux.go (ComposeUp, NewCosignKeyPair: helpers for nerdctl's own tests, importing
  # "testing"), is left out of the copy.
  local d="$1" src="$1/src"
  module_copy github.com/containerd/nerdctl/v2 "$NERDCTL_VERSION" "$src" || return 1
  ( cd "$src" && rm -f cmd/nerdctl/helpers/testing_linux.go \
    && "$GO" mod edit -dropreplace=github.com/containerd/nerdctl/mod/tigron@v0.0.0 \
      -droprequire=github.com/containerd/nerdctl/mod/tigron \
    && CGO_ENABLED=0 "$GO" build -mod=mod -trimpath \
      -ldflags "-s -w -X github.com/containerd/nerdctl/v2/pkg/version.Version=$NERDCTL_VERSION" \
      -o "$d/bin/nerdctl" ./cmd/nerdctl ) || return 1
  rm -rf "$src"
}

build_crictl() {
  local d="$1" src="$1/src" v="-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION"
  module_copy sigs.k8s.io/cri-tools "$CRI_TOOLS_VERSION" "$src" || return 1
  ( cd "$src" && CGO_ENABLED=0 "$GO" build -mod=mod -trimpath -ldflags "-s -w $v" \
      -o "$d/bin/crictl" ./cmd/crictl ) || return 1
  rm -rf "$src"
}

build_cri-tools() {
  # `go install sigs.k8s.io/cri-tools/cmd/crictl@v` fails here: it also reads the module's
  # version list (for deprecations), which the proxy answers 403 for.  So build from a copy
  # of the module; critest is a test binary anyway (`go test -c`, as cri-tools' Makefile does).
  local d="$1" src="$1/src" v="-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION"
  module_copy sigs.k8s.io/cri-tools "$CRI_TOOLS_VERSION" "$src" || return 1
  ( cd "$src" && CGO_ENABLED=0 "$GO" build -mod=mod -trimpath -ldflags "-s -w $v" \
      -o "$d/bin/crictl" ./cmd/crictl \
    && CGO_ENABLED=0 "$GO" test -mod=mod -c -trimpath -ldflags "-s -w $v" \
      -o "$d/bin/critest" ./cmd/critest ) || return 1
  rm -rf "$src"
}

failed=()
total_start=$(now)
for p in "${want[@]}"; do
  d="$(dir_of "$p")"
  t0=$(now)
  if present "$p"; then
    echo "peers: $p: present in $d/bin ($(secs "$t0" "$(now)")s)"
    continue
  fi
  echo "peers: $p: building $(stamp_of "$p") into $d/bin"
  mkdir -p "$d/bin" "$d/log"
  rm -f "$(stamp_file "$p")"
  if "build_$p" "$d" >"$d/log/build.log" 2>&1 && all_bins "$p"; then
    stamp_of "$p" >"$(stamp_file "$p")"
    echo "peers: $p: built in $(secs "$t0" "$(now)")s"
  else
    echo "peers: $p: FAILED after $(secs "$t0" "$(now)")s; last lines of $d/log/build.log:" >&2
    tail -n 15 "$d/log/build.log" | sed 's/^/peers:   /' >&2
    failed+=("$p")
  fi
done
echo "peers: total $(secs "$total_start" "$(now)")s"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "peers: not built: ${failed[*]}" >&2
  [ "$STRICT" -eq 1 ] && exit 1
fi
exit 0
