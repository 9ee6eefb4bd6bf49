#!/usr/bin/env bash
# Boots the pairbd test guest by hand, the way tests/common/guest.rs does:
#
#   kernel-glue/guest/run-guest.sh SCRIPT [ADDRESS=SOCKET]...
#
# SCRIPT becomes /guest/run.sh (kernel-glue/guest/maildir.sh is beside it as
# /guest/maildir.sh); what it writes to fd 3 is printed here. Each ADDRESS=SOCKET forwards
# the guest's connections to ADDRESS:10809 (e.g. 10.0.2.100) to the NBD server's Unix
# socket SOCKET on this host, one relay (and one server connection) per connection.
# PAIRBD_GUEST_FILES="HOST_PATH:GUEST_PATH ..." copies more files in (e.g. a pairbd
# binary to /usr/local/bin/pairbd and a configuration to /etc/pairbd/pairbd.toml).
# The kernel console goes to guest-console.log and the relays log to guest-relay.log, in
# the current directory. PAIRBD_GUEST_CPUS (2) and PAIRBD_GUEST_MEMORY_MIB (512) size it.
#
# Example, against `pairbd serve --listen unix:/tmp/nbd.sock --export mail ...`:
#   printf 'nbd-client 10.0.2.100 10809 /dev/nbd0 -N mail -b 4096 -C 2 >&3 2>&3\n' >/tmp/t.sh
#   kernel-glue/guest/run-guest.sh /tmp/t.sh 10.0.2.100=/tmp/nbd.sock
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] || {
  sed -n '2,18p' "$0"
  exit 2
}
script=$1
shift
build=$("$here/build-initramfs.sh" | tail -n 1)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/guest"
cp "$script" "$work/root/guest/run.sh"
cp "$here/maildir.sh" "$work/root/guest/maildir.sh"
for pair in ${PAIRBD_GUEST_FILES:-}; do
  mkdir -p "$work/root$(dirname "${pair#*:}")"
  cp "${pair%%:*}" "$work/root${pair#*:}"
done
(cd "$work/root" && find . -mindepth 1 | cpio -o -H newc -R 0:0 --quiet) >"$work/run.cpio"
cat "$build/initramfs.cpio" "$work/run.cpio" >"$work/initrd.cpio"

python=/usr/bin/python3
[ -x "$python" ] || python=python3
netdev="user,id=n0,restrict=on,ipv6=off"
for forward in "$@"; do
  address=${forward%%=*}
  socket=$(realpath "${forward#*=}")
  netdev+=",guestfwd=tcp:$address:10809-cmd:$python -I -S $here/relay.py $socket $PWD/guest-relay.log"
done

qemu-system-x86_64 -accel tcg -cpu max -nodefaults -no-user-config -display none -no-reboot \
  -smp "${PAIRBD_GUEST_CPUS:-2}" -m "${PAIRBD_GUEST_MEMORY_MIB:-512}" \
  -kernel "$build/kernel" -initrd "$work/initrd.cpio" -append "console=ttyS0 panic=-1" \
  -serial "file:$PWD/guest-console.log" -serial stdio \
  -netdev "$netdev" -device virtio-net-pci,netdev=n0 </dev/null | tr -d '\r'
