#!/usr/bin/env python3
"""One Maildir deliverer of the delivery benchmark (see bench/README.md).

compare.py mounts XFS on the target's export (nbdfuse + loop), creates the
mailboxes, and starts N of these processes with the same start time. Each one
delivers messages the way an MTA's local delivery agent does (maildir(5)):

    open tmp/NAME (O_CREAT|O_EXCL) -> write the message -> fsync -> close
    -> rename tmp/NAME to new/NAME -> fsync the new/ directory

and counts a delivery as acknowledged when the directory fsync returned. Only
deliveries that start after the ramp and end before the end of the measured
window count; the window is [start + ramp, start + ramp + runtime] on
CLOCK_MONOTONIC, which all processes share. Results (one JSON object) go to
--out. Python 3 standard library only.

Message sizes are log-uniform between 4 KiB and 64 KiB (median 16 KiB, mean
about 21.6 KiB): mail is mostly small, with a tail of larger messages
(attachments beyond 64 KiB are rarer and dominated by bandwidth, which job d
measures). Each delivery goes to one of --mailboxes mailboxes, drawn at
random, as deliveries to many users do. The content is random bytes (XFS does
not compress, so only the size matters). The random choices come from
--seed, so every target receives the same sequence of sizes and mailboxes.
"""

import argparse
import json
import os
import random
import sys
import time

SIZE_MIN_BYTES = 4 << 10
SIZE_MAX_BYTES = 64 << 10


def message_size(rng):
    """Log-uniform in [SIZE_MIN_BYTES, SIZE_MAX_BYTES]."""
    ratio = SIZE_MAX_BYTES / SIZE_MIN_BYTES
    return int(SIZE_MIN_BYTES * ratio ** rng.random())


def mailbox_dirs(root, index):
    box = os.path.join(root, f"user{index:03d}")
    return {d: os.path.join(box, d) for d in ("tmp", "new", "cur")}


def make_mailboxes(root, count):
    for i in range(count):
        for path in mailbox_dirs(root, i).values():
            os.makedirs(path, exist_ok=True)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def deliver(args):
    rng = random.Random(args.seed)
    payload = os.urandom(SIZE_MAX_BYTES)
    boxes = [mailbox_dirs(args.root, i) for i in range(args.mailboxes)]
    new_fds = [os.open(b["new"], os.O_RDONLY | os.O_DIRECTORY) for b in boxes]
    measure_from = args.start + args.ramp
    measure_until = measure_from + args.runtime
    host = f"bench{args.index}"
    latencies_us, count, nbytes, seq = [], 0, 0, 0
    delay = args.start - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    try:
        while True:
            began = time.monotonic()
            if began >= measure_until:
                break
            size = message_size(rng)
            box = rng.randrange(args.mailboxes)
            seq += 1
            name = f"{int(time.time())}.M{seq}P{os.getpid()}.{host}"
            tmp_path = os.path.join(boxes[box]["tmp"], name)
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_all(fd, payload[:size])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_path, os.path.join(boxes[box]["new"], name))
            os.fsync(new_fds[box])
            done = time.monotonic()
            if began >= measure_from and done <= measure_until:
                latencies_us.append(round((done - began) * 1e6, 1))
                count += 1
                nbytes += size
    finally:
        for fd in new_fds:
            os.close(fd)
    result = {"index": args.index, "deliveries": count, "bytes": nbytes,
              "attempted": seq, "latencies_us": latencies_us}
    tmp = args.out + ".part"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.rename(tmp, args.out)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="directory holding the mailboxes")
    p.add_argument("--mailboxes", type=int, required=True)
    p.add_argument("--index", type=int, required=True, help="this deliverer's number")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--start", type=float, required=True,
                   help="CLOCK_MONOTONIC time at which to start delivering")
    p.add_argument("--ramp", type=float, required=True, help="seconds not measured")
    p.add_argument("--runtime", type=float, required=True, help="seconds measured")
    p.add_argument("--out", required=True, help="where to write the JSON result")
    return p.parse_args(argv)


if __name__ == "__main__":
    deliver(parse_args(sys.argv[1:]))
