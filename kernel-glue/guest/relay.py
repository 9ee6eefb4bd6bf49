#!/usr/bin/env python3
"""One guest TCP connection relayed to a Unix socket on the host (the pairbd NBD socket).

qemu's user-mode network starts this once per guest connection to a forwarded address:

    -netdev user,...,guestfwd=tcp:10.0.2.100:10809-cmd:python3 relay.py SOCKET LOG

with the guest connection as stdin, stdout AND stderr (one socket). So this program writes
nothing but relayed bytes to them: stderr is pointed at LOG before anything else happens,
and everything it has to say goes to LOG, one line per event, each starting with its pid.

It connects a fresh Unix stream to SOCKET, copies both directions until both have ended
(a half-close is passed on as a half-close), and exits. A connection that cannot be made
(the daemon is dead) closes the guest's connection at once, which the guest sees as a
refused or reset connection.

On the way it reads the NBD requests the guest sends (the client's half of the fixed
newstyle handshake, then 28-byte request headers and write payloads) and logs, when the
connection ends, how many requests of each type it saw and how many carried FUA:
    PID TIME stats {"socket": ..., "requests": {"WRITE": n, "TRIM": n, ...}, "fua": n, ...}
It never changes a byte.
"""

import json
import os
import socket
import struct
import sys
import threading
import time

REQUEST_MAGIC = 0x25609513
OPTION_MAGIC = b"IHAVEOPT"
COMMANDS = {0: "READ", 1: "WRITE", 2: "DISC", 3: "FLUSH", 4: "TRIM", 5: "CACHE",
            6: "WRITE_ZEROES", 7: "BLOCK_STATUS", 8: "RESIZE"}
FLAG_FUA = 1
CHUNK = 1 << 16


class RequestCounter:
    """Parses the client-to-server half of an NBD connection, incrementally."""

    def __init__(self):
        self.buffer = bytearray()
        self.state = "flags"  # then "options" (handshake) and "requests"
        self.skip = 0  # payload bytes of a WRITE still to pass over
        self.requests = {}
        self.fua = 0
        self.options = 0
        self.lost = None  # why parsing stopped, if it did

    def feed(self, data):
        if self.lost:
            return
        self.buffer += data
        while True:
            if self.skip:
                taken = min(self.skip, len(self.buffer))
                del self.buffer[:taken]
                self.skip -= taken
                if self.skip:
                    return
            if not self.parse_one():
                return

    def parse_one(self):
        """Consumes one handshake option or request header; False when more bytes are needed."""
        buffer = self.buffer
        if self.state == "flags":
            if len(buffer) < 4:
                return False
            del buffer[:4]
            self.state = "options"
            return True
        if len(buffer) < 4:
            return False
        if struct.unpack(">I", buffer[:4])[0] == REQUEST_MAGIC:
            self.state = "requests"
            if len(buffer) < 28:
                return False
            _, flags, kind, _, _, length = struct.unpack(">IHHQQI", buffer[:28])
            del buffer[:28]
            name = COMMANDS.get(kind, "TYPE%d" % kind)
            self.requests[name] = self.requests.get(name, 0) + 1
            if flags & FLAG_FUA:
                self.fua += 1
            if kind == 1:
                self.skip = length
            return True
        if self.state == "options":
            if len(buffer) < 16:
                return False
            if bytes(buffer[:8]) != OPTION_MAGIC:
                self.lost = "unexpected bytes in the handshake"
                return False
            length = struct.unpack(">I", buffer[12:16])[0]
            if len(buffer) < 16 + length:
                return False
            del buffer[:16 + length]
            self.options += 1
            return True
        self.lost = "bad request magic"
        return False


def main():
    if len(sys.argv) != 3:
        os._exit(2)
    socket_path, log_path = sys.argv[1], sys.argv[2]
    log_file = open(log_path, "a", buffering=1)
    # Anything Python itself would print (a traceback) must not reach the guest's stream.
    os.dup2(log_file.fileno(), 2)
    pid = os.getpid()

    def log(text):
        log_file.write("%d %.3f %s\n" % (pid, time.time(), text))

    guest = socket.socket(fileno=os.dup(0))
    for fd in (0, 1):
        os.close(fd)
    os.open(os.devnull, os.O_RDONLY)  # fd 0
    os.open(os.devnull, os.O_WRONLY)  # fd 1
    log("start socket=%s" % socket_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.connect(socket_path)
    except OSError as error:
        log("connect failed: %s" % error)
        guest.close()
        log("exit")
        os._exit(0)
    log("connected")
    counter = RequestCounter()
    totals = {"to_server": 0, "to_guest": 0}
    ended = {}
    finished = threading.Event()
    lock = threading.Lock()

    def copy(source, target, direction, inspect):
        reason = "eof"
        try:
            while True:
                data = source.recv(CHUNK)
                if not data:
                    break
                if inspect:
                    counter.feed(data)
                target.sendall(data)
                totals[direction] += len(data)
        except OSError as error:
            reason = "error: %s" % error
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with lock:
            ended[direction] = reason
            # Both directions normally end; if one ends with an error, the other may
            # never see its end (a peer that vanished), so an error ends the connection.
            if len(ended) == 2 or reason != "eof":
                finished.set()

    for args in ((guest, server, "to_server", True), (server, guest, "to_guest", False)):
        threading.Thread(target=copy, args=args, daemon=True).start()
    finished.wait()
    stats = {"socket": socket_path, "requests": counter.requests, "fua": counter.fua,
             "options": counter.options, "bytes": totals, "ended": ended}
    if counter.lost:
        stats["parse"] = counter.lost
    log("stats " + json.dumps(stats, sort_keys=True))
    log("exit")
    os._exit(0)


if __name__ == "__main__":
    main()
