#!/usr/bin/python3
"""An independent NBD client for tests/chaos.rs, on python3-libnbd.

Writes numbered 4 KiB blocks in [FIRST, FIRST+COUNT), one at a time, with a
flush after every 8 writes, against whichever node the file PRIMARY names
(re-read on every reconnect), until the file STOP exists. Every operation is
logged as a JSON line to LOG: {"op": "write", "block", "value", "invoke",
"complete", "ok"} with CLOCK_MONOTONIC times; an operation whose connection
broke before its reply is logged with "ok": null (indeterminate).

Usage: chaos_client.py PRIMARY STOP LOG FIRST COUNT SEED
"""

import json
import os
import random
import sys
import time

import nbd

BLOCK = 4096


def block_bytes(block, value):
    head = block.to_bytes(8, "little") + value.to_bytes(8, "little")
    return head + bytes([value % 251 + 1]) * (BLOCK - 16)


def main():
    primary_file, stop_file, log_path, first, count, seed = sys.argv[1:7]
    first, count = int(first), int(count)
    rng = random.Random(int(seed))
    value = 1_000_000_000  # distinct from the Rust client's values
    with open(log_path, "a", buffering=1) as log:
        while not os.path.exists(stop_file):
            with open(primary_file) as f:
                socket = f.read().strip()
            h = nbd.NBD()
            try:
                h.connect_uri(f"nbd+unix:///mail?socket={socket}")
            except nbd.Error:
                time.sleep(0.05)  # the primary is changing; try again
                continue
            n = 0
            try:
                while not os.path.exists(stop_file):
                    block = first + rng.randrange(count)
                    value += 1
                    rec = {"op": "write", "block": block, "value": value,
                           "invoke": time.monotonic()}
                    try:
                        h.pwrite(block_bytes(block, value), block * BLOCK)
                        rec["ok"] = True
                    except nbd.Error as e:
                        # No success reply: the write may or may not have
                        # landed (indeterminate), whatever the error says.
                        rec["ok"] = None
                        rec["complete"] = time.monotonic()
                        log.write(json.dumps(rec) + "\n")
                        raise
                    rec["complete"] = time.monotonic()
                    log.write(json.dumps(rec) + "\n")
                    n += 1
                    if n % 8 == 0:
                        h.flush()
            except nbd.Error:
                pass
            finally:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
                del h


if __name__ == "__main__":
    main()
