#!/usr/bin/env bash
# Installs the Debian packages the tests use: the real NBD clients (libnbd-bin: nbdinfo,
# nbdcopy, nbdfuse; qemu-utils: qemu-img, qemu-io; fio with its nbd engine), an
# independent NBD server (nbdkit), what a real filesystem test needs (xfsprogs, fuse3 for
# nbdfuse, util-linux for losetup), and the real-kernel guest of tests/kernel_guest.rs
# (qemu-system-x86, busybox-static, nbd-client, cpio, kmod, binutils for objcopy, python3
# for the relays; the kernel itself is fetched by kernel-glue/guest/build-initramfs.sh
# with apt-get download); python3-libnbd for the independent client of tests/chaos.rs,
# nftables and iproute2 for tests/netns_partition.rs, systemd for systemd-analyze,
# resource-agents and libxml2-utils for ocf-tester. Run as root on Debian 12.
set -euo pipefail
packages=(fio libnbd-bin nbdkit qemu-utils xfsprogs fuse3 util-linux procps kmod python3
  qemu-system-x86 busybox-static nbd-client cpio binutils
  python3-libnbd nftables iproute2 systemd resource-agents libxml2-utils)
updated=no
install_missing() {
  local missing=()
  for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    if [ "$updated" = no ]; then
      apt-get update -qq
      updated=yes
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}
install_missing
# Debian 12's qemu-system-x86 (7.2) conflicts with a newer qemu-utils installed from
# elsewhere (a machine may come with 10.x) and apt removes it; the second pass installs
# the matching qemu-utils 7.2, whose qemu-img and qemu-io serve the tests just as well.
install_missing
# The guest's kernel comes from apt-get download: its package lists must know it.
if ! apt-cache depends linux-image-amd64 2>/dev/null | grep -q "Depends: linux-image-"; then
  apt-get update -qq
fi
# Loop devices are created on demand by losetup; make sure the driver is there.
modprobe loop 2>/dev/null || true
