#!/bin/bash
# bench/probe.sh — one fio job against one NBD server, for looking into where a
# request's time goes (not a benchmark: no rounds, no ratios; compare.py is).
#
#   bash bench/probe.sh TARGET JOB [SERVE-ARG]...
#
# TARGET  pairbd (pairbd serve; SERVE-ARGs are added, e.g. --engine-reads),
#         qemu-nbd (--cache=none --aio=native) or nbdkit (file plugin).
# JOB     a job of bench/jobs/nbd (a file, or one of its names without .fio), or
#         one of these variants of the Maildir mix (c):
#           read-qd1   4 KiB random reads, queue depth 1
#           read-qd8   4 KiB random reads, queue depth 8
#           mix-noflush  job c without its FLUSHes
#
# Environment:
#   PROBE_DIR      work directory, not tmpfs (default /var/tmp/pairbd-probe); the
#                  2 GiB backing file TARGET.img is filled with random bytes once
#                  and kept, so runs against one target see the same file
#   PROBE_RUNTIME  seconds measured (default 5; 1 s of ramp before)
#   PROBE_BLOCK=1  also trace the block layer for 2 s mid-run (perf, root) and
#                  print the reads' latency from block_bio_queue and from
#                  block_rq_issue to block_rq_complete
#   PAIRBD         the pairbd binary (default target/release/pairbd)
#
# Prints IOPS and clat p50/p99 (µs) per direction, FLUSHes issued, and for pairbd
# the flushes and fdatasyncs from its stop line. Needs root (drops the page cache),
# fio, nbdinfo, and the target's server.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
target=${1:?usage: bench/probe.sh TARGET JOB [SERVE-ARG]...}
job=${2:?usage: bench/probe.sh TARGET JOB [SERVE-ARG]...}
shift 2
dir=${PROBE_DIR:-/var/tmp/pairbd-probe}
runtime=${PROBE_RUNTIME:-5}
pairbd=${PAIRBD:-$here/../target/release/pairbd}
mkdir -p "$dir"

mix=$here/jobs/nbd/maildir-mix.fio
jobfile=$dir/job.fio
case $job in
    read-qd1) sed -e 's/^rw=randrw/rw=randread/' -e '/^fsync=/d' -e '/^rwmixwrite=/d' \
                  -e 's/^iodepth=8/iodepth=1/' "$mix" > "$jobfile" ;;
    read-qd8) sed -e 's/^rw=randrw/rw=randread/' -e '/^fsync=/d' -e '/^rwmixwrite=/d' \
                  "$mix" > "$jobfile" ;;
    mix-noflush) sed -e '/^fsync=/d' "$mix" > "$jobfile" ;;
    *.fio) cp "$job" "$jobfile" ;;
    *) cp "$here/jobs/nbd/$job.fio" "$jobfile" ;;
esac

image=$dir/$target.img
sock=$dir/$target.sock
log=$dir/$target.log
if [ ! -f "$image" ]; then
    dd if=/dev/urandom of="$image" bs=1M count=2048 status=none
fi
rm -f "$sock"
case $target in
    pairbd) "$pairbd" serve --backing "$image" --listen "unix:$sock" --export bench "$@" \
                > "$log" 2>&1 & ;;
    qemu-nbd) qemu-nbd -f raw --cache=none --aio=native --shared=8 -t -x bench -k "$sock" \
                  "$image" > "$log" 2>&1 & ;;
    nbdkit) nbdkit -f -U "$sock" -e bench file "$image" > "$log" 2>&1 & ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
esac
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
uri="nbd+unix:///bench?socket=$sock"
for _ in $(seq 200); do
    nbdinfo "$uri" > /dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
done
sync
echo 3 > /proc/sys/vm/drop_caches

out=$dir/fio.json
NBD_URI=$uri BENCH_RUNTIME=$runtime BENCH_RAMP=1 fio --output-format=json "$jobfile" > "$out" &
fio_pid=$!
if [ "${PROBE_BLOCK:-0}" = 1 ]; then
    sleep 2
    perf record -a -e block:block_bio_queue,block:block_rq_issue,block:block_rq_complete \
        -o "$dir/block.data" -- sleep 2 > /dev/null 2>&1
fi
wait "$fio_pid"
kill -TERM "$server"
wait "$server" || true
trap - EXIT

python3 - "$out" "$log" "$target" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
for d in ("read", "write"):
    x = job[d]
    if x["io_bytes"]:
        p = x["clat_ns"]["percentile"]
        print(f"{d:5} {x['iops']:9.0f} IOPS  clat p50 {p['50.000000'] / 1000:6.0f} µs"
              f"  p99 {p['99.000000'] / 1000:6.0f} µs")
if job["sync"].get("total_ios"):
    print(f"FLUSH {job['sync']['total_ios']} issued")
if sys.argv[3] == "pairbd":
    m = re.search(r"stopped flushes=(\d+) fdatasyncs=(\d+)", open(sys.argv[2]).read())
    if m:
        print(f"pairbd: {m.group(1)} flushes served by {m.group(2)} fdatasyncs")
EOF

if [ "${PROBE_BLOCK:-0}" = 1 ]; then
    perf script -i "$dir/block.data" 2> /dev/null | python3 -c '
import re, sys
queued, issued, lat = {}, {}, {"bio_queue": [], "rq_issue": []}
pat = re.compile(r" (\d+\.\d+):\s+block:block_(bio_queue|rq_issue|rq_complete): "
                 r"\d+,\d+ (\S+) .*?(\d+) \+ \d+")
for line in sys.stdin:
    m = pat.search(line)
    if not m or not m.group(3).startswith("R"):
        continue
    ts, event, sector = float(m.group(1)), m.group(2), m.group(4)
    if event == "bio_queue":
        queued[sector] = ts
    elif event == "rq_issue":
        issued[sector] = ts
    else:
        for name, table in (("bio_queue", queued), ("rq_issue", issued)):
            if sector in table:
                lat[name].append((ts - table.pop(sector)) * 1e6)
for name, v in lat.items():
    if v:
        v.sort()
        print(f"block reads from {name} to complete: n {len(v)}, p50 {v[len(v) // 2]:.0f} µs,"
              f" p90 {v[len(v) * 9 // 10]:.0f} µs")
'
fi
