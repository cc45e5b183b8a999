#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (QEMU, a Linux kernel, busybox-static,
# e2fsprogs, Rust components), then formatting, lints, unit, integration and guest tests.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
compgen -G "/boot/vmlinuz-*" >/dev/null || need+=(linux-image-amd64)
if ! command -v busybox >/dev/null || ldd "$(command -v busybox)" >/dev/null 2>&1; then
    need+=(busybox-static)
fi
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v virt-xml-validate >/dev/null || need+=(libvirt-clients)
command -v xmllint >/dev/null || need+=(libxml2-utils)
for t in mkfs.ext4 e2fsck debugfs; do
    PATH="$PATH:/sbin:/usr/sbin" command -v "$t" >/dev/null || { need+=(e2fsprogs); break; }
done

if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    as_root apt-get update -qq
    pkgs=("${need[@]}")
    if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
        # qemu-system-x86 and qemu-utils must come from the same QEMU release: pin qemu-utils to
        # the version apt will install for qemu-system-x86 (this may downgrade a newer one).
        v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        pkgs=("${pkgs[@]/qemu-utils/}")
        pkgs+=("qemu-utils=$v")
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        --allow-downgrades ${pkgs[@]}
fi

for comp in rustfmt clippy; do
    cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$comp"
done

cargo fmt --check
cargo clippy --all-targets -- -D warnings
# Fuzz smoke run: every cargo-fuzz target for 20 s from the seeds (docs/security.md).
scripts/fuzz.sh
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast
    cargo test --doc
else
    cargo test --no-fail-fast
fi
