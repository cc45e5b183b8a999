#!/usr/bin/env bash
# Boots a QEMU guest whose disk is served by vhost-device-blk: starts the daemon on a fresh
# socket, starts QEMU with shared guest memory (memfd) and a vhost-user-blk-pci device on that
# socket, and when QEMU exits stops the daemon (SIGTERM: drain, flush, exit 0).
#
# Usage: vhost-user-blk-vm.sh [OPTIONS] IMAGE [-- QEMU ARGS...]
#   --daemon PATH       vhost-device-blk binary (default: vhost-device-blk from PATH)
#   --format FMT        raw or qcow2 (default: probed by the daemon)
#   --queues N          request queues of the device and daemon threads (default 1)
#   --memory SIZE       guest memory, e.g. 1G (default 1G)
#   --accel ACCEL       kvm or tcg (default: kvm if /dev/kvm is usable, tcg otherwise)
#   --socket PATH       vhost-user socket (default: in a new temporary directory)
#   --daemon-arg ARG    one more daemon argument (repeat for more, e.g. --daemon-arg --read-only)
#   --daemon-log FILE   daemon's log (default: stderr)
#   --qemu PATH         QEMU binary (default: qemu-system-x86_64)
# Everything after -- goes to QEMU unchanged: the boot disk or -kernel/-initrd/-append,
# -display, -serial, -nodefaults, -smp...
#
# Example: vhost-user-blk-vm.sh --format qcow2 --queues 2 disk.qcow2 -- \
#              -kernel vmlinuz -append "console=ttyS0 root=/dev/vda" -nographic
#
# Exit status: QEMU's; 1 if QEMU succeeded but the daemon failed to start or to stop cleanly.
set -euo pipefail

daemon=vhost-device-blk
qemu=qemu-system-x86_64
format=
queues=1
memory=1G
accel=
socket=
daemon_log=
daemon_args=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --daemon) daemon=$2; shift 2 ;;
        --format) format=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        --memory) memory=$2; shift 2 ;;
        --accel) accel=$2; shift 2 ;;
        --socket) socket=$2; shift 2 ;;
        --daemon-arg) daemon_args+=("$2"); shift 2 ;;
        --daemon-log) daemon_log=$2; shift 2 ;;
        --qemu) qemu=$2; shift 2 ;;
        -h|--help) usage ;;
        --) usage ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
image=$1
shift
if [ $# -gt 0 ]; then
    [ "$1" = "--" ] || usage
    shift
fi

if [ -z "$accel" ]; then
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then accel=kvm; else accel=tcg; fi
fi
tmpdir=
if [ -z "$socket" ]; then
    tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/vhost-user-blk-vm.XXXXXX")
    socket=$tmpdir/vhost-user-blk.sock
fi

args=(--socket-path "$socket" --blk-file "$image" --num-queues "$queues")
if [ -n "$format" ]; then args+=(--format "$format"); fi
args+=("${daemon_args[@]}")
if [ -n "$daemon_log" ]; then
    "$daemon" "${args[@]}" 2>"$daemon_log" &
else
    "$daemon" "${args[@]}" &
fi
daemon_pid=$!
qemu_pid=

cleanup() {
    if [ -n "$qemu_pid" ]; then kill "$qemu_pid" 2>/dev/null || true; fi
    kill "$daemon_pid" 2>/dev/null || true
    if [ -n "$tmpdir" ]; then rm -rf "$tmpdir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The daemon creates the socket once it listens.
for _ in $(seq 2000); do
    [ -S "$socket" ] && break
    kill -0 "$daemon_pid" 2>/dev/null || { wait "$daemon_pid" || true; echo "vhost-device-blk failed to start" >&2; exit 1; }
    sleep 0.01
done
[ -S "$socket" ] || { echo "vhost-device-blk did not create $socket" >&2; exit 1; }

# vhost-user needs the guest's memory in shared memory with a file descriptor (memfd).
"$qemu" \
    -accel "$accel" \
    -m "$memory" \
    -object "memory-backend-memfd,id=mem,size=$memory,share=on" \
    -numa node,memdev=mem \
    -chardev "socket,id=vhost-user-blk0,path=$socket" \
    -device "vhost-user-blk-pci,chardev=vhost-user-blk0,num-queues=$queues" \
    "$@" &
qemu_pid=$!
set +e
wait "$qemu_pid"
qemu_status=$?
qemu_pid=
kill -TERM "$daemon_pid"
wait "$daemon_pid"
daemon_status=$?
set -e
if [ "$daemon_status" -ne 0 ]; then
    echo "vhost-device-blk exited with status $daemon_status" >&2
    [ "$qemu_status" -ne 0 ] || qemu_status=1
fi
exit "$qemu_status"
