#!/usr/bin/env bash
# Boots a cloud-hypervisor guest whose disk is served by vhost-device-blk: starts the daemon
# on a fresh socket, starts cloud-hypervisor with shared guest memory and a vhost-user disk on
# that socket, and when the VM exits stops the daemon (SIGTERM: drain, flush, exit 0).
#
# UNTESTED: cloud-hypervisor is not installable on the machines that run the test suite; this
# follows cloud-hypervisor's documented command line (--memory shared=on, --disk vhost_user=true).
#
# Usage: vhost-user-blk-vm.sh [OPTIONS] IMAGE [-- CLOUD-HYPERVISOR ARGS...]
#   --daemon PATH       vhost-device-blk binary (default: vhost-device-blk from PATH)
#   --format FMT        raw or qcow2 (default: probed by the daemon)
#   --queues N          request queues (default 1)
#   --queue-size N      virtqueue size (default 128)
#   --memory SIZE       guest memory, e.g. 1G (default 1G)
#   --boot-disk PATH    a disk image cloud-hypervisor opens itself, listed before ours
#   --socket PATH       vhost-user socket (default: in a new temporary directory)
#   --daemon-arg ARG    one more daemon argument (repeatable)
#   --daemon-log FILE   daemon's log (default: stderr)
#   --ch PATH           cloud-hypervisor binary (default: cloud-hypervisor)
# Everything after -- goes to cloud-hypervisor: --kernel/--cmdline or --firmware, --cpus,
# --serial, --console...
#
# Example: vhost-user-blk-vm.sh --format qcow2 --queues 2 data.qcow2 -- \
#              --kernel vmlinux --cmdline "console=ttyS0 root=/dev/vda1" \
#              --cpus boot=2 --serial tty --console off
set -euo pipefail

daemon=vhost-device-blk
ch=cloud-hypervisor
format=
queues=1
queue_size=128
memory=1G
boot_disk=
socket=
daemon_log=
daemon_args=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --daemon) daemon=$2; shift 2 ;;
        --format) format=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        --queue-size) queue_size=$2; shift 2 ;;
        --memory) memory=$2; shift 2 ;;
        --boot-disk) boot_disk=$2; shift 2 ;;
        --socket) socket=$2; shift 2 ;;
        --daemon-arg) daemon_args+=("$2"); shift 2 ;;
        --daemon-log) daemon_log=$2; shift 2 ;;
        --ch) ch=$2; shift 2 ;;
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

tmpdir=
if [ -z "$socket" ]; then
    tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/vhost-user-blk-vm.XXXXXX")
    socket=$tmpdir/vhost-user-blk.sock
fi

args=(--socket-path "$socket" --blk-file "$image" --num-queues "$queues" --queue-size "$queue_size")
if [ -n "$format" ]; then args+=(--format "$format"); fi
args+=("${daemon_args[@]}")
if [ -n "$daemon_log" ]; then
    "$daemon" "${args[@]}" 2>"$daemon_log" &
else
    "$daemon" "${args[@]}" &
fi
daemon_pid=$!
vm_pid=

cleanup() {
    if [ -n "$vm_pid" ]; then kill "$vm_pid" 2>/dev/null || true; fi
    kill "$daemon_pid" 2>/dev/null || true
    if [ -n "$tmpdir" ]; then rm -rf "$tmpdir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for _ in $(seq 2000); do
    [ -S "$socket" ] && break
    kill -0 "$daemon_pid" 2>/dev/null || { wait "$daemon_pid" || true; echo "vhost-device-blk failed to start" >&2; exit 1; }
    sleep 0.01
done
[ -S "$socket" ] || { echo "vhost-device-blk did not create $socket" >&2; exit 1; }

# vhost-user needs the guest's memory shared (shared=on); --disk takes all disks at once.
disks=()
if [ -n "$boot_disk" ]; then disks+=("path=$boot_disk"); fi
disks+=("vhost_user=true,socket=$socket,num_queues=$queues,queue_size=$queue_size")
"$ch" \
    --memory "size=$memory,shared=on" \
    --disk "${disks[@]}" \
    "$@" &
vm_pid=$!
set +e
wait "$vm_pid"
vm_status=$?
vm_pid=
kill -TERM "$daemon_pid"
wait "$daemon_pid"
daemon_status=$?
set -e
if [ "$daemon_status" -ne 0 ]; then
    echo "vhost-device-blk exited with status $daemon_status" >&2
    [ "$vm_status" -ne 0 ] || vm_status=1
fi
exit "$vm_status"
