#!/bin/sh
# fractal guest init (PID 1), busybox sh.
#
# Why a shell script: busybox starts in milliseconds even under TCG, and every
# step here is a mount or an insmod.  Python starts only for the agent.
#
# Kernel command line (set by ccpu.vm.qemu):
#   fractal.mode=agent|run|shell   what to exec at the end (default agent)
#   fractal.repo=9p|virtiofs|none  how the layer repo (tag fractalrepo) is shared; mounted ro at /repo
#   fractal.share=TAG:TYPE:MODE:PATH  an extra share (TYPE 9p|virtiofs, MODE ro|rw), repeatable
#   fractal.net=NAME,MAC,MTU,ITEM...  a NIC to configure (ccpu.vm.net: the pod's interface), repeatable;
#                                   found by MAC, renamed NAME; ITEMs in order: A.B.C.D/N (address),
#                                   r=DST (on-link route), r=DST@GW (route via GW), gw=GW (default route)
#   fractal.reserve=MIB             guest memory containers can never take (agent mode; default 64)
#   fractal.tty=TERM                run mode: CMD on a pty with TERM (vm run -t), keys on fractal.stdin
#   fractal.stdin=1                 run mode: CMD's stdin is the fractal.stdin port (vm run -i)
#   fractal.debug=1                 echo every step with its uptime to the console
#   fractal.timeline=1              the same steps' uptimes without debug's kernel log level and agent
#                                   --debug, and the agent's own (FRACTAL_TIMELINE=1: imported, hello
#                                   answered): hack/bench/guest.py --timeline
#   fractal.verify_image=1          hash the system image disk before mounting it and stop unless it is
#                                   the one /etc/fractal/image names (vm.attest: the measured initramfs
#                                   then vouches for the disk too; docs/hardware.md)
#   fractal.sysimage=erofs|squashfs the system image's file system (default erofs: what the build makes;
#                                   squashfs only for hack/bench/sysimage.py's measured candidates)
#   fractal.sysdev=blk|pmem|virtiofs how it is attached (default blk: virtio-blk serial fractal-sys;
#                                   pmem: the only virtio-pmem device, /dev/pmem0, mounted with DAX
#                                   when the kernel allows; virtiofs: the image's tree, the read-only
#                                   share tag fractalsys, no file system image); a non-default pair loads the modules of
#                                   /etc/fractal/modules.sysimage first (docs/vm.md "The candidates, measured")
#   fractal.listen=IP:PORT          agent mode on a machine (docs/hardware.md): no virtio-serial port; the
#                                   agent listens on TCP with mutual TLS, a key made at boot, and its
#                                   own layer repo on a tmpfs (layers streamed by the host)
#   fractal.ca=sha256:HEX           with fractal.listen: the only CA whose client certificates the agent
#                                   accepts; its certificate is read from the disk with serial
#                                   fractal-ca and refused unless its sha256 is HEX
#   fractal.boot.lowers=N:M:...     boot mode (fractal boot): the image's layer dirs below /repo, top first
#   fractal.boot.init=PATH          boot mode: the image's init, exec'd as PID 1 in its root
#                                   (run mode with fractal.boot.lowers: vm run --image, the command
#                                   runs chrooted in the image's root)
#
# Milestones go to the console as "fractal-init: <uptime> <what>" so the host
# can measure the boot timeline from the console log.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8

# --- 0. a root that pivot_root(2) accepts -------------------------------------
# The initramfs root ("rootfs") has no parent mount, and pivot_root refuses to
# move it away: runc could not start containers.  Bind the rootfs onto itself
# and chroot into the bind mount (which does have a parent), once.
if [ -z "$FRACTAL_STAGE2" ]; then
    mkdir -p /.root
    mount --bind / /.root && cd /.root && mount --move . / && FRACTAL_STAGE2=1 exec chroot . /init "$@"
    echo "fractal-init: could not re-root; pivot_root will not work" >/dev/console
fi

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/mqueue /run /tmp /repo
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts
ln -sf pts/ptmx /dev/ptmx 2>/dev/null
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm
mount -t mqueue -o nosuid,nodev,noexec mqueue /dev/mqueue 2>/dev/null
mount -t tmpfs -o nosuid,nodev,mode=0755 run /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /tmp
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
exec </dev/null >/dev/console 2>&1

mode=agent repo=none debug=0 timeline=0 shares="" nets="" reserve=64 tty="" stdin=0 verify_image=0 blowers="" binit=/sbin/init listen="" ca="" sysimage=erofs sysdev=blk
read -r cmdline </proc/cmdline  # a builtin, not a fork: under TCG each fork of busybox costs ms
for arg in $cmdline; do  # fractal.* only; values have no spaces
    case "$arg" in
        fractal.mode=*) mode="${arg#*=}" ;;
        fractal.repo=*) repo="${arg#*=}" ;;
        fractal.share=*) shares="$shares ${arg#*=}" ;;
        fractal.net=*) nets="$nets ${arg#*=}" ;;
        fractal.debug=*) debug="${arg#*=}" ;;
        fractal.timeline=*) timeline="${arg#*=}" ;;
        fractal.reserve=*) reserve="${arg#*=}" ;;
        fractal.tty=*) tty="${arg#*=}" ;;
        fractal.stdin=*) stdin="${arg#*=}" ;;
        fractal.verify_image=*) verify_image="${arg#*=}" ;;
        fractal.boot.lowers=*) blowers="${arg#*=}" ;;
        fractal.boot.init=*) binit="${arg#*=}" ;;
        fractal.listen=*) listen="${arg#*=}" ;;
        fractal.ca=*) ca="${arg#*=}" ;;
        fractal.sysimage=*) sysimage="${arg#*=}" ;;
        fractal.sysdev=*) sysdev="${arg#*=}" ;;
    esac
done

milestone() { read -r up _ </proc/uptime; echo "fractal-init: $up $*"; }
step() { { [ "$debug" = 1 ] || [ "$timeline" = 1 ]; } && milestone "$@"; return 0; }
die() {
    milestone "FATAL: $*"
    sleep 1
    poweroff -f
}

# find_dev CLASSDIR ATTR VALUE -> /dev/NAME of the sysfs entry whose ATTR file reads VALUE, once
# its device node exists.  The devices probe during insmod: the wait (<= 4 s) is a safety net.
find_dev() {
    i=0
    while [ $i -lt 200 ]; do
        for d in "$1"/*; do
            v=""
            { read -r v <"$d/$2"; } 2>/dev/null  # a builtin: no fork per device under TCG
            [ "$v" = "$3" ] && [ -e "/dev/${d##*/}" ] && {
                echo "/dev/${d##*/}"
                return 0
            }
        done
        sleep 0.02
        i=$((i + 1))
    done
    return 1
}

milestone "init started (mode=$mode)"
echo fractal >/proc/sys/kernel/hostname

# --- 1. modules, dependencies first (order computed at build time) ------------
# /etc/fractal/modules: what the agent's start needs (the virtio transports, the ports, the system
# disk); /etc/fractal/modules.later (if any): the rest (shares, NICs, overlay, bridge, ...), loaded
# by finish_boot -- beside the agent in agent mode, before anything else in the others.
# One busybox `modprobe -a` for the whole list (its dependencies from the initramfs's own modules.dep,
# modules.shipped_modules_dep): under TCG each fork + exec of busybox is ~10 ms.  A module with
# options on the kernel command line (microvm's virtio_mmio.device=) goes the insmod way with the
# options passed along (busybox insmod does not read them as modprobe does); so does anything left
# over if modprobe fails, one by one (what is loaded already is skipped).
read -r rel </proc/sys/kernel/osrelease
load_modules() {  # LIST: one module path (below /lib/modules/REL) a line, dependencies first
    [ -s "$1" ] || return 0  # none, or empty: a kernel with everything built in (ccpu/guest/kbuild.py)
    names="" withparams=""
    while read -r ko; do
        name="${ko##*/}"
        name="${name%.ko}"
        name="${name//-/_}"
        names="$names $name"
        for a in $cmdline; do
            case "$a" in "$name".*=*) withparams=1 ;; esac
        done
    done <"$1"
    if [ -z "$withparams" ] && [ -e "/lib/modules/$rel/modules.dep" ]; then
        # shellcheck disable=SC2086
        modprobe -a $names && return 0
        milestone "modprobe -a failed: insmod one by one"
    fi
    while read -r ko; do
        name="${ko##*/}"
        name="${name%.ko}"
        name="${name//-/_}"
        [ -d "/sys/module/$name" ] && continue
        params=""
        for a in $cmdline; do
            case "$a" in "$name".*=*) params="$params ${a#"$name".}" ;; esac
        done
        # shellcheck disable=SC2086
        insmod "/lib/modules/$rel/$ko" $params || milestone "insmod $ko failed"
    done <"$1"
}
load_modules /etc/fractal/modules
step "modules loaded"

# --- 1b. the read-only system image (layout "image", ccpu/guest/initramfs.py) -
# python, the agent, runc and their libraries are on a read-only virtio-blk disk
# (serial fractal-sys, EROFS); the initramfs's symlinks (usr -> /.image/usr, ...)
# point into its mount.
# fractal.sysimage / fractal.sysdev: the other candidates hack/bench/sysimage.py measures; the
# default pair (erofs on virtio-blk) needs nothing more than the early modules.
find_pmem() {  # the virtio-pmem disk's node: it probes during insmod, the wait is a safety net
    i=0
    while [ $i -lt 200 ]; do
        [ -b /dev/pmem0 ] && { echo /dev/pmem0; return 0; }
        sleep 0.02
        i=$((i + 1))
    done
    return 1
}
if [ -e /etc/fractal/image ]; then
    case "$sysimage" in erofs | squashfs) ;; *) die "fractal.sysimage=$sysimage: expected erofs or squashfs" ;; esac
    case "$sysdev" in blk | pmem | virtiofs) ;; *) die "fractal.sysdev=$sysdev: expected blk, pmem or virtiofs" ;; esac
    sysopts=ro
    if [ "$sysimage/$sysdev" != erofs/blk ]; then
        [ -s /etc/fractal/modules.sysimage ] ||
            die "fractal.sysimage=$sysimage fractal.sysdev=$sysdev: this guest ships no /etc/fractal/modules.sysimage"
        load_modules /etc/fractal/modules.sysimage
    fi
    # a padded image's hash is not the build's, a tree has none: the measured boot keeps the disk
    [ "$sysdev" != blk ] && [ "$verify_image" = 1 ] && die "fractal.verify_image=1 needs fractal.sysdev=blk"
    if [ "$sysdev" = virtiofs ]; then
        sysimage=virtiofs sysdisk=fractalsys
    elif [ "$sysdev" = pmem ]; then
        sysdisk="$(find_pmem)" || die "no system image on virtio-pmem (/dev/pmem0)"
        # the image's pages mapped into the guest instead of copied into its page cache (kata's
        # way); erofs falls back to the page cache when the device cannot do DAX
        [ "$sysimage" = erofs ] && sysopts=ro,dax=always
    else
        sysdisk="$(find_dev /sys/block serial fractal-sys)" || die "no system image disk (virtio-blk serial fractal-sys)"
    fi
    if [ "$verify_image" = 1 ] && [ "$sysdev" = blk ]; then
        read -r _ want </etc/fractal/image
        got="$(sha256sum "$sysdisk")"
        [ "${got%% *}" = "$want" ] || die "system image $sysdisk is sha256 ${got%% *}, the initramfs names $want: refused"
        milestone "system image verified (sha256 $want)"
    fi
    mount -t "$sysimage" -o "$sysopts" "$sysdisk" /.image || die "cannot mount the system image $sysdisk ($sysimage)"
    # larger reads for python's first page faults and file reads (each virtio-blk request costs
    # under TCG): 2 MiB instead of the block layer's 128 KiB
    [ "$sysdev" = blk ] && echo 2048 >"/sys/block/${sysdisk#/dev/}/queue/read_ahead_kb" 2>/dev/null
    if [ "$sysimage/$sysdev" != erofs/blk ]; then  # what the kernel made of it (dax on or not)
        while read -r _ mp fs o _; do [ "$mp" = /.image ] && milestone "system image: $fs $sysdisk $o"; done </proc/mounts
    fi
    step "system image mounted"
fi

# --- 2. shares ----------------------------------------------------------------
mount_share() {  # tag type mode path
    mkdir -p "$4"
    case "$2" in
        # read-only shares (the layers): the POSIX ACLs of the host's files are seen and applied
        9p) acl=""; [ "$3" = ro ] && acl=",posixacl"
            mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144,$3$acl" "$1" "$4" ;;
        virtiofs) mount -t virtiofs -o "$3" "$1" "$4" ;;
        *) false ;;
    esac || die "mount of share $1 ($2) at $4 failed"
}
mount_shares() {
    [ "$repo" != none ] && mount_share fractalrepo "$repo" ro /repo
    for s in $shares; do
        IFS=: read -r tag type smode path <<EOF
$s
EOF
        [ "$tag" = fractalsys ] && [ "$sysdev" = virtiofs ] && continue  # the system tree: mounted in 1b
        mount_share "$tag" "$type" "$smode" "$path"
    done
    step "shares mounted"
}

# --- 3. network: the pod's interfaces (before the agent: containers expect it up)
nic_by_mac() {  # mac -> interface name; virtio-net probes during insmod, the wait is a safety net
    i=0
    while [ $i -lt 100 ]; do
        for d in /sys/class/net/*; do
            [ "$(cat "$d/address" 2>/dev/null)" = "$1" ] && { echo "${d##*/}"; return 0; }
        done
        sleep 0.02
        i=$((i + 1))
    done
    return 1
}
net_up() {  # NAME,MAC,MTU,ITEM...
    oldifs="$IFS"
    IFS=,
    # shellcheck disable=SC2086
    set -- $1
    IFS="$oldifs"
    name="$1" mac="$2" mtu="$3"
    shift 3
    dev="$(nic_by_mac "$mac")" || die "network: no NIC with MAC $mac"
    if [ "$dev" != "$name" ]; then
        ip link set dev "$dev" name "$name" && dev="$name" || milestone "network: cannot rename $dev to $name"
    fi
    ip link set dev "$dev" mtu "$mtu" up || die "network: $dev mtu $mtu up failed"
    for item in "$@"; do
        case "$item" in
            gw=*) ip route add default via "${item#gw=}" dev "$dev" onlink ;;
            r=*@*) r="${item#r=}"; ip route add "${r%@*}" via "${r#*@}" dev "$dev" onlink ;;
            r=*) ip route add "${item#r=}" dev "$dev" scope link ;;
            *) ip addr add "$item" dev "$dev" ;;
        esac || die "network: $dev: $item failed"
    done
}

# free page reporting's order (docs/vm.md "Host memory per VM"): the host passes the kernel's own
# parameter (page_reporting.page_reporting_order=N), but a 6.1 kernel overwrites it with the
# pageblock order (9: only free 2 MiB blocks go back to the host) when the balloon registers --
# virtio_balloon, one of the later modules -- so it is written again once that is loaded.
set_page_reporting_order() {
    for a in $cmdline; do
        case "$a" in
            page_reporting.page_reporting_order=*)
                echo "${a#*=}" 2>/dev/null >/sys/module/page_reporting/parameters/page_reporting_order ||
                    milestone "page_reporting_order ${a#*=} not set" ;;
        esac
    done
}
# finish_boot: what is left of the boot once the agent can start -- the other modules, the shares,
# the pod's NICs.  Agent mode over a port runs it beside the agent (the `hello` does not wait for
# it, every other request does: the agent's --init-done), every other mode before its step.
finish_boot() {
    ip link set lo up 2>/dev/null
    load_modules /etc/fractal/modules.later
    step "later modules loaded"
    set_page_reporting_order
    mount_shares
    for n in $nets; do
        net_up "$n"
    done
    [ -n "$nets" ] && step "network configured"
    return 0
}
{ [ "$mode" = agent ] && [ -z "$listen" ]; } || finish_boot

# --- 4. virtio-serial ports, found by name (no udev) ------------------------
port() { find_dev /sys/class/virtio-ports name "$1"; }

# --- 4b. run-at-boot commands (fractal guest build --run-at-boot; docs/vm.md "Extending the guest")
# Each runs beside the agent (or the command), output on the console, restarted when it exits: after
# 1 s, doubling up to 32 s while it keeps dying within 10 s of its start.
supervise() {  # N CMD
    delay=1
    while :; do
        read -r t0 _ </proc/uptime
        echo "fractal-run-at-boot[$1]: start: $2"
        sh -c "$2" </dev/null
        rc=$?
        read -r t1 _ </proc/uptime
        [ $((${t1%.*} - ${t0%.*})) -ge 10 ] && delay=1
        echo "fractal-run-at-boot[$1]: exited $rc; restart in ${delay}s"
        sleep "$delay"
        [ "$delay" -lt 32 ] && delay=$((delay * 2))
    done
}
start_run_at_boot() {  # after finish_boot: the commands find the shares, NICs and modules there
    [ -s /etc/fractal/run-at-boot ] && [ "$mode" != boot ] || return 0
    n=0
    while IFS= read -r cmd; do
        n=$((n + 1))
        supervise "$n" "$cmd" &
    done </etc/fractal/run-at-boot
}
{ [ "$mode" = agent ] && [ -z "$listen" ]; } || start_run_at_boot

# stack_image_root: the image's layers (fractal.boot.lowers, read-only at /repo) + a tmpfs upper,
# mounted at $b/root (b=/.boot).  fractal boot runs the image's init in it; vm run --image runs the
# command in it.  Stacked as the agent stacks a container's (ccpu/stack.py nest_for_trusted_upper):
# several layers are first a read-only `userxattr` overlay (it reads the repo's user.overlay.opaque
# markers, the only ones a share carries), which is the one lower of the writable overlay whose
# upper is on tmpfs (no user.* xattrs there).
b=/.boot
stack_image_root() {
    mkdir -p $b/rw $b/lower $b/root
    mount -t tmpfs -o mode=0755 bootrw $b/rw || die "boot: cannot mount the writable layer's tmpfs"
    mkdir -p $b/rw/upper $b/rw/work
    lower=""
    oldifs="$IFS"
    IFS=:
    for l in $blowers; do
        case "$l" in '' | .* | */*) die "boot: bad layer name '$l'" ;; esac
        [ -d "/repo/$l" ] || die "boot: layer /repo/$l is not shared"
        lower="$lower${lower:+:}/repo/$l"
    done
    IFS="$oldifs"
    [ -n "$lower" ] || die "boot: no layers (fractal.boot.lowers)"
    case "$lower" in
    *:*)
        mount -t overlay -o "ro,index=off,userxattr,lowerdir=$lower" bootlower $b/lower ||
            die "boot: cannot stack the image's layers"
        lower=$b/lower ;;
    esac
    mount -t overlay -o "index=off,lowerdir=$lower,upperdir=$b/rw/upper,workdir=$b/rw/work" bootroot $b/root ||
        die "boot: cannot mount the image's root"
}

# start_agent WHERE ARGS...: the agent (python -S -I, ccpu.agent's main with ARGS) as init's child in
# the background ($agent_pid), both at oom_score_adj -1000; its containers' cgroups go below
# /fractal, whose memory.max keeps $reserve MiB for the kernel, the agent and runc; --debug with
# fractal.debug=1.  Launched with -c rather than -m: runpy (importlib.util, contextlib) is not on
# the boot path.
start_agent() {
    where="$1"
    shift
    case "$reserve" in '' | *[!0-9]*) reserve=64 ;; esac
    agent_debug=""
    [ "$debug" = 1 ] && agent_debug="--debug"
    read -r python </etc/fractal/python || python=python3
    milestone "exec agent on $where"
    echo -1000 >/proc/self/oom_score_adj
    # shellcheck disable=SC2086
    FRACTAL_TIMELINE="$timeline" "$python" -S -I -c 'import sys; from ccpu.agent.__main__ import main; sys.exit(main())' \
        "$@" --cgroup-parent /fractal --memory-reserve-mb "$reserve" --nics $agent_debug &
    agent_pid=$!
}
wait_agent() {  # init gone: the kernel panics and QEMU exits (-no-reboot), as the host expects
    wait "$agent_pid"
    milestone "agent exited with $?"
    exit 0
}

case "$mode" in
agent)
    if [ -n "$listen" ]; then
        # a machine (docs/hardware.md "The machine over a NIC"): reached only over its NIC; the
        # agent checks the CA disk against fractal.ca itself (this command line is measured)
        [ -n "$ca" ] || die "fractal.listen needs fractal.ca=sha256:HEX (the host CA's fingerprint)"
        cadev="$(find_dev /sys/block serial fractal-ca)" || die "no CA disk (virtio-blk serial fractal-ca)"
        mkdir -p /var/lib/fractal-agent /run/runc
        mount -t tmpfs -o nosuid,nodev,mode=0700 machinerepo /var/lib/fractal-agent ||
            die "cannot mount the machine's layer repo tmpfs"
        start_agent "tcp:$listen" --listen "tcp:$listen" --tls-ca-pin "$ca" --tls-ca-file "$cadev" \
            --runc-root /run/runc --repo /var/lib/fractal-agent
        wait_agent
    fi
    agent="$(port fractal.agent)" || die "no virtio-serial port named fractal.agent"
    # Storage (docs/vm.md "The guest's storage"): the agent's own state (bundles, runc's root)
    # stays on /run, which no container can write.  The containers' writable layers go below
    # /run/fractal/containers: the agent mounts a tmpfs of the container's size limit at
    # /run/fractal/containers/<id> for its upper/work dirs; this small tmpfs under them holds
    # only those mount points and the pods' /dev/shm dirs (@shm, CRI's 64M).
    mkdir -p /run/runc /run/fractal/bundles /run/fractal/containers
    mount -t tmpfs -o nosuid,nodev,mode=0755,size=64m scratch /run/fractal/containers ||
        die "cannot mount the containers' scratch tmpfs"
    # The agent serves the port as an inherited fd (`--fd`: a socket or a character device).
    # It answers `hello` while the init finishes the boot at the lowest priority (under TCG the
    # agent's start gets the vCPU); its other requests wait for $init_done (--init-done).
    init_done=/run/fractal/init.done
    start_agent "$agent" --fd 3 --runc-root /run/runc --bundle-root /run/fractal/bundles \
        --layer-root /repo/layers --layer-root /run/fractal/containers --init-done "$init_done" 3<>"$agent"
    renice 19 -p $$ >/dev/null
    finish_boot
    renice 0 -p $$ >/dev/null
    start_run_at_boot
    : >"$init_done"
    step "boot finished"
    wait_agent
    ;;
run)
    # Host protocol (ccpu.vm.run): the host writes two lines on fractal.run, a
    # random end marker and the base64 of the shell command.  Stdout/stderr of
    # the command go to the fractal.stdout/fractal.stderr ports, each followed by
    # the marker; then "EXIT <code>" on fractal.run; the host acks with a line
    # once it has both markers, and only then does the guest power off (nothing
    # the command wrote can be lost in QEMU's buffers).
    ctl="$(port fractal.run)" || die "no port fractal.run"
    out="$(port fractal.stdout)" || die "no port fractal.stdout"
    err="$(port fractal.stderr)" || die "no port fractal.stderr"
    exec 3<>"$ctl" 4>"$out" 5>"$err"
    read -r marker <&3
    read -r cmd64 <&3
    cmd="$(echo "$cmd64" | base64 -d)"
    cd /work 2>/dev/null || cd /
    if [ -n "$blowers" ]; then  # vm run --image: the command runs in the image's root, /work in it
        stack_image_root
        for s in $shares; do
            path="${s##*:}"
            mkdir -p "$b/root$path" && mount --bind "$path" "$b/root$path" || die "run: cannot bind share $path"
        done
        for m in dev proc sys; do
            mkdir -p "$b/root/$m" && mount --rbind "/$m" "$b/root/$m" || die "run: cannot bind /$m into the image"
        done
        [ -x "$b/root/bin/sh" ] || die "run: the image has no /bin/sh"
        # the command crosses the chroot in the environment, not re-quoted into a command line
        export FRACTAL_CMD="$cmd"
        cmd="exec chroot $b/root /bin/sh -c 'cd /work 2>/dev/null || cd /; eval \"\$FRACTAL_CMD\"'"
    fi
    milestone "run"
    if [ -n "$tty" ]; then  # vm run -t: CMD on a pty (ccpu/agent/vmtty.py), keystrokes on fractal.stdin
        in="$(port fractal.stdin)" || die "no port fractal.stdin"
        read -r python </etc/fractal/python || python=python3
        TERM="$tty" "$python" -S -I -m ccpu.agent.vmtty "$cmd" 6<"$in"
    elif [ "$stdin" = 1 ]; then  # vm run -i: the host's stdin; its end = the host side disconnecting
        in="$(port fractal.stdin)" || die "no port fractal.stdin"
        sh -c "$cmd" <"$in" >&4 2>&5
    else
        sh -c "$cmd" </dev/null >&4 2>&5
    fi
    rc=$?
    milestone "exit $rc"
    printf '%s' "$marker" >&4
    printf '%s' "$marker" >&5
    echo "EXIT $rc" >&3
    read -r -t 30 _ack <&3
    exec 3>&- 4>&- 5>&-
    sync
    poweroff -f
    ;;
boot)
    # fractal boot (ccpu/boot, docs/boot.md): the image's root (stack_image_root), then the
    # kernel's file systems and the shares move into it, and the image's init runs as PID 1.
    stack_image_root
    for s in $shares; do  # mounted at their paths above: into the new root
        path="${s##*:}"
        mkdir -p "$b/root$path" && mount --move "$path" "$b/root$path" || die "boot: cannot move share $path"
    done
    [ -e "$b/root$binit" ] || [ -L "$b/root$binit" ] || die "boot: no $binit in the image"
    milestone "boot: exec $binit"
    for m in dev proc sys run; do
        mkdir -p "$b/root/$m" && mount --move "/$m" "$b/root/$m" || die "boot: cannot move /$m into the root"
    done
    exec <"$b/root/dev/console" >"$b/root/dev/console" 2>&1  # as the kernel starts init
    umount /tmp 2>/dev/null
    cd $b/root && mount --move . / || die "boot: cannot make the image's root the root"
    exec chroot . "$binit"
    die "boot: cannot exec $binit"
    ;;
shell)
    exec setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
    ;;
*)
    die "unknown fractal.mode=$mode"
    ;;
esac
die "exec failed"
