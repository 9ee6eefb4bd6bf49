# Shell functions for the guest scripts of tests/kernel_guest.rs (busybox sh, sourced by
# /guest/run.sh). Results go to fd 3, the second serial port, which the host reads line
# by line; everything else goes to the kernel console or nowhere.
#
# A message's content depends only on its number, so the host can recompute the checksum
# of any message it finds, acknowledged or not: NAME is "N.msg", its length
# message_length N, its body the line "pairbd drill message NAME: ..." repeated and cut
# at that length (tests/common/guest.rs mirrors both).

say() { echo "$*" >&3; }
fail() {
  say "FAIL $*"
  exit 1
}

message_length() { echo $((600 + ($1 * 7919) % 6000)); }

message_body() { yes "pairbd drill message $1: the quick brown fox jumps over the lazy dog" | head -c "$2"; }

# maildir_create DIR: tmp/, new/ and cur/, durable (fsync of each new directory's parent).
maildir_create() {
  mkdir -p "$1/tmp" "$1/new" "$1/cur" || fail "mkdir $1"
  sync "$1" "$1/.." || fail "fsync $1"
}

# deliver DIR N: one delivery as a careful MTA makes it:
#  1. write the message to DIR/tmp/NAME and fsync(2) it: dd conv=fsync calls fsync on the
#     file descriptor it wrote through, before closing it;
#  2. rename(2) it to DIR/new/NAME;
#  3. fsync(2) the directory DIR/new (busybox `sync FILE` opens FILE read-only and calls
#     fsync on it), which makes the rename durable;
#  4. only then acknowledge: "ACK NAME MD5" (the SMTP "250 OK").
# "STEP NAME write|rename|dirsync" before each step lets the host cut the power during it.
deliver() {
  name="$2.msg"
  say "STEP $name write"
  message_body "$name" "$(message_length "$2")" |
    dd of="$1/tmp/$name" bs=4096 conv=fsync 2>/dev/null || fail "write $1/tmp/$name"
  say "STEP $name rename"
  mv "$1/tmp/$name" "$1/new/$name" || fail "rename $name"
  say "STEP $name dirsync"
  sync "$1/new" || fail "fsync $1/new"
  sum=$(md5sum <"$1/new/$name") || fail "read $name"
  say "ACK $name ${sum%% *}"
}

# deliver_range DIR FIRST LAST
deliver_range() {
  for n in $(seq "$2" "$3"); do
    deliver "$1" "$n"
  done
}

# maildir_report DIR: "HAVE NAME MD5" for every message in new/, "TMP NAME MD5" for every
# file in tmp/, then "COUNT new=N tmp=M".
maildir_report() {
  (cd "$1/new" && ls | xargs -r md5sum) | sed 's/^\([0-9a-f]*\)  \(.*\)$/HAVE \2 \1/' >&3 ||
    fail "md5sum $1/new"
  (cd "$1/tmp" && ls | xargs -r md5sum) | sed 's/^\([0-9a-f]*\)  \(.*\)$/TMP \2 \1/' >&3 ||
    fail "md5sum $1/tmp"
  say "COUNT new=$(ls "$1/new" | wc -l) tmp=$(ls "$1/tmp" | wc -l)"
}

# repair_check DEVICE: xfs_repair -n on the unmounted filesystem: "REPAIR RC", and its
# output when it found something.
repair_check() {
  xfs_repair -n "$1" >/tmp/repair.log 2>&1
  rc=$?
  say "REPAIR $rc"
  [ "$rc" = 0 ] || sed 's/^/REPAIR-LOG /' /tmp/repair.log >&3
}

# recovery_count: how many times XFS replayed its log since boot.
recovery_count() { dmesg | grep -c "Ending recovery"; }
