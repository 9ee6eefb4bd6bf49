#!/usr/bin/env bash
# Builds the pairbd test guest, or finds it in the cache: a Debian kernel and an
# initramfs holding busybox (busybox-static), nbd-client, mkfs.xfs and xfs_repair with the
# shared libraries they need (taken from this machine's packages), the kernel modules for
# nbd, xfs and virtio networking, and kernel-glue/guest/init as /init.
#
#   kernel-glue/guest/build-initramfs.sh        # prints the build directory on its last line
#
# The build directory ($PAIRBD_GUEST_CACHE, default /var/tmp/pairbd-guest, then one
# directory per input hash) holds kernel (for qemu's -kernel), initramfs.cpio
# (uncompressed newc) and manifest.txt. The hash covers this script, init, the kernel package's name and version
# and the bytes of every binary and library copied in, so the guest is rebuilt exactly
# when one of them changes (e.g. after apt-get upgrade) and otherwise reused. The kernel
# package is fetched once with `apt-get download` into $PAIRBD_GUEST_CACHE/debs.
#
# Per-run files (the test script /guest/run.sh, a config, a binary) are not in here: the
# caller appends a second cpio archive to initramfs.cpio, which the kernel unpacks on top.
#
# Needs (Debian packages, installed by tests/install-deps.sh): busybox-static, nbd-client,
# xfsprogs, cpio, kmod, and apt lists that know linux-image-amd64 (apt-get update).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${PAIRBD_GUEST_CACHE:-/var/tmp/pairbd-guest}

die() {
  echo "build-initramfs: $*" >&2
  exit 1
}
log() { echo "build-initramfs: $*" >&2; }

for tool in apt-get apt-cache dpkg-deb depmod modprobe cpio ldd sha256sum flock python3; do
  command -v "$tool" >/dev/null || die "$tool is missing; run tests/install-deps.sh as root"
done

# The programs the guest runs. busybox must be the static one (busybox-static).
busybox=/bin/busybox
programs=(/usr/sbin/nbd-client /usr/sbin/mkfs.xfs /usr/sbin/xfs_repair)
for program in "$busybox" "${programs[@]}"; do
  [ -x "$program" ] || die "$program is missing; run tests/install-deps.sh as root"
done
if ldd "$busybox" >/dev/null 2>&1; then
  die "$busybox is dynamically linked; install busybox-static"
fi
# Libraries that Rust binaries copied in per run (pairbd) need beyond those above.
extra_libraries=(libgcc_s.so.1 libm.so.6)
# Kernel modules, loaded in this order with their dependencies first.
modules=(virtio_pci virtio_net nbd xfs)
declare -A module_arguments=([nbd]="nbds_max=4 max_part=0")

mkdir -p "$cache/debs"
exec 9>"$cache/lock"
flock 9

# apt-get update when the package lists are missing or stale (as root only).
lists_updated=no
update_lists() {
  [ "$lists_updated" = no ] && [ "$(id -u)" = 0 ] || return 1
  log "apt-get update"
  apt-get update -qq >&2 || return 1
  lists_updated=yes
}
resolve_kernel() {
  kernel_package=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  [ -n "$kernel_package" ] || return 1
  kernel_package_version=$(apt-cache policy "$kernel_package" | awk '/Candidate:/ { print $2 }')
  [ -n "$kernel_package_version" ] && [ "$kernel_package_version" != "(none)" ]
}
resolve_kernel || { update_lists && resolve_kernel; } ||
  die "apt knows no linux-image-amd64 package; run apt-get update as root"

# Every library the programs load, as ldd resolves it on this machine.
libraries() {
  for program in "${programs[@]}"; do
    ldd "$program" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }'
  done
  for name in "${extra_libraries[@]}"; do
    for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
      if [ -e "$dir/$name" ]; then
        echo "$dir/$name"
        break
      fi
    done
  done
}
mapfile -t library_paths < <(libraries | sort -u)
for library in "${library_paths[@]}"; do
  [ -e "$library" ] || die "library $library (needed by the guest programs) is missing"
done

# The build directory: named by a hash of every input.
build_directory() {
  local hash
  hash=$(
    {
      echo "kernel $kernel_package $kernel_package_version"
      echo "modules ${modules[*]} nbd:${module_arguments[nbd]}"
      sha256sum "$here/build-initramfs.sh" "$here/init" "$busybox" "${programs[@]}" "${library_paths[@]}" |
        awk '{ print $1 }'
    } | sha256sum | cut -c1-16
  )
  build="$cache/guest-$hash"
}
build_directory
if [ -f "$build/manifest.txt" ] && [ -f "$build/kernel" ] && [ -f "$build/initramfs.cpio" ]; then
  echo "$build"
  exit 0
fi

log "building the guest in $build (kernel $kernel_package $kernel_package_version)"
work=$(mktemp -d "$cache/work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The kernel package, downloaded once.
download_kernel() {
  deb="$cache/debs/${kernel_package}_${kernel_package_version//:/%3a}_amd64.deb"
  [ -f "$deb" ] && return 0
  log "apt-get download $kernel_package=$kernel_package_version"
  (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root \
    "$kernel_package=$kernel_package_version" >&2) && [ -f "$deb" ]
}
# A version the mirror no longer has means stale lists: update, resolve again, retry.
download_kernel || { update_lists && resolve_kernel && download_kernel; } ||
  die "apt-get download $kernel_package=$kernel_package_version failed"
build_directory
dpkg-deb -x "$deb" "$work/kernel"
kernel_version=$(ls "$work/kernel/lib/modules" | head -n 1)
[ -n "$kernel_version" ] || die "$deb holds no modules"
vmlinuz="$work/kernel/boot/vmlinuz-$kernel_version"
[ -f "$vmlinuz" ] || die "$deb holds no vmlinuz-$kernel_version"
depmod -b "$work/kernel" "$kernel_version"

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,lib/modules,etc,proc,sys,dev,tmp,run,mnt,root,guest}

# busybox, and a link per applet (never one named busybox: that would loop), except for
# the names of the real programs copied in.
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list-full); do
  name=$(basename "$applet")
  [ "$name" = busybox ] && continue
  for program in "${programs[@]}"; do
    [ "$name" = "$(basename "$program")" ] && continue 2
  done
  [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
for program in "${programs[@]}"; do
  cp -L "$program" "$root$program"
done
for library in "${library_paths[@]}"; do
  mkdir -p "$root$(dirname "$library")"
  cp -L "$library" "$root$library"
done
cp "$here/init" "$root/init"
chmod 0755 "$root/init"
echo "pairbd-guest" >"$root/etc/hostname"

# The modules with their dependencies, in load order, without this machine's
# /etc/modprobe.d options (-C /dev/null).
: >"$root/lib/modules/load-order"
declare -A loaded=()
for module in "${modules[@]}"; do
  while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    relative=${path#"$work/kernel/lib/modules/"}
    [ -n "${loaded[$relative]:-}" ] && continue
    loaded[$relative]=1
    case "$relative" in
      *.ko) ;;
      *) die "module $relative is compressed; teach this script to decompress it" ;;
    esac
    mkdir -p "$root/lib/modules/$(dirname "$relative")"
    cp "$path" "$root/lib/modules/$relative"
    name=$(basename "$relative" .ko)
    echo "$relative ${module_arguments[$name]:-}" >>"$root/lib/modules/load-order"
  done < <(modprobe -C /dev/null -d "$work/kernel" -S "$kernel_version" --show-depends "$module")
done

mkdir -p "$work/out"
# The kernel, uncompressed when it can be: qemu boots an ELF vmlinux directly through its
# PVH entry point, which skips the XZ decompression that takes seconds under TCG. A
# bzImage that holds no XZ stream is used as it is.
python=/usr/bin/python3
[ -x "$python" ] || python=python3
if "$python" - "$vmlinuz" "$work/out/kernel" <<'PYTHON'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit(1)
image = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
if not image.startswith(b"\x7fELF"):
    sys.exit(1)
open(sys.argv[2], "wb").write(image)
PYTHON
then
  kernel_format="vmlinux (ELF, PVH entry)"
else
  cp "$vmlinuz" "$work/out/kernel"
  kernel_format="bzImage"
fi
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
  >"$work/out/initramfs.cpio"
{
  echo "kernel-package $kernel_package $kernel_package_version"
  echo "kernel-version $kernel_version"
  echo "kernel-format $kernel_format"
  echo "busybox $(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo '?')"
  echo "nbd-client $(dpkg-query -W -f='${Version}' nbd-client 2>/dev/null || echo '?')"
  echo "xfsprogs $(dpkg-query -W -f='${Version}' xfsprogs 2>/dev/null || echo '?')"
  echo "modules $(tr '\n' ' ' <"$root/lib/modules/load-order")"
} >"$work/out/manifest.txt"

# Publish atomically, then drop older builds (nobody else builds: we hold the lock).
rm -rf "$build"
mv "$work/out" "$build"
for old in "$cache"/guest-*; do
  [ "$old" = "$build" ] || rm -rf "$old"
done
for old_deb in "$cache"/debs/*.deb; do
  [ "$old_deb" = "$deb" ] || rm -f "$old_deb"
done
log "built $build ($(du -sh "$build" | cut -f1))"
echo "$build"
