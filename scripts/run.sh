#!/usr/bin/env bash
# Builds and runs the daemon. Usage: scripts/run.sh [IMAGE] [daemon options...]
# Without IMAGE a 1 GiB sparse demo image is created in target/demo/. The socket is
# $VHOST_BLK_SOCKET (default /tmp/vhost-device-blk.sock).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
image=${1:-}
if [ -n "$image" ]; then shift; else
    image=target/demo/demo.raw
    mkdir -p target/demo
    [ -e "$image" ] || truncate -s 1G "$image"
    echo "demo image: $image (1 GiB, sparse)"
fi
sock=${VHOST_BLK_SOCKET:-/tmp/vhost-device-blk.sock}
cat <<MSG
socket: $sock
attach QEMU:
  qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
    -chardev socket,id=vub0,path=$sock -device vhost-user-blk-pci,chardev=vub0 ...
attach cloud-hypervisor:
  cloud-hypervisor --memory size=1G,shared=on --disk vhost_user=true,socket=$sock ...
stop with Ctrl-C
MSG
exec target/release/vhost-device-blk --socket-path "$sock" --blk-file "$image" --format raw "$@"
