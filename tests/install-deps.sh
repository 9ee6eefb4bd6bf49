#!/usr/bin/env bash
# Installs the Debian packages the tests use: the real NBD clients (libnbd-bin: nbdinfo,
# nbdcopy, nbdfuse; qemu-utils: qemu-img, qemu-io; fio with its nbd engine), an
# independent NBD server (nbdkit), and what a real filesystem test needs (xfsprogs,
# fuse3 for nbdfuse, util-linux for losetup), and python3-libnbd for the independent
# client of tests/chaos.rs. Run as root on Debian 12.
set -euo pipefail
packages=(fio libnbd-bin nbdkit qemu-utils xfsprogs fuse3 util-linux procps kmod python3 python3-libnbd nftables iproute2 systemd)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Loop devices are created on demand by losetup; make sure the driver is there.
modprobe loop 2>/dev/null || true
