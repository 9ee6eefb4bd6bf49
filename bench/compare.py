#!/usr/bin/env python3
"""Compare pairbd with unreplicated NBD servers and the raw disk, using fio.

Runs the Maildir-shaped fio jobs in bench/jobs/ against every selected target,
alternating the targets within each round, and reports medians over rounds and
the ratio of pairbd to each peer. Python 3 standard library only.

    python3 bench/compare.py --rounds 5 --runtime 10

See bench/README.md for what each job models and how to read the output.
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import maildir  # bench/maildir.py: the deliverer

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
JOBS_DIR = os.path.join(BENCH_DIR, "jobs")
DEFAULT_PAIRBD = os.path.join(REPO_DIR, "target", "release", "pairbd")
EXPORT = "bench"
MIB = 1 << 20


class BenchError(Exception):
    """A failure that stops the benchmark with a clear message."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Jobs: one fio file per engine flavour in bench/jobs/<flavour>/<name>.fio.
# `dirs` are the directions reported for the job (mixed jobs: both, separately).
# --------------------------------------------------------------------------

class Job:
    def __init__(self, letter, name, title, dirs, flush, kind="fio"):
        self.letter, self.name, self.title = letter, name, title
        self.dirs, self.flush, self.kind = dirs, flush, kind

    def file(self, flavour):
        return os.path.join(JOBS_DIR, flavour, self.name + ".fio")


JOBS = [
    Job("a", "randwrite-4k-qd1-fsync1",
        "4 KiB random writes, iodepth 1, FLUSH after every write", ("write",), True),
    Job("b", "randwrite-4k-qd32-fsync32",
        "4 KiB random writes, iodepth 32, FLUSH every 32 writes (nominal: see FLUSH/write)", ("write",), True),
    Job("c", "maildir-mix",
        "Maildir mix: 70 % writes 4/8/16/32 KiB (35/25/20/20 %), 30 % reads 4 KiB, "
        "FLUSH every 2 writes (nominal: see FLUSH/write), iodepth 8; reads and writes reported separately",
        ("write", "read"), True),
    Job("d", "seqwrite-1m-qd4",
        "1 MiB sequential writes, iodepth 4, no FLUSH", ("write",), False),
    Job("e", "randread-4k-qd32",
        "4 KiB random reads, iodepth 32, cold cache", ("read",), False),
    Job("f", "hol-4k-beside-1m",
        "Head of line: 4 KiB random writes, iodepth 1, no FLUSH, alone (the rows below), then "
        "while 1 MiB sequential writes at iodepth 4 run on another connection (see \"Head of "
        "line\")",
        ("write",), False),
    Job("m", "maildir",
        "Maildir deliveries on XFS (nbdfuse + loop on the export): N deliverers each write a "
        "message (4–64 KiB, log-uniform) to tmp/, fsync, rename into new/, fsync new/; "
        "IOPS = messages per second, latency = one whole delivery", ("deliver",), False,
        kind="maildir"),
]


# --------------------------------------------------------------------------
# Process helpers. Every child gets its own process group (so a whole server
# tree can be stopped) and PR_SET_PDEATHSIG=SIGKILL (so nothing outlives the
# driver even if it is SIGKILLed itself).
# --------------------------------------------------------------------------

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux/glibc: no death signal
    _prctl = None
PR_SET_PDEATHSIG = 1


def _child_setup():
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(argv, stdout, stderr=subprocess.STDOUT, env=None):
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            env=env, start_new_session=True, preexec_fn=_child_setup)


def exited(proc):
    """True once the process has exited; does NOT reap it, so its pid (and
    process group id) cannot be reused while we may still signal the group."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def exit_description(proc):
    """'exit N' / 'killed by signal N' for an exited, possibly unreaped child."""
    try:
        r = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        r = None
    if r is None:
        return f"exit {proc.returncode}" if proc.returncode is not None else "running"
    if r.si_code == os.CLD_EXITED:
        return f"exit {r.si_status}"
    return f"killed by signal {r.si_status}"


def stop_group(proc, grace=5.0):
    """SIGTERM the child's process group, SIGKILL whatever is left after
    `grace` seconds, then reap the leader. Idempotent."""
    if proc is None or proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while not exited(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:  # the unreaped leader pins the group id: this only hits our processes
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def read_status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def tool_version(argv):
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=5)
        out = (r.stdout or r.stderr).strip().splitlines()
        first = out[0] if out else "no output"
        return first if r.returncode == 0 else f"(`--version` failed: exit {r.returncode}: {first})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(unavailable: {e})"


def fs_type(path):
    for argv in (["findmnt", "-n", "-o", "FSTYPE", "-T", path], ["stat", "-f", "-c", "%T", path]):
        try:
            r = subprocess.run(argv, capture_output=True, text=True)
        except OSError:
            continue
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    return "unknown"


def drop_caches():
    """Flush dirty pages and drop the page cache (best effort; needs root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    return int(float(num) * units[unit])


# --------------------------------------------------------------------------
# Targets. A target owns one backing file; start() returns the environment
# fio needs (NBD_URI for the nbd job flavour, BENCH_FILE for raw); stop()
# returns stats (peak memory). To add a target, subclass and list it in TARGETS.
# --------------------------------------------------------------------------

class Target:
    name = "?"
    skip_jobs = ()           # job letters this target does not run
    flavour = "nbd"          # which job directory: bench/jobs/<flavour>/
    description = ""

    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.backing = os.path.join(workdir, f"{self.name}.img")

    def preflight(self):
        """Check (and build) what the target needs; return {tool: version}."""
        return {}

    def backings(self):
        """The backing files this target needs: copies of the pre-filled file."""
        return [self.backing]

    def prepare(self, logdir):
        """Once per driver run, after the backing files exist (e.g. a pair's
        initial sync). Not measured."""

    def processes(self):
        """[(label, pid)] of the running server processes: their CPU time and
        peak memory are measured around each run."""
        return []

    def start(self, run_tag, logdir):
        raise NotImplementedError

    def stop(self):
        return {}

    def describe(self):
        return self.description

    def cleanup(self):
        """Remove whatever the target made besides its backing file."""


class RawTarget(Target):
    name = "raw"
    flavour = "raw"
    description = "fio io_uring engine, direct=1, on the backing file (no server)"

    def start(self, run_tag, logdir):
        return {"BENCH_FILE": self.backing}


class NbdServerTarget(Target):
    """A target served by one or more server processes over a Unix socket.
    Subclasses implement commands(); a replicated pair can spawn two daemons
    (secondary first) and return the primary's socket from uri()."""

    ready_marker = None      # a line containing this on stdout means "listening"

    def __init__(self, args, workdir):
        super().__init__(args, workdir)
        self.sock = os.path.join(workdir, f"{self.name}.sock")
        self.procs = []      # (label, Popen, logfile)

    def uri(self):
        return f"nbd+unix:///{EXPORT}?socket={self.sock}"

    def processes(self):
        return [(label, p.pid) for label, p, _ in self.procs if not exited(p)]

    def commands(self):
        """[(label, argv)] to start, in order. The last one serves self.sock."""
        raise NotImplementedError

    def start(self, run_tag, logdir):
        self._unlink_sock()
        for label, argv in self.commands():
            logpath = os.path.join(logdir, f"{run_tag}.{label}.log")
            logf = open(logpath, "wb")
            self.procs.append((label, spawn(argv, stdout=logf), logpath))
            logf.close()
        self.wait_ready()
        return {"NBD_URI": self.uri()}

    def wait_ready(self):
        label, proc, logpath = self.procs[-1]
        deadline = time.monotonic() + self.args.start_timeout
        tries = 0
        while True:
            for lbl, p, lp in self.procs:
                if exited(p):
                    raise BenchError(f"{self.name}: '{lbl}' exited during start-up "
                                     f"({exit_description(p)}; see {lp}):\n{tail(lp)}")
            marker_seen = self.ready_marker is None or self.ready_marker in _read(logpath)
            if marker_seen and os.path.exists(self.sock):
                tries += 1
                try:
                    r = subprocess.run(["nbdinfo", "--size", self.uri()], capture_output=True,
                                       text=True, timeout=5)
                    if r.returncode == 0:
                        size = int(r.stdout.strip())
                        if size != self.args.size_bytes:
                            raise BenchError(f"{self.name}: export size {size} != "
                                             f"backing size {self.args.size_bytes}")
                        return
                except subprocess.TimeoutExpired:
                    pass
            if time.monotonic() > deadline:
                why = (f"no line containing {self.ready_marker!r} on its stdout"
                       if not marker_seen else
                       f"nbdinfo never succeeded against {self.uri()} ({tries} tries)")
                raise BenchError(f"{self.name}: not ready after {self.args.start_timeout}s: "
                                 f"{why} (see {logpath}):\n{tail(logpath)}")
            time.sleep(0.1)

    def stop(self):
        stats = {}
        # Stop in reverse order (a primary before its secondary). Peak memory
        # is read just before stopping each process.
        for label, proc, _ in reversed(self.procs):
            if proc.returncode is None and not exited(proc):
                hwm = read_status_kib(proc.pid, "VmHWM")
                if hwm is not None:
                    stats[f"{label}_vmhwm_kib"] = hwm
            stop_group(proc)
            stats[f"{label}_exit"] = proc.returncode
        self.procs = []
        self._unlink_sock()
        return stats

    def _unlink_sock(self):
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass


class PairbdTarget(NbdServerTarget):
    name = "pairbd"
    description = "pairbd serve (single node, unreplicated)"
    ready_marker = "ready"

    def preflight(self):
        path = self.args.pairbd
        if not os.path.exists(path):
            if os.path.abspath(path) != DEFAULT_PAIRBD:
                raise BenchError(f"pairbd: binary {path} does not exist (--pairbd)")
            if shutil.which("cargo") is None:
                raise BenchError(f"pairbd: {path} is missing and cargo is not on PATH")
            log(f"pairbd: {path} missing, running `cargo build --release` in {REPO_DIR}")
            r = subprocess.run(["cargo", "build", "--release", "--bin", "pairbd"],
                               cwd=REPO_DIR, stdout=sys.stderr, stderr=sys.stderr)
            if r.returncode != 0 or not os.path.exists(path):
                raise BenchError(f"pairbd: `cargo build --release` failed (exit "
                                 f"{r.returncode}); {path} is missing")
        if not os.access(path, os.X_OK):
            raise BenchError(f"pairbd: {path} is not executable")
        return {"pairbd": f"{tool_version([path, '--version'])} ({path})"}

    def commands(self):
        return [("pairbd", [self.args.pairbd, "serve", "--backing", self.backing,
                            "--listen", f"unix:{self.sock}", "--export", EXPORT,
                            *(getattr(self.args, "serve_arg", None) or [])])]


class PairbdPoolTarget(PairbdTarget):
    """The same binary with the thread-pool engine, to compare the two engines."""
    name = "pairbd-pool"
    description = "pairbd serve --engine pool (single node, unreplicated)"

    def commands(self):
        [(label, argv)] = super().commands()
        return [(label, argv + ["--engine", "pool"])]


class NbdkitTarget(NbdServerTarget):
    name = "nbdkit"
    description = "nbdkit file plugin (page cache, default threads)"

    def preflight(self):
        need(self.args.nbdkit)
        return {"nbdkit": tool_version([self.args.nbdkit, "--version"])}

    def commands(self):
        # nbdkit's file plugin serves the file under any export name; -e makes
        # `bench` the advertised/default name, so the URI form is the same.
        return [("nbdkit", [self.args.nbdkit, "--foreground", "--unix", self.sock,
                            "--exit-with-parent", "-e", EXPORT, "file", self.backing])]


class QemuNbdTarget(NbdServerTarget):
    name = "qemu-nbd"
    description = "qemu-nbd --cache=none --aio=native --shared=8 -t"

    def preflight(self):
        need(self.args.qemu_nbd)
        return {"qemu-nbd": f"{tool_version([self.args.qemu_nbd, '--version'])} "
                            f"({shutil.which(self.args.qemu_nbd) or self.args.qemu_nbd})"}

    def commands(self):
        return [("qemu-nbd", [self.args.qemu_nbd, "-f", "raw", "--cache=none", "--aio=native",
                              f"--socket={self.sock}", f"--export-name={EXPORT}",
                              "--shared=8", "-t", self.backing])]


class PairCluster:
    """The replicated pair behind the `pair` and `pair-degraded` targets: two
    `pairbd daemon`s on this machine, alpha (Primary, serving the bench socket)
    and beta (its Secondary), replicating over loopback QUIC, each with its own
    copy of the pre-filled file. Made once per driver run (certificates,
    configuration, metadata, one full initial sync); each run then starts both
    daemons, waits for Connected, no sync running, both UpToDate, and alpha
    Primary, and stops them with SIGTERM (a clean stop, which needs no resync).
    Every start records what it had to resync first (the status counters), so
    a restart that is not as cheap as expected shows up in the report."""

    def __init__(self, args, workdir):
        self.args = args
        self.dir = os.path.join(workdir, "pair.d")
        self.config = os.path.join(self.dir, "pairbd.toml")
        self.sock = os.path.join(workdir, "pair.sock")
        self.images = {"alpha": os.path.join(workdir, "pair-alpha.img"),
                       "beta": os.path.join(workdir, "pair-beta.img")}
        self.prepared = False
        self.initial_sync = None    # {"seconds", "bytes"} of the first full sync

    def cli(self, node, *argv, check=True, timeout=30):
        try:
            r = subprocess.run([self.args.pairbd, "--config", self.config, "--node", node, *argv],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"pair: `pairbd {' '.join(argv)}` on {node} did not answer in "
                             f"{timeout}s")
        if check and r.returncode != 0:
            raise BenchError(f"pair: `pairbd {' '.join(argv)}` on {node} failed: "
                             f"{r.stderr.strip() or r.stdout.strip()}")
        return r

    def status(self, node):
        """`pairbd status --json` of a node, or None while its control socket
        does not answer."""
        r = self.cli(node, "status", "--json", check=False)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def counters(self, node):
        """The status counters the report uses (flushes asked of the node's
        store, fdatasyncs that served them, metadata writes), or None."""
        st = self.status(node)
        if not st or "flushes" not in st:
            return None
        return {"flushes": st["flushes"]["requested"],
                "fdatasyncs": st["flushes"]["fdatasyncs"],
                "meta_writes": st.get("meta_writes", 0)}

    def write_config(self):
        os.makedirs(self.dir, exist_ok=True)
        for node in ("alpha", "beta"):
            subprocess.run([self.args.pairbd, "gen-cert", "--node", node, "--out", self.dir],
                           check=True, capture_output=True)
        ports = []
        socks = []
        for _ in range(2):   # two free UDP ports on loopback (held until both are known)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(("127.0.0.1", 0))
            socks.append(u)
            ports.append(u.getsockname()[1])
        for u in socks:
            u.close()
        # alpha serves NBD on the bench socket; beta serves nothing (a Secondary
        # refuses clients anyway). Everything else is the daemon's defaults.
        text = (f"# written by bench/compare.py\n[resource.{EXPORT}]\n"
                f"size = {self.args.size_bytes}\n")
        for opt in getattr(self.args, "pair_option", None) or []:
            text += opt + "\n"
        listen = {"alpha": f'["unix:{self.sock}"]', "beta": "[]"}
        for i, node in enumerate(("alpha", "beta")):
            text += (f"\n[resource.{EXPORT}.node.{node}]\nid = {i + 1}\n"
                     f'backing = "{self.images[node]}"\nmeta = "{node}.meta"\n'
                     f"listen = {listen[node]}\nreplication = \"127.0.0.1:{ports[i]}\"\n"
                     f'certificate = "{node}.crt"\nkey = "{node}.key"\n'
                     f'control = "{node}.ctl"\n')
        with open(self.config, "w") as f:
            f.write(text)
        for node in ("alpha", "beta"):
            self.cli(node, "create-md", EXPORT)

    def spawn_daemons(self, tag, logdir, nodes=("beta", "alpha")):
        """Start the daemons (in this order); wait for their `ready` lines.
        Returns [(label, Popen, logpath)]."""
        procs = []
        try:
            for node in nodes:
                logpath = os.path.join(logdir, f"{tag}.{node}.log")
                with open(logpath, "wb") as logf:
                    argv = [self.args.pairbd, "--config", self.config, "--node", node, "daemon"]
                    procs.append((node, spawn(argv, stdout=logf), logpath))
            deadline = time.monotonic() + self.args.start_timeout
            while not all("ready" in _read(lp) for _, _, lp in procs):
                check_alive(procs, "pair")
                if time.monotonic() > deadline:
                    raise BenchError(f"pair: daemons not ready after {self.args.start_timeout}s "
                                     f"(see {procs[-1][2]}):\n{tail(procs[-1][2])}")
                time.sleep(0.05)
        except BaseException:
            stop_daemons(procs)
            raise
        return procs

    def bring_up(self, procs, timeout):
        """Wait until alpha is Primary, Connected, no sync running, both
        UpToDate; promote alpha on the way (with --force only from
        Inconsistent data: the first start of a new pair). Returns a record of
        what this start had to sync, from both nodes' status counters."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        seen_sync = None
        last = None
        while True:
            check_alive(procs, "pair")
            st = self.status("alpha")
            last = st or last
            if st is not None:
                if st.get("sync"):
                    seen_sync = st["sync"]
                peer = st.get("peer") or {}
                if (st["role"] == "Primary" and st["connection"] == "Connected"
                        and st["sync"] is None and st["disk"] == "UpToDate"
                        and peer.get("disk") == "UpToDate" and peer.get("role") == "Secondary"):
                    break
                if st["connection"] == "Connected" and st["role"] != "Primary" and peer:
                    force = st["disk"] == "Inconsistent" and peer.get("disk") == "Inconsistent"
                    if st["disk"] == "UpToDate" or force:
                        # Refused while the link is still in its handshake: retried.
                        self.cli("alpha", "promote", *(["--force"] if force else []), check=False)
            if time.monotonic() > deadline:
                raise BenchError(f"pair: alpha not Primary, Connected and in sync after "
                                 f"{timeout:.0f}s; last status: {json.dumps(last)}")
            time.sleep(0.1)
        beta = self.status("beta") or {}
        rec = {"seconds": round(time.monotonic() - t0, 2),
               "alpha_resynced_bytes": st["bitmap"]["resynced_bytes"],
               "beta_resynced_bytes": (beta.get("bitmap") or {}).get("resynced_bytes"),
               "sync_seen": seen_sync}
        return rec

    def prepare(self, logdir):
        """Once per driver run: configuration, metadata and the full initial
        sync (pairbd cannot know both copies start equal), then a clean stop."""
        if self.prepared:
            return
        self.write_config()
        log("pair: initial full sync of beta from alpha (once per driver run)")
        procs = self.spawn_daemons("pair-initial-sync", logdir)
        try:
            rec = self.bring_up(procs, timeout=max(self.args.start_timeout, 1800))
        finally:
            exits = stop_daemons(procs)
        bad = {k: v for k, v in exits.items() if v != 0}
        if bad:
            raise BenchError(f"pair: unclean stop after the initial sync: {bad}")
        self.initial_sync = {"seconds": rec["seconds"], "bytes": rec["alpha_resynced_bytes"]}
        rate = rec["alpha_resynced_bytes"] / MIB / max(rec["seconds"], 0.01)
        log(f"pair: initial sync: {rec['alpha_resynced_bytes'] / MIB:.0f} MiB in "
            f"{rec['seconds']:.1f}s ({rate:.0f} MiB/s, including start-up)")
        self.prepared = True

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        for path in list(self.images.values()) + [self.sock]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def check_alive(procs, name):
    for lbl, p, lp in procs:
        if exited(p):
            raise BenchError(f"{name}: '{lbl}' exited ({exit_description(p)}; see {lp}):\n"
                             f"{tail(lp)}")


def stop_daemons(procs):
    """Stop pairbd daemons in reverse start order (the Primary before its
    Secondary) with SIGTERM, as an operator would; returns {label: exit}."""
    exits = {}
    for label, proc, _ in reversed(procs):
        stop_group(proc, grace=30.0)
        exits[label] = proc.returncode
    return exits


_CLUSTERS = {}


def pair_cluster(args, workdir):
    """The one PairCluster of this work directory (both pair targets share it)."""
    key = os.path.abspath(workdir)
    if key not in _CLUSTERS:
        _CLUSTERS[key] = PairCluster(args, workdir)
    return _CLUSTERS[key]


class PairTarget(PairbdTarget):
    """The replicated pair, connected: every write is on both nodes before it
    is acknowledged."""
    name = "pair"
    description = ("pairbd daemon pair: alpha Primary serves NBD, beta Secondary, replication "
                   "over loopback QUIC (both nodes on this machine, one disk)")
    degraded = False

    def __init__(self, args, workdir):
        super().__init__(args, workdir)
        self.cluster = pair_cluster(args, workdir)
        self.sock = self.cluster.sock
        self.backing = self.cluster.images["alpha"]
        self.bring_up_record = None

    def backings(self):
        return list(self.cluster.images.values())

    def prepare(self, logdir):
        self.cluster.prepare(logdir)

    def start(self, run_tag, logdir):
        self.procs = self.cluster.spawn_daemons(run_tag, logdir)
        rec = self.cluster.bring_up(self.procs, timeout=max(self.args.start_timeout, 900))
        rec.update(run=run_tag, target=self.name)
        if self.degraded:
            # Stop the Secondary cleanly; the Primary keeps serving and marks
            # what it writes in its dirty bitmap.
            label, beta, _ = self.procs[0]
            stop_group(beta, grace=30.0)
            rec["beta_stop_exit"] = beta.returncode
            deadline = time.monotonic() + self.args.start_timeout
            while True:
                check_alive(self.procs[1:], self.name)
                st = self.cluster.status("alpha")
                if st and st["connection"] != "Connected" and st["role"] == "Primary":
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name}: alpha still sees its peer after beta "
                                     f"stopped: {json.dumps(st)}")
                time.sleep(0.05)
        self.bring_up_record = rec
        self.counters_at_start = {n: self.cluster.counters(n) for n in self.nodes_running()}
        if rec["alpha_resynced_bytes"] or rec["beta_resynced_bytes"]:
            log(f"{self.name}: this start resynced alpha->beta "
                f"{rec['alpha_resynced_bytes'] / MIB:.1f} MiB, beta->alpha "
                f"{(rec['beta_resynced_bytes'] or 0) / MIB:.1f} MiB first "
                f"({rec['seconds']:.1f}s, not measured)")
        check_export_size(self.name, self.uri(), self.args.size_bytes, self.args.start_timeout)
        return {"NBD_URI": self.uri()}

    def nodes_running(self):
        return [label for label, proc, _ in self.procs if not exited(proc)]

    def stop(self):
        stats = {}
        for label, proc, _ in self.procs:
            if not exited(proc):
                hwm = read_status_kib(proc.pid, "VmHWM")
                if hwm is not None:
                    stats[f"{label}_vmhwm_kib"] = hwm
        # What the run (ramp included) cost each node in flushes, fdatasyncs
        # and metadata writes: the status counters' growth since the start.
        for label, before in (getattr(self, "counters_at_start", None) or {}).items():
            after = self.cluster.counters(label) if label in self.nodes_running() else None
            if before and after:
                stats[f"{label}_counters"] = {k: after[k] - before[k] for k in after}
        self.counters_at_start = None
        for label, code in stop_daemons(self.procs).items():
            stats[f"{label}_exit"] = code
        if self.bring_up_record is not None:
            stats["start"] = self.bring_up_record
            self.bring_up_record = None
        unclean = {k: v for k, v in stats.items() if k.endswith("_exit") and v not in (0, None)}
        if unclean:
            log(f"WARNING: {self.name}: daemon(s) did not stop cleanly: {unclean}")
        self.procs = []
        return stats

    def cleanup(self):
        self.cluster.cleanup()


class PairDegradedTarget(PairTarget):
    """The pair's Primary with its Secondary stopped (cleanly, after both
    were in sync): what bitmap tracking costs. The next start of either pair
    target resyncs the dirty regions first, outside the measured time."""
    name = "pair-degraded"
    description = ("the pair's Primary alone: beta stopped cleanly after the pair was in sync, "
                   "alpha marks its writes in the dirty bitmap (resynced before the next run)")
    degraded = True
    # Reads are served from alpha's store whether beta runs or not, and the
    # bitmap tracks writes only: job e would measure nothing new (and costs a
    # minute of a full run).
    skip_jobs = ("e",)


def check_export_size(name, uri, size_bytes, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                               timeout=5)
            if r.returncode == 0:
                size = int(r.stdout.strip())
                if size != size_bytes:
                    raise BenchError(f"{name}: export size {size} != {size_bytes}")
                return
            why = r.stderr.strip()
        except subprocess.TimeoutExpired:
            why = "nbdinfo timed out"
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: nbdinfo never succeeded against {uri}: {why}")
        time.sleep(0.1)

TARGETS = {cls.name: cls for cls in (PairTarget, PairDegradedTarget, PairbdTarget,
                                     PairbdPoolTarget, NbdkitTarget, QemuNbdTarget, RawTarget)}
# What runs when --targets is not given (pairbd-pool is left out: engine comparisons only).
DEFAULT_TARGETS = ("pair", "pair-degraded", "pairbd", "nbdkit", "qemu-nbd", "raw")
# Unreplicated NBD servers: "vs best of" compares against the better of these.
NBD_PEERS = ("nbdkit", "qemu-nbd")


def need(tool):
    if shutil.which(tool) is None:
        raise BenchError(f"{tool} not found (apt-get install -y nbdkit qemu-utils libnbd-bin fio)")


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def tail(path, n=15):
    return "\n".join("    " + l for l in _read(path).splitlines()[-n:]) or "    (empty)"


# --------------------------------------------------------------------------
# Server CPU time and peak memory over the measured window
# --------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        fields = text[text.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


class ServerMeter:
    """Measures a target's server processes over one run: peak memory is reset
    (/proc/PID/clear_refs "5" resets VmHWM) when the load starts, so the VmHWM
    read at stop covers the run and not a resync at start-up; CPU seconds are
    sampled when the measured window opens (after the ramp) and when it ends."""

    def __init__(self, target):
        self.target = target
        self.before = None

    def reset_peak(self):
        for _, pid in self.target.processes():
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5\n")
            except OSError:
                pass

    def window_opens(self):
        self.before = {label: (pid, cpu_seconds(pid)) for label, pid in self.target.processes()}

    def window_closes(self):
        if self.before is None:
            return {}
        out = {}
        for label, (pid, before) in self.before.items():
            after = cpu_seconds(pid)
            if before is not None and after is not None:
                out[label] = round(after - before, 3)
        return out


# --------------------------------------------------------------------------
# The Maildir delivery benchmark: XFS on the export through nbdfuse and a loop
# device, N deliverer processes (bench/maildir.py)
# --------------------------------------------------------------------------

MAILDIR_JOB_NAME = "maildir"


class MaildirFs:
    """XFS on an NBD export on this host: nbdfuse exposes the export as a
    file, a loop device takes it, mkfs.xfs, mount. close() undoes whatever
    was done, in reverse, whatever happened (and with signals blocked, so a
    second Ctrl-C cannot leave a mount behind)."""

    def __init__(self, args, workdir, uri, logdir, tag):
        self.args, self.uri, self.logdir, self.tag = args, uri, logdir, tag
        self.fusedir = os.path.join(workdir, "maildir.fuse")
        self.disk = os.path.join(self.fusedir, "disk")
        self.mnt = os.path.join(workdir, "maildir.mnt")
        self.fuse_proc = None
        self.fuse_mounted = False
        self.loop = None
        self.mounted = False

    def run(self, argv, what, timeout=120):
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"maildir: {what} failed (`{shlex.join(argv)}`, exit "
                             f"{r.returncode}): {(r.stderr or r.stdout).strip()}")
        return r.stdout

    def open(self):
        os.makedirs(self.fusedir, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        pidfile = self.fusedir + ".pid"     # nbdfuse writes it once it serves
        _unlink(pidfile)
        logpath = os.path.join(self.logdir, f"{self.tag}.nbdfuse.log")
        with open(logpath, "wb") as logf:
            self.fuse_proc = spawn([self.args.nbdfuse, "-P", pidfile, self.disk, self.uri],
                                   stdout=logf)
        self.fuse_mounted = True     # from here on, close() runs fusermount3 -u
        deadline = time.monotonic() + self.args.start_timeout
        while not (os.path.exists(pidfile) and os.path.exists(self.disk)):
            if exited(self.fuse_proc):
                raise BenchError(f"maildir: nbdfuse exited ({exit_description(self.fuse_proc)}; "
                                 f"see {logpath}):\n{tail(logpath)}")
            if time.monotonic() > deadline:
                raise BenchError(f"maildir: nbdfuse not ready after {self.args.start_timeout}s")
            time.sleep(0.05)
        self.loop = self.run(["losetup", "-f", "--show", self.disk], "losetup").strip()
        # -K: no discard of the whole device first (it would send a 2 GiB TRIM
        # through FUSE that no delivery workload does; every run gets a fresh,
        # identical filesystem either way).
        self.run(["mkfs.xfs", "-q", "-f", "-K", self.loop], "mkfs.xfs")
        self.run(["mount", "-t", "xfs", self.loop, self.mnt], "mount")
        self.mounted = True
        maildir.make_mailboxes(self.mnt, self.args.maildir_mailboxes)
        os.sync()

    def close(self):
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        problems = []
        try:
            if self.mounted:
                if self._retry(["umount", self.mnt]):
                    self.mounted = False
                elif self._retry(["umount", "-l", self.mnt], tries=1):
                    self.mounted = False
                    problems.append(f"{self.mnt} was busy: lazily unmounted")
                else:
                    problems.append(f"could not unmount {self.mnt}")
            if self.loop:
                if self._retry(["losetup", "-d", self.loop]):
                    self.loop = None
                else:
                    problems.append(f"could not detach {self.loop}")
            if self.fuse_mounted:
                # nbdfuse's manual: stop it with fusermount3 -u, not with a signal.
                ok = self._retry(["fusermount3", "-u", self.fusedir])
                if self.fuse_proc is not None:
                    deadline = time.monotonic() + 10
                    while not exited(self.fuse_proc) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    stop_group(self.fuse_proc)
                if not ok:
                    self._retry(["fusermount3", "-u", "-z", self.fusedir], tries=1)
                self.fuse_mounted = False
            _unlink(self.fusedir + ".pid")
            for d in (self.mnt, self.fusedir):
                if not self.mounted or d != self.mnt:
                    try:
                        os.rmdir(d)      # refused (EBUSY/ENOTEMPTY) while still mounted
                    except OSError:
                        pass
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for p in problems:
            log(f"WARNING: maildir cleanup: {p}")

    @staticmethod
    def _retry(argv, tries=20):
        for i in range(tries):
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
            if r.returncode == 0:
                return True
            time.sleep(0.2)
        return False


def run_maildir(args, env, fs_args, outdir, tag, meter, round_no):
    """One run of the delivery benchmark against an export; returns metrics in
    the shape of parse_fio's (direction "deliver", IOPS = messages/second)."""
    fs = MaildirFs(args, *fs_args, env["NBD_URI"], outdir, tag)
    workers = []
    try:
        fs.open()
        meter.reset_peak()
        drop_caches()
        start = time.monotonic() + 0.5
        outs = []
        for i in range(args.deliverers):
            out = os.path.join(outdir, f"{tag}.w{i}.json")
            outs.append(out)
            argv = [sys.executable, os.path.join(BENCH_DIR, "maildir.py"), "--root", fs.mnt,
                    "--mailboxes", str(args.maildir_mailboxes), "--index", str(i),
                    # the same sequence of sizes and mailboxes on every target of a round
                    "--seed", str(round_no * 1000 + i), "--start", repr(start),
                    "--ramp", str(args.ramp), "--runtime", str(args.runtime), "--out", out]
            with open(os.path.join(outdir, f"{tag}.w{i}.log"), "wb") as lf:
                workers.append(spawn(argv, stdout=lf))
        opened = False
        deadline = start + args.ramp + args.runtime + 120
        while not all(exited(w) for w in workers):
            if not opened and time.monotonic() >= start + args.ramp:
                meter.window_opens()
                opened = True
            if time.monotonic() > deadline:
                raise BenchError("maildir: deliverers did not finish in time")
            time.sleep(0.02)
        if not opened:
            meter.window_opens()
        cpu = meter.window_closes()
        for i, w in enumerate(workers):
            w.wait()
            if w.returncode != 0:
                lp = os.path.join(outdir, f"{tag}.w{i}.log")
                raise BenchError(f"maildir: deliverer {i} failed (exit {w.returncode}):\n"
                                 f"{tail(lp)}")
        lat, count, nbytes = [], 0, 0
        for out in outs:
            with open(out) as f:
                r = json.load(f)
            lat.extend(r["latencies_us"])
            count += r["deliveries"]
            nbytes += r["bytes"]
            os.unlink(out)
        with open(os.path.join(outdir, tag + ".json"), "w") as f:
            json.dump({"deliveries": count, "bytes": nbytes, "latencies_us": lat}, f)
        for i in range(args.deliverers):     # deliverer logs: kept only if they say something
            lp = os.path.join(outdir, f"{tag}.w{i}.log")
            if os.path.exists(lp) and os.path.getsize(lp) == 0:
                os.unlink(lp)
    finally:
        for w in workers:
            stop_group(w)
        fs.close()
    lat.sort()

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    return {"deliver": {"iops": count / args.runtime, "mibs": nbytes / MIB / args.runtime,
                        "ios": count, "bytes": nbytes, "clat_p50_us": pct(0.50),
                        "clat_p99_us": pct(0.99)},
            "cpu": cpu}


# --------------------------------------------------------------------------
# The latency floor of job a on the pair: 2 replication round trips + 1 fdatasync
# --------------------------------------------------------------------------

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
while True:
    data, addr = s.recvfrom(65536)
    if data == b"stop":
        break
    s.sendto(data[:64], addr)
"""


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure_udp_rtt_us(samples=2000):
    """Round trips of a 4 KiB datagram answered by 64 bytes between two
    processes over loopback UDP (both block in recv, so each round trip
    includes two wake-ups, as a replicated write does). No QUIC, no TLS: the
    lower bound of one replication round trip between two processes here."""
    echo = spawn([sys.executable, "-c", UDP_ECHO], stdout=subprocess.PIPE,
                 stderr=subprocess.DEVNULL)
    try:
        port = int(echo.stdout.readline())
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        payload = os.urandom(4096)
        rtts = []
        for i in range(samples + 100):
            t = time.perf_counter()
            s.sendto(payload, ("127.0.0.1", port))
            s.recv(65536)
            if i >= 100:                       # 100 warm-up round trips
                rtts.append((time.perf_counter() - t) * 1e6)
        s.sendto(b"stop", ("127.0.0.1", port))
        s.close()
    finally:
        stop_group(echo, grace=1)
    rtts.sort()
    return {"samples": len(rtts), "p50_us": round(percentile(rtts, 0.5), 1),
            "p99_us": round(percentile(rtts, 0.99), 1)}


def measure_fdatasync_us(path, seconds=1.0, max_samples=300):
    """fdatasync after a 4 KiB buffered overwrite at a random offset of an
    existing, pre-filled file (a backing file of an unreplicated target, whose
    content nobody checks): what one pair node with direct-io off pays to
    flush one dirty page. Only the fdatasync is timed (the pwrite into the page
    cache takes microseconds)."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        rng = __import__("random").Random(1)
        buf = os.urandom(4096)
        lat = []
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(lat) < max_samples:
            os.pwrite(fd, buf, rng.randrange(size // 4096) * 4096)
            t = time.perf_counter()
            os.fdatasync(fd)
            lat.append((time.perf_counter() - t) * 1e6)
    finally:
        os.close(fd)
    lat.sort()
    return {"samples": len(lat), "p50_us": round(percentile(lat, 0.5), 1),
            "p99_us": round(percentile(lat, 0.99), 1), "file": os.path.basename(path)}


def floor_file(workdir, targets, size_bytes):
    """The file the fdatasync part is measured on: the backing file of an
    unreplicated target if one runs (pre-filled and copied like the pair's),
    else a new pre-filled 64 MiB file in the work directory."""
    for t in targets:
        if not isinstance(t, PairTarget):
            return t.backing, False
    path = os.path.join(workdir, "floor.img")
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())
    return path, True


def measure_floor(path, meta, when):
    """One sample of the floor's parts (about 1.5 s), appended to
    meta["floor"]["samples"]. Taken before every round of job a, so the disk's
    state (other work on the machine) matches the runs it is compared with."""
    rtt = measure_udp_rtt_us()
    fsync = measure_fdatasync_us(path)
    floor = meta.setdefault("floor", {"samples": []})
    floor["samples"].append({"when": when, "udp_rtt": rtt, "fdatasync": fsync})
    log(f"latency floor ({when}): UDP round trip p50 {rtt['p50_us']:.0f} µs, fdatasync p50 "
        f"{fsync['p50_us']:.0f} µs -> 2 RTT + 1 fdatasync = "
        f"{2 * rtt['p50_us'] + fsync['p50_us']:.0f} µs")


# --------------------------------------------------------------------------
# fio
# --------------------------------------------------------------------------

def run_fio(args, job, target_env, flavour, out_json, fio_log, meter):
    env = dict(os.environ, BENCH_RUNTIME=str(args.runtime), BENCH_RAMP=str(args.ramp),
               **target_env)
    argv = [args.fio, "--output-format=json", f"--output={out_json}", job.file(flavour)]
    meter.reset_peak()
    with open(fio_log, "wb") as lf:
        proc = spawn(argv, stdout=lf, env=env)
    began = time.monotonic()
    opened = False
    try:
        # Poll rather than wait: the servers' CPU time is sampled when fio's
        # ramp ends (fio's statistics start there) and when fio exits.
        while proc.poll() is None:
            now = time.monotonic()
            if not opened and now - began >= args.ramp:
                meter.window_opens()
                opened = True
            if now - began > args.runtime + args.ramp + 120:
                raise BenchError(f"fio timed out: {shlex.join(argv)}")
            time.sleep(0.02)
        if not opened:
            meter.window_opens()
        cpu = meter.window_closes()
    finally:
        stop_group(proc)
    if proc.returncode != 0:
        raise BenchError(f"fio exited {proc.returncode} ({fio_log}):\n{tail(fio_log)}")
    out = parse_fio(out_json)
    out["cpu"] = cpu
    return out


def parse_fio(path):
    text = _read(path)
    # fio's nbd engine prints "fio: connected to NBD server" on stdout; skip
    # anything before the JSON object.
    start = text.find("{")
    if start < 0:
        raise BenchError(f"no JSON in {path}")
    data = json.loads(text[start:])
    job = data["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']} in {path}")

    def pct(d, key):
        v = d.get("percentile", {}).get(key)
        return v / 1000.0 if v is not None else None

    out = {}
    for d in ("read", "write"):
        s = job[d]
        clat = s.get("clat_ns", {})
        out[d] = {"iops": s["iops"], "mibs": s["bw_bytes"] / MIB, "ios": s["total_ios"],
                  "bytes": s.get("io_bytes", 0),
                  "clat_p50_us": pct(clat, "50.000000"), "clat_p99_us": pct(clat, "99.000000")}
    # Files with several job sections (job f) also report each one's writes.
    if len(data["jobs"]) > 1:
        out["sections"] = {
            j["jobname"]: {"iops": j["write"]["iops"],
                           "clat_p50_us": pct(j["write"].get("clat_ns", {}), "50.000000"),
                           "clat_p99_us": pct(j["write"].get("clat_ns", {}), "99.000000")}
            for j in data["jobs"]}
    sync = job.get("sync", {})
    lat = sync.get("lat_ns", {})
    out["flush"] = {"ios": sync.get("total_ios", 0), "lat_p50_us": pct(lat, "50.000000"),
                    "lat_p99_us": pct(lat, "99.000000")}
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def fmt_ratio(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    m = statistics.median(values)
    if len(values) == 1:
        return f"{m:.2f}"
    return f"**{m:.2f}** ({min(values):.2f}–{max(values):.2f})"


# --------------------------------------------------------------------------
# Report: the bar of issue 8, the latency floor, resources, pair start-ups,
# the chart
# --------------------------------------------------------------------------

# Issue 8's bar: the pair's median IOPS (messages/s for maildir) over the best
# unreplicated peer's (the better of nbdkit and qemu-nbd in the same round).
BAR = {"a": 1.0, "b": 0.8, "c": 1.0, "d": 0.8, "e": 1.0, "m": 1.0}
GIB = 1 << 30


def job_value(job, metrics):
    """The one number per run the bar and the chart use: IOPS of the job's
    direction; for the mixed job c, reads + writes; messages/s for maildir."""
    return sum(metrics[d]["iops"] for d in job.dirs)


def job_bytes(job, metrics):
    """Bytes the CPU time is divided by: written, or read for a read-only job;
    None for job f, whose report covers one of its two writers."""
    if job.letter == "f":
        return None
    if "write" in job.dirs or job.kind == "maildir":
        return metrics[job.dirs[0] if job.kind == "maildir" else "write"].get("bytes", 0)
    return metrics["read"].get("bytes", 0)


class Runs:
    def __init__(self, results):
        self.by = {}
        for r in results:
            self.by.setdefault((r["job"], r["target"]), []).append(r)

    def per_round(self, job, target):
        return {r["round"]: job_value(job, r["metrics"]) for r in self.by.get((job.name, target), [])}

    def best_peer_per_round(self, job, peers):
        rounds = {}
        for p in peers:
            for k, v in self.per_round(job, p).items():
                rounds[k] = max(rounds.get(k, 0), v)
        return rounds

    def ratios(self, job, target, peers):
        mine, best = self.per_round(job, target), self.best_peer_per_round(job, peers)
        return [mine[k] / best[k] for k in mine if k in best and best[k] > 0]


def bar_section(args, results, names, jobs):
    runs = Runs(results)
    peers = [p for p in NBD_PEERS if p in names]
    L = ["## The bar (issue 8)", ""]
    if "pair" not in names or not peers:
        L += ["Not evaluated: needs the `pair` target and at least one of "
              f"{', '.join(NBD_PEERS)}.", ""]
        return L
    L.append(f"`pair` / best unreplicated peer (the better of {' and '.join(peers)} in each "
             "round), per round, then the **median** (min–max). Met when the median reaches the "
             "bar; a range that straddles the bar means this run cannot tell.")
    if len(peers) < len(NBD_PEERS):
        L.append(f"_Only {', '.join(peers)} ran: the best peer is not the issue's._")
    if args.rounds < 5:
        L.append(f"_{args.rounds} rounds: the issue asks for medians of at least 5; indicative "
                 "only._")
    L += ["", "| job | measure | bar | pair / best peer | verdict |", "|---|---|--:|--:|---|"]
    for job in jobs:
        vals = runs.ratios(job, "pair", peers)
        bar = BAR.get(job.letter)
        if bar is None:
            continue    # job f: no bar in issue 8 (see "Head of line")
        measure = ("messages/s" if job.kind == "maildir" else
                   "read+write IOPS" if len(job.dirs) > 1 else f"{job.dirs[0]} IOPS")
        if not vals:
            verdict = "not measured"
        else:
            m = statistics.median(vals)
            verdict = "**met**" if m >= bar else "**missed**"
            if min(vals) < bar <= max(vals):
                verdict += " (range straddles the bar)"
        L.append(f"| ({job.letter}) {job.name} | {measure} | {bar:.1f}× | {fmt_ratio(vals)} | "
                 f"{verdict} |")
    L.append("")
    return L


def floor_section(meta, results, names):
    L = ["## Latency floor of job a on the pair", ""]
    runs = Runs(results)
    job_a = next(j for j in JOBS if j.letter == "a")
    floor = meta.get("floor")
    if floor and not floor.get("samples"):
        floor = None

    def med_of(target, key):
        rs = runs.by.get((job_a.name, target), [])
        if key == "write":
            return med(r["metrics"]["write"]["clat_p50_us"] for r in rs)
        return med(r["metrics"]["flush"]["lat_p50_us"] for r in rs)

    pair_w, pair_f = med_of("pair", "write"), med_of("pair", "flush")
    deg_w = med_of("pair-degraded", "write")
    raw_f = med_of("raw", "flush")
    # FLUSH of an unreplicated server over its buffered file: one fdatasync plus
    # one NBD round trip over a Unix socket, measured alternating with the pair.
    server_f = {t: med_of(t, "flush") for t in ("pairbd", "nbdkit") if t in names}
    server_f = {t: v for t, v in server_f.items() if v is not None}
    # The floor is a lower bound: its fdatasync is the best round of each estimate.
    server_f_min = {t: min(r["metrics"]["flush"]["lat_p50_us"]
                           for r in runs.by.get((job_a.name, t), [])) for t in server_f}
    if not floor and pair_w is None:
        return []
    L.append("At queue depth 1 fio waits for the WRITE's reply before it sends the FLUSH, so one "
             "job-a cycle costs at least two replication round trips and one fdatasync (both "
             "nodes flush at once; they share one disk here). Parts measured on this machine:")
    L += ["", "| part | p50 µs | how |", "|---|--:|---|"]
    if floor:
        samples = floor["samples"]
        u50 = med(x["udp_rtt"]["p50_us"] for x in samples)
        u99 = med(x["udp_rtt"]["p99_us"] for x in samples)
        f50 = med(x["fdatasync"]["p50_us"] for x in samples)
        f99 = med(x["fdatasync"]["p99_us"] for x in samples)
        f_range = [x["fdatasync"]["p50_us"] for x in samples]
        L.append(f"| round trip, loopback UDP | {u50:.1f} (p99 {u99:.0f}) | round trips of 4 KiB "
                 "out, 64 B back, between two processes (Python; no QUIC, no TLS): the lower "
                 "bound of one replication round trip here |")
    if pair_w is not None and deg_w is not None:
        L.append(f"| round trip, as the pair pays it | {pair_w - deg_w:.1f} | job a WRITE p50: "
                 f"pair {pair_w:.1f} − pair-degraded {deg_w:.1f} (QUIC, TLS, the peer's write, "
                 "both daemons' wake-ups) |")
    if floor:
        L.append(f"| fdatasync | {f50:.1f} (p99 {f99:.0f}; per sample p50 "
                 f"{min(f_range):.0f}–{max(f_range):.0f}) | 4 KiB buffered pwrite at a random "
                 f"offset of `{samples[0]['fdatasync'].get('file', '?')}` (pre-filled, on the "
                 "backing files' disk), then fdatasync (timed): a pair node with direct-io off "
                 "flushing one dirty page |")
    for t, v in server_f.items():
        L.append(f"| fdatasync + NBD round trip | {v:.1f} (best round {server_f_min[t]:.1f}) | "
                 f"job a FLUSH p50 of `{t}` (a buffered file like the pair's nodes; alternating "
                 "with the pair): an upper bound of one fdatasync |")
    if raw_f is not None:
        L.append(f"| fsync after an O_DIRECT write | {raw_f:.1f} | job a FLUSH p50 of `raw`: "
                 "the data is already written, only the disk cache flush remains (not the "
                 "pair's case) |")
    L.append("")
    if floor:
        cands = {"the best fdatasync sample": min(f_range)}
        cands.update({f"`{t}`'s FLUSH p50 in its best round": v
                      for t, v in server_f_min.items()})
        src, fs = min(cands.items(), key=lambda kv: kv[1])
        fl = 2 * u50 + fs
        L.append(f"**Floor = 2 × {u50:.1f} + {fs:.1f} = {fl:.0f} µs**: 2 × the UDP round trip "
                 f"+ the lowest fdatasync estimate ({src}; a floor is a lower bound). The "
                 f"fdatasync samples: {len(samples)}, taken just before each round of job a (or "
                 "before the runs if job a did not run); this disk is shared, and its fdatasync "
                 "varies by an order of magnitude from minute to minute.")
        if pair_w is not None and pair_f is not None:
            cyc = pair_w + pair_f
            L.append(f"The pair's job-a cycle: WRITE p50 {pair_w:.1f} + FLUSH p50 {pair_f:.1f} = "
                     f"**{cyc:.0f} µs**, {cyc / fl:.2f}× the floor (the sum of two medians "
                     "approximates the median cycle).")
            if cyc < fl:
                L.append("_The cycle is below the floor: the disk's fdatasync changed more "
                         "between the measurements than the pair's runs saw; this run cannot "
                         "place the pair against its floor._")
    L.append("")
    return L


def resources_section(results, names, jobs):
    """CPU seconds per GiB and peak memory of the servers, per job."""
    runs = Runs(results)
    rows = []
    for job in jobs:
        for t in names:
            rs = runs.by.get((job.name, t), [])
            rs = [r for r in rs if r["metrics"].get("cpu")]
            if not rs:
                continue
            per_gib, cpu_total, procs = [], [], set()
            for r in rs:
                cpu = sum(r["metrics"]["cpu"].values())
                procs.update(r["metrics"]["cpu"])
                cpu_total.append(cpu)
                b = job_bytes(job, r["metrics"])
                if b:
                    per_gib.append(cpu / (b / GIB))
            hwm = {}
            for r in rs:
                for k, v in r.get("server", {}).items():
                    if k.endswith("_vmhwm_kib") and v is not None:
                        hwm.setdefault(k[:-len("_vmhwm_kib")], []).append(v)
            mem = ", ".join(f"{p} {max(v) / 1024:.1f}" for p, v in sorted(hwm.items()))
            per = "GiB read" if job.kind == "fio" and "write" not in job.dirs else "GiB written"
            rows.append(f"| ({job.letter}) {job.name} | {t} | {' + '.join(sorted(procs))} | "
                        f"{fmt(med(cpu_total), 2)} | {fmt_ratio(per_gib)} per {per} | {mem} |")
    if not rows:
        return []
    return ["## Server CPU time and peak memory", "",
            "CPU = utime + stime of the server processes (all threads; for the pair both "
            "daemons, summed) over the measured window (sampled when fio's ramp ends and when "
            "it exits; the deliverers' window for maildir), per run, median over rounds; divided "
            "by the bytes fio wrote in that window (for job e: read; for maildir: the message "
            "bytes delivered, not counting XFS's metadata and journal). Peak memory = VmHWM, "
            "reset (clear_refs) when the load starts, read before the stop: max over runs, MiB. "
            "Kernel work done for a server outside its process (page-cache writeback for "
            "nbdkit, loop/FUSE for maildir) is not counted.", "",
            "| job | target | processes | CPU s per run | CPU s per GiB (median, min–max) | "
            "peak MiB |", "|---|---|---|--:|--:|---|"] + rows + [""]


def counters_section(results, names, jobs):
    """Group commit and metadata writes on the pair's nodes, from their status
    counters (growth over a run, ramp included)."""
    rows = []
    for job in jobs:
        for t in names:
            rs = [r for r in results if r["job"] == job.name and r["target"] == t]
            for node in ("alpha", "beta"):
                cs = [r["server"][f"{node}_counters"] for r in rs
                      if f"{node}_counters" in r.get("server", {})]
                if not cs:
                    continue
                fl = statistics.median(c["flushes"] for c in cs)
                fd = statistics.median(c["fdatasyncs"] for c in cs)
                mw = statistics.median(c["meta_writes"] for c in cs)
                per = [c["fdatasyncs"] / c["flushes"] for c in cs if c["flushes"]]
                rows.append(f"| ({job.letter}) {job.name} | {t} | {node} | {len(cs)} | "
                            f"{fl:,.0f} | {fd:,.0f} | {fmt_ratio(per)} | {mw:,.0f} |")
    if not rows:
        return []
    return ["## Pair nodes: group commit and metadata writes", "",
            "From each node's `pairbd status --json` counters, their growth over a run (ramp "
            "included), median over rounds: flushes asked of the node's store (client FLUSHes "
            "on alpha, alpha's on beta, the core's own), the fdatasyncs that served them "
            "(fewer when flushes arriving during an fdatasync shared the next one: group "
            "commit), and metadata writes (activity-log entries, bitmap pages).", "",
            "| job | target | node | runs | flushes | fdatasyncs | fdatasyncs per flush "
            "(median, min–max) | metadata writes |",
            "|---|---|---|--:|--:|--:|--:|--:|"] + rows + [""]


def starts_section(meta, results):
    pair = meta.get("pair")
    if not pair:
        return []
    L = ["## Pair start-ups", ""]
    ini = pair.get("initial_sync")
    if ini:
        L.append(f"Initial full sync (once, before the runs): {ini['bytes'] / MIB:.0f} MiB in "
                 f"{ini['seconds']:.1f} s, {ini['bytes'] / MIB / max(ini['seconds'], 0.01):.0f} "
                 "MiB/s including start-up and promotion.")
    starts = [r["server"]["start"] for r in results if "start" in r.get("server", {})]
    synced = [s for s in starts if s.get("alpha_resynced_bytes") or s.get("beta_resynced_bytes")]
    after_clean = []
    for i, r in enumerate(results):
        s = r.get("server", {}).get("start")
        if not s or not (s.get("alpha_resynced_bytes") or s.get("beta_resynced_bytes")):
            continue
        prev = [x for x in results[:i] if x["target"] in ("pair", "pair-degraded")]
        if prev and prev[-1]["target"] == "pair":
            after_clean.append(s)
    L.append(f"Runs started: {len(starts)} (daemons restarted for each, stopped with SIGTERM); "
             f"{len(synced)} began with a resync, all outside the measured time.")
    if synced:
        b = [(s.get("alpha_resynced_bytes") or 0) + (s.get("beta_resynced_bytes") or 0)
             for s in synced]
        secs = [s["seconds"] for s in synced]
        L.append(f"Resyncs at start: median {statistics.median(b) / MIB:.1f} MiB "
                 f"(max {max(b) / MIB:.1f}), median {statistics.median(secs):.1f} s "
                 f"(max {max(secs):.1f}) from start to Primary and in sync.")
    L.append("**A clean restart after a connected run resynced nothing.**" if not after_clean else
             f"**{len(after_clean)} start(s) after a connected (`pair`) run resynced data**: "
             "a clean stop was expected to need no resync (runs: "
             + ", ".join(s.get("run", "?") for s in after_clean) + ").")
    L.append("")
    return L


# Short group labels for the chart (the full job names do not fit).
CHART_LABELS = {"a": "4K QD1 + flush", "b": "4K QD32", "c": "fio Maildir mix", "d": "1M seq write",
                "e": "4K rand read", "f": "4K beside 1M", "m": "Maildir on XFS"}

PALETTE = {"pair": "#1f77b4", "pair-degraded": "#9ecae1", "pairbd": "#2ca02c",
           "pairbd-pool": "#98df8a", "nbdkit": "#ff7f0e", "qemu-nbd": "#d62728", "raw": "#7f7f7f"}


def _esc(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def build_chart_svg(args, meta, results, names, jobs):
    """Grouped bars: per job, each target's IOPS (messages/s) divided by the
    best unreplicated peer's of the same round, median over rounds; a line at
    1.0 (the best peer) and the issue's bar for the pair. Hand-written SVG, no
    dependencies."""
    runs = Runs(results)
    peers = [p for p in NBD_PEERS if p in names]
    groups = []
    for job in jobs:
        # The bar table's arithmetic: per round, over the better peer of that
        # round; then the median over rounds.
        rel = {t: med(runs.ratios(job, t, peers)) for t in names}
        rel = {t: v for t, v in rel.items() if v is not None}
        best = med(runs.best_peer_per_round(job, peers).values())
        if not rel or not best:
            continue
        groups.append((job, best, rel))
    stamp = meta.get("timestamp", "")
    subtitle = (f"{stamp}: ÷ best peer of the same round, median of {args.rounds} rounds × "
                f"{args.runtime} s; c: read+write IOPS; maildir: msg/s; red: issue 8's bar")
    W, H = 980, 440
    left, right, top, bottom = 60, 20, 84, 60
    pw, ph = W - left - right, H - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="15" font-weight="bold">'
           f'{_esc("Throughput relative to the best unreplicated peer (" + "/".join(peers) + ") — higher is better")}</text>',
           f'<text x="{W / 2}" y="38" text-anchor="middle" fill="#555">{_esc(subtitle)}</text>']
    if not groups:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data to compare '
                   'with an unreplicated peer</text></svg>')
        return "\n".join(out) + "\n"
    vmax = max(v for _, _, g in groups for v in g.values())
    ymax = min(2.0, max(1.25, (int(vmax * 4) + 1) / 4))

    def y(v):
        return top + ph - min(v, ymax) / ymax * ph

    step = 0.25 if ymax <= 1.5 else 0.5
    v = 0.0
    while v <= ymax + 1e-9:
        out.append(f'<line x1="{left}" x2="{W - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                   f'stroke="{"#000" if abs(v - 1) < 1e-9 else "#ddd"}" '
                   f'stroke-width="{1.5 if abs(v - 1) < 1e-9 else 1}"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
        v += step
    out.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">× best peer</text>')
    # legend
    lx = left
    for t in names:
        out.append(f'<rect x="{lx}" y="48" width="12" height="12" fill="{PALETTE.get(t, "#444")}"/>')
        out.append(f'<text x="{lx + 16}" y="58">{_esc(t)}</text>')
        lx += 24 + 7.5 * len(t)
    gw = pw / len(groups)
    for gi, (job, best, g) in enumerate(groups):
        present = [t for t in names if t in g]
        bw = gw * 0.8 / max(1, len(present))
        x0 = left + gi * gw + gw * 0.1
        for bi, t in enumerate(present):
            val = g[t]
            x = x0 + bi * bw
            out.append(f'<rect x="{x:.1f}" y="{y(val):.1f}" width="{bw - 2:.1f}" '
                       f'height="{top + ph - y(val):.1f}" fill="{PALETTE.get(t, "#444")}">'
                       f'<title>{_esc(f"{job.name} {t}: {val:.2f}× best peer")}</title></rect>')
            label = f"{val:.2f}" + ("▲" if val > ymax else "")
            out.append(f'<text x="{x + (bw - 2) / 2:.1f}" y="{y(val) - 3:.1f}" '
                       f'text-anchor="middle" font-size="10">{label}</text>')
            if t == "pair" and job.letter in BAR:
                by_ = y(BAR[job.letter])
                out.append(f'<line x1="{x - 3:.1f}" x2="{x + bw + 1:.1f}" y1="{by_:.1f}" '
                           f'y2="{by_:.1f}" stroke="red" stroke-width="2.5"/>')
        cx = left + gi * gw + gw / 2
        unit = "msg/s" if job.kind == "maildir" else "IOPS"
        out.append(f'<text x="{cx:.1f}" y="{top + ph + 18}" text-anchor="middle" '
                   f'font-weight="bold">({job.letter}) {_esc(CHART_LABELS.get(job.letter, job.name))}'
                   f'<title>{_esc(job.name)}</title></text>')
        out.append(f'<text x="{cx:.1f}" y="{top + ph + 34}" text-anchor="middle" fill="#555">'
                   f'best peer {best:,.0f} {unit}</text>')
    out.append('</svg>')
    return "\n".join(out) + "\n"


def hol_section(results, names):
    """Job f: 4 KiB writes alone, then beside 1 MiB writes on another
    connection: how much the large writes delay the small ones, per target. On
    the pair the large writes take the link's bulk lane, which the small
    writes' main lane passes."""
    def sec(t, name, key):
        return med(r["metrics"].get("sections", {}).get(name, {}).get(key) for r in results
                   if r["job"] == "hol-4k-beside-1m" and r["target"] == t)
    rows = []
    for t in names:
        a50 = sec(t, "small-4k-qd1-alone", "clat_p50_us")
        f50 = sec(t, "small-4k-qd1-beside-1m", "clat_p50_us")
        a99 = sec(t, "small-4k-qd1-alone", "clat_p99_us")
        f99 = sec(t, "small-4k-qd1-beside-1m", "clat_p99_us")
        big = sec(t, "large-1m-qd4", "iops")
        if f50 is None:
            continue
        rows.append(f"| {t} | {fmt(a50, 1)} | {fmt(f50, 1)} | "
                    f"{fmt(f50 / a50, 2) if a50 else '–'} | {fmt(a99, 1)} | {fmt(f99, 1)} | "
                    f"{fmt(f99 / a99, 2) if a99 else '–'} | {fmt(big)} |")
    if not rows:
        return []
    return ["## Head of line: 4 KiB writes beside 1 MiB writes (job f)", "",
            "Write completion latency of 4 KiB random writes at iodepth 1, alone and then "
            "while 1 MiB sequential writes at iodepth 4 run on another connection, medians "
            "over rounds, and the factor beside / alone. The disk and the CPUs are shared by "
            "both writers on every target; on the pair the large writes travel on the "
            "link's bulk lane, which the small writes' main lane passes (with "
            "`bulk-lane-bytes = 0` both share one ordered stream), so a factor far above the "
            "unreplicated targets' would be head-of-line blocking in the link. The job's "
            "IOPS elsewhere in this report are the small writer's alone group.", "",
            "| target | alone p50 µs | beside 1M p50 µs | factor | alone p99 µs | "
            "beside 1M p99 µs | factor | 1M writes/s |",
            "|---|--:|--:|--:|--:|--:|--:|--:|"] + rows + [""]


def build_summary(args, meta, results, targets, jobs, complete):
    ref = args.reference
    L = []
    L.append(f"# pairbd fio comparison — {meta['timestamp']}")
    L.append("")
    if not complete:
        L.append(f"**INCOMPLETE RUN**: {meta.get('error', 'interrupted')}")
        L.append("")
    L.append(f"Command: `{meta['command']}`")
    L.append("")
    L.append(f"Rounds: {args.rounds} (targets alternate within each round, order rotated per "
             f"round); runtime {args.runtime}s + ramp {args.ramp}s per run; volume "
             f"{args.size_bytes / MIB:.0f} MiB per target; page cache dropped before each run: "
             f"{meta['drop_caches']}.")
    if args.rounds < 5:
        L.append("")
        L.append(f"_Only {args.rounds} rounds: indicative only, use >= 5 for numbers to quote._")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k, v in meta["versions"].items():
        L.append(f"| {k} | {v} |")
    L.append(f"| workdir | {meta['workdir']} ({meta['workdir_fs']}) |")
    L.append(f"| cpu | {meta['cpu']} × {meta['nproc']} |")
    L.append(f"| loadavg start / end | {meta['load_start']} / {meta.get('load_end', '?')} |")
    if meta.get("wall_s"):
        L.append(f"| driver wall time | {meta['wall_s'] / 60:.1f} min |")
    L.append("")
    L.append("Targets: " + "; ".join(f"`{t.name}` = {t.describe()}" for t in targets))
    L.append("")
    names_ = [t.name for t in targets]
    L += bar_section(args, results, names_, jobs)
    L += ["Chart: [chart.svg](chart.svg) (per job, every target over the best peer of the "
          "same round, median over rounds).", ""]
    L += floor_section(meta, results, names_)
    L += hol_section(results, names_)
    L.append("Medians over rounds. IOPS and MiB/s per direction; clat = fio completion "
             "latency (clat_ns) percentiles; FLUSH = fio's sync latency (fsync=N sends "
             "NBD_CMD_FLUSH on nbd, IORING_OP_FSYNC on raw); FLUSH/write = FLUSHes fio "
             "actually issued per write (with iodepth > 1 fio 3.33 does not issue exactly "
             "1/N, and the count depends on the target's timing). Mixed jobs: write and read "
             "rows are reported separately (not combined).")
    L.append("")

    by = {}
    for r in results:
        by.setdefault((r["job"], r["target"]), []).append(r)

    names = [t.name for t in targets]
    peers = [n for n in names if n != ref]
    have_ref = ref in names and any(r["target"] == ref for r in results)
    best_peers = [p for p in NBD_PEERS if p in names and p != ref]

    def per_round(job, target, d):
        return {r["round"]: r["metrics"][d]["iops"] for r in by.get((job, target), [])}

    for job in jobs:
        L.append(f"## ({job.letter}) {job.name}")
        L.append("")
        L.append(job.title + ".")
        L.append("")
        if job.kind == "maildir":
            hdr = ("| target | dir | runs | messages/s | messages/s min–max | MiB/s | "
                   "delivery p50 µs | delivery p99 µs |")
        else:
            hdr = "| target | dir | runs | IOPS | IOPS min–max | MiB/s | clat p50 µs | clat p99 µs |"
        sep = "|---|---|--:|--:|--:|--:|--:|--:|"
        if job.flush:
            hdr += " FLUSH/write | FLUSH p50 µs | FLUSH p99 µs |"
            sep += "--:|--:|--:|"
        if have_ref:
            hdr += f" {ref}/target IOPS |"
            sep += "--:|"
        L.append(hdr)
        L.append(sep)
        for d in job.dirs:
            ref_iops = per_round(job.name, ref, d) if have_ref else {}
            for t in names:
                runs = by.get((job.name, t), [])
                if not runs:
                    continue
                m = [r["metrics"] for r in runs]
                iops = [x[d]["iops"] for x in m]
                row = (f"| {t} | {d} | {len(runs)} | {fmt(med(iops))} | "
                       f"{fmt(min(iops))}–{fmt(max(iops))} | "
                       f"{fmt(med(x[d]['mibs'] for x in m), 1)} | "
                       f"{fmt(med(x[d]['clat_p50_us'] for x in m), 1)} | "
                       f"{fmt(med(x[d]['clat_p99_us'] for x in m), 1)} |")
                if job.flush and d == "write":
                    row += (f" {fmt(med(x['flush']['ios'] / x['write']['ios'] for x in m if x['write']['ios']), 2)} |"
                            f" {fmt(med(x['flush']['lat_p50_us'] for x in m), 1)} |"
                            f" {fmt(med(x['flush']['lat_p99_us'] for x in m), 1)} |")
                elif job.flush:       # FLUSHes follow writes: shown on the write row
                    row += " | | |"
                if have_ref:
                    if t == ref:
                        row += " 1 |"
                    else:
                        mine = per_round(job.name, t, d)
                        row += " " + fmt_ratio(ref_iops[k] / mine[k] for k in ref_iops
                                               if k in mine and mine[k] > 0) + " |"
                L.append(row)
        L.append("")

    L.append("## Ratios")
    L.append("")
    if not have_ref:
        L.append(f"Reference target `{ref}` was not run: no ratios (choose another with "
                 f"--reference to compare the others).")
    else:
        L.append(f"IOPS of `{ref}` divided by the peer's, computed per round (the targets of a "
                 f"round ran back to back) — **median** (min–max over rounds). > 1 means `{ref}` "
                 f"is faster. \"best of\" divides by the better of "
                 f"{'/'.join(best_peers) or 'the NBD peers'} in the same round.")
        L.append("")
        cols = list(peers) + (["best of " + "/".join(best_peers)] if best_peers else [])
        L.append("| job | dir | " + " | ".join(f"{ref} / {c}" for c in cols) + " |")
        L.append("|---|---|" + "--:|" * len(cols))
        for job in jobs:
            for d in job.dirs:
                ref_iops = per_round(job.name, ref, d)
                cells = []
                for p in peers:
                    mine = per_round(job.name, p, d)
                    cells.append(fmt_ratio(ref_iops[k] / mine[k] for k in ref_iops
                                           if k in mine and mine[k] > 0))
                if best_peers:
                    pr = [per_round(job.name, p, d) for p in best_peers]
                    vals = []
                    for k in ref_iops:
                        bests = [x[k] for x in pr if k in x]
                        if bests and max(bests) > 0:
                            vals.append(ref_iops[k] / max(bests))
                    cells.append(fmt_ratio(vals))
                L.append(f"| {job.name} | {d} | " + " | ".join(cells) + " |")
    L.append("")

    mem = {}
    for r in results:
        for k, v in r.get("server", {}).items():
            if k.endswith("_vmhwm_kib") and v is not None:
                mem.setdefault((r["target"], k[:-len("_vmhwm_kib")]), []).append(v)
    if mem:
        L.append("## Server peak memory (VmHWM, read just before stopping)")
        L.append("")
        L.append("| target | process | runs | median MiB | max MiB |")
        L.append("|---|---|--:|--:|--:|")
        for (t, p), v in sorted(mem.items(), key=lambda kv: names.index(kv[0][0])):
            L.append(f"| {t} | {p} | {len(v)} | {statistics.median(v) / 1024:.1f} | "
                     f"{max(v) / 1024:.1f} |")
        L.append("")
    L += resources_section(results, names, jobs)
    L += counters_section(results, names, jobs)
    L += starts_section(meta, results)
    L.append("Raw fio JSON per run: `<job>__<target>__r<round>.json` in this directory; "
             "server logs `*.log`; all parsed numbers in `results.json`.")
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Run the Maildir-shaped fio jobs against pairbd, nbdkit, qemu-nbd and "
                    "the raw disk, alternating targets, and report medians and ratios.")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds per job; each round runs every target once (default 5)")
    p.add_argument("--runtime", type=int, default=10, help="seconds measured per run (default 10)")
    p.add_argument("--ramp", type=int, default=2,
                   help="seconds of ramp (not measured) before each run (default 2)")
    p.add_argument("--jobs", default=",".join(j.name for j in JOBS),
                   help="comma-separated job names or letters a-f, m = maildir (default: all)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)} "
                        f"(default: {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--reference", default=None,
                   help="target whose IOPS are divided by each peer's (default: pair if it "
                        "runs, else pairbd)")
    p.add_argument("--pairbd", default=DEFAULT_PAIRBD,
                   help="pairbd binary (default target/release/pairbd, built with "
                        "`cargo build --release` if missing)")
    p.add_argument("--workdir", default=None,
                   help="directory for backing files and sockets; must not be tmpfs "
                        "(default: a new directory under /var/tmp, removed afterwards)")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep the backing files afterwards (default: delete them)")
    p.add_argument("--size", default="2G", help="volume size per target (default 2G)")
    p.add_argument("--results-dir", default=os.path.join(BENCH_DIR, "results"),
                   help="where <timestamp>/ is created (default bench/results)")
    p.add_argument("--start-timeout", type=float, default=20.0,
                   help="seconds to wait for a server to answer nbdinfo (default 20)")
    p.add_argument("--report", metavar="RESULTS_DIR", default=None,
                   help="run nothing: rebuild summary.md of an earlier run from its "
                        "results.json (with this --reference)")
    p.add_argument("--deliverers", type=int, default=8,
                   help="maildir job: parallel deliverer processes (default 8)")
    p.add_argument("--maildir-mailboxes", type=int, default=32,
                   help="maildir job: mailboxes the deliveries are spread over (default 32)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip measuring the latency floor (UDP round trip, fdatasync)")
    p.add_argument("--pair-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a line added to the pair's [resource] section (both nodes), e.g. "
                        "'al-extents = 960'; repeat for several (default: none, the daemon's "
                        "defaults)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="an argument added to `pairbd serve` (the pairbd target), e.g. "
                        "--serve-arg=--direct-io; repeat for several (default: none)")
    p.add_argument("--link-rate", default=None, metavar="RATE",
                   help="run the whole bench inside a new network namespace whose loopback "
                        "is limited to RATE by a tbf qdisc with a 5 ms queue (tc's syntax, "
                        "e.g. 1gbit), so that the pair's replication link, not the CPUs, is "
                        "the bottleneck (job f: the link's lanes); needs root; the namespace "
                        "is removed afterwards. NBD traffic uses Unix sockets and is not "
                        "limited (default: no limit)")
    p.add_argument("--fio", default="fio", help="fio binary (default fio)")
    p.add_argument("--nbdfuse", default="nbdfuse", help="nbdfuse binary (default nbdfuse)")
    p.add_argument("--nbdkit", default="nbdkit", help="nbdkit binary (default nbdkit)")
    p.add_argument("--qemu-nbd", default="qemu-nbd", help="qemu-nbd binary (default qemu-nbd)")
    a = p.parse_args(argv)

    letters = {j.letter: j for j in JOBS}
    byname = {j.name: j for j in JOBS}
    a.job_list = []
    for x in filter(None, (s.strip() for s in a.jobs.split(","))):
        j = letters.get(x) or byname.get(x)
        if j is None:
            p.error(f"unknown job {x!r}; known: "
                    + ", ".join(f"{j.letter}={j.name}" for j in JOBS))
        if j not in a.job_list:
            a.job_list.append(j)
    a.target_list = []
    for x in filter(None, (s.strip() for s in a.targets.split(","))):
        if x not in TARGETS:
            p.error(f"unknown target {x!r}; known: {', '.join(TARGETS)}")
        if x not in a.target_list:
            a.target_list.append(x)
    if not a.job_list or not a.target_list:
        p.error("need at least one job and one target")
    if a.rounds < 1 or a.runtime < 1 or a.ramp < 0:
        p.error("--rounds and --runtime must be >= 1, --ramp >= 0")
    if a.reference is None:
        a.reference = "pair" if "pair" in a.target_list else "pairbd"
    if a.deliverers < 1 or a.maildir_mailboxes < 1:
        p.error("--deliverers and --maildir-mailboxes must be >= 1")
    a.size_bytes = parse_size(a.size)
    if a.size_bytes < 64 * MIB or a.size_bytes % MIB:
        p.error("--size must be a multiple of 1 MiB and at least 64 MiB")
    a.pairbd = os.path.abspath(a.pairbd)
    return a


class _Terminated(KeyboardInterrupt):
    pass


def _on_signal(signum, frame):
    raise _Terminated(f"signal {signum}")


def report(args):
    """Rebuild the summary of an earlier run from its results.json."""
    with open(os.path.join(args.report, "results.json")) as f:
        saved = json.load(f)
    old = argparse.Namespace(**saved["args"])
    old.reference = args.reference or ("pair" if "pair" in old.targets.split(",")
                                       else "pairbd")
    jobs = [j for name in saved["jobs"] for j in JOBS if j.name == name]
    targets = [TARGETS[n](old, saved["meta"]["workdir"]) for n in old.targets.split(",")
               if n in TARGETS]
    complete = "error" not in saved["meta"]
    summary = build_summary(old, saved["meta"], saved["runs"], targets, jobs, complete)
    with open(os.path.join(args.report, "summary.md"), "w") as f:
        f.write(summary)
    with open(os.path.join(args.report, "chart.svg"), "w") as f:
        f.write(build_chart_svg(old, saved["meta"], saved["runs"], [t.name for t in targets],
                                jobs))
    print(summary)
    return 0


# Set for the inner run of --link-rate (recorded with the versions).
LINK_RATE_ENV = "PAIRBD_BENCH_LINK_RATE"


def run_in_rate_limited_netns(argv, rate):
    """--link-rate: runs this script again, without the option, inside a new
    network namespace whose loopback is limited to `rate`; removes the
    namespace afterwards."""
    ns = f"pairbd-bench-{os.getpid()}"
    rest = []
    skip = False
    for x in argv:
        if skip:
            skip = False
        elif x == "--link-rate":
            skip = True
        elif not x.startswith("--link-rate="):
            rest.append(x)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root",
                        "tbf", "rate", rate, "burst", "128kb", "latency", "5ms"], check=True)
        print(f"link rate: {rate} (tbf on the loopback of network namespace {ns})", flush=True)
        env = dict(os.environ, **{LINK_RATE_ENV: rate})
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable,
                               os.path.abspath(__file__)] + rest, env=env).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main(argv):
    args = parse_args(argv)
    if args.report:
        return report(args)
    if args.link_rate:
        return run_in_rate_limited_netns(argv, args.link_rate)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    # Also when started in the background by a shell (which ignores SIGINT for
    # it): `kill -INT` must clean up like Ctrl-C does.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    # Preflight (tools, pairbd build) before anything is created on disk.
    try:
        need(args.fio)
        need("nbdinfo")
        if any(j.kind == "maildir" for j in args.job_list):
            for tool in (args.nbdfuse, "losetup", "mkfs.xfs", "mount", "umount", "fusermount3"):
                if shutil.which(tool) is None:
                    raise BenchError(f"{tool} not found: the maildir job needs nbdfuse "
                                     "(libnbd-bin), fuse3, xfsprogs and util-linux "
                                     "(or leave it out: --jobs a,b,c,d,e)")
            if os.geteuid() != 0:
                raise BenchError("the maildir job needs root (loop device, mount)")
        versions = {"kernel": platform.release(), "fio": tool_version([args.fio, "--version"]),
                    "python": platform.python_version()}
        probe = [TARGETS[n](args, "/nonexistent") for n in args.target_list]
        for t in probe:
            versions.update(t.preflight())
    except BenchError as e:
        log(f"ERROR: {e}")
        return 1
    git = subprocess.run(["git", "-C", REPO_DIR, "describe", "--always", "--dirty"],
                         capture_output=True, text=True)
    if git.returncode == 0:
        versions["pairbd tree"] = git.stdout.strip()
    if os.environ.get(LINK_RATE_ENV):
        versions["link rate (tbf on loopback)"] = os.environ[LINK_RATE_ENV]
    for k, v in versions.items():
        log(f"{k}: {v}")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = os.path.join(args.results_dir, stamp)
    for i in range(2, 100):
        try:
            os.makedirs(outdir)
            break
        except FileExistsError:
            outdir = os.path.join(args.results_dir, f"{stamp}-{i}")

    made_workdir = args.workdir is None
    if made_workdir:
        workdir = tempfile.mkdtemp(prefix="pairbd-bench-", dir="/var/tmp")
    else:
        workdir = os.path.abspath(args.workdir)
        if not os.path.isdir(workdir):
            os.makedirs(workdir)
            made_workdir = True

    meta = {
        "timestamp": stamp,
        "command": shlex.join([sys.executable] + [os.path.relpath(__file__)] + argv),
        "versions": versions,
        "workdir": workdir, "workdir_fs": fs_type(workdir),
        "cpu": next((l.split(":", 1)[1].strip() for l in _read("/proc/cpuinfo").splitlines()
                     if l.startswith("model name")), platform.processor() or "?"),
        "nproc": os.cpu_count(),
        "load_start": " ".join(_read("/proc/loadavg").split()[:3]),
        "drop_caches": "unknown",
    }
    driver_began = time.monotonic()
    results, targets, created = [], [], []
    complete = False
    try:
        if meta["workdir_fs"] in ("tmpfs", "ramfs"):
            raise BenchError(f"workdir {workdir} is on {meta['workdir_fs']}: use a real disk "
                             "(O_DIRECT and the page cache behave differently on tmpfs)")
        targets = [TARGETS[n](args, workdir) for n in args.target_list]

        backings = []
        for t in targets:
            backings += [b for b in t.backings() if b not in backings]
        need_bytes = args.size_bytes * (len(backings) + 1) + 256 * MIB
        st = os.statvfs(workdir)
        if st.f_bavail * st.f_frsize < need_bytes:
            raise BenchError(f"not enough space in {workdir}: need {need_bytes / MIB:.0f} MiB")

        # One pre-filled file (random data: reads never hit holes), copied per backing file.
        prefill = os.path.join(workdir, "prefill.img")
        created.append(prefill)
        log(f"pre-filling {prefill} with {args.size_bytes / MIB:.0f} MiB of random data")
        subprocess.run(["dd", "if=/dev/urandom", f"of={prefill}", "bs=1M",
                        f"count={args.size_bytes // MIB}", "iflag=fullblock", "conv=fsync",
                        "status=none"], check=True)
        for path in backings:
            created.append(path)
            subprocess.run(["cp", "--reflink=auto", prefill, path], check=True)
        os.unlink(prefill)
        created.remove(prefill)
        os.sync()
        for t in targets:
            t.prepare(outdir)
            if isinstance(t, PairTarget):
                meta["pair"] = {"initial_sync": t.cluster.initial_sync}
        if args.floor:
            floor_path, made = floor_file(workdir, targets, args.size_bytes)
            if made:
                created.append(floor_path)
            if not any(j.letter == "a" for j in args.job_list):
                measure_floor(floor_path, meta, "before the runs")

        plan = [(job, [t for t in targets if (job.kind == "fio" or t.flavour == "nbd")
                       and job.letter not in t.skip_jobs])
                for job in args.job_list]
        total = sum(args.rounds * len(ts) for _, ts in plan)
        n = 0
        for job, job_targets in plan:
            if not job_targets:
                log(f"{job.name}: no target can run it (the raw target has no NBD export)")
                continue
            for rnd in range(1, args.rounds + 1):
                if args.floor and job.letter == "a":
                    measure_floor(floor_path, meta, f"before round {rnd} of job a")
                k = (rnd - 1) % len(job_targets)
                order = job_targets[k:] + job_targets[:k]   # alternate, rotating who goes first
                for pos, t in enumerate(order):
                    n += 1
                    tag = f"{job.name}__{t.name}__r{rnd}"
                    out_json = os.path.join(outdir, tag + ".json")
                    server = {}
                    meter = ServerMeter(t)
                    run_began = time.monotonic()
                    try:
                        env = t.start(tag, outdir)
                        if job.kind == "maildir":
                            metrics = run_maildir(args, env, (workdir,), outdir, tag, meter, rnd)
                        else:
                            dropped = drop_caches()
                            meta["drop_caches"] = "yes" if dropped else "NO (not root?)"
                            metrics = run_fio(args, job, env, t.flavour, out_json,
                                              os.path.join(outdir, tag + ".fio.log"), meter)
                    finally:
                        server = t.stop()
                    results.append({"job": job.name, "target": t.name, "round": rnd,
                                    "position": pos, "metrics": metrics, "server": server,
                                    "wall_s": round(time.monotonic() - run_began, 2),
                                    "json": os.path.basename(out_json)})
                    d = job.dirs[0]
                    unit = "msg/s" if job.kind == "maildir" else f"{d} IOPS"
                    peak = sum(v for k2, v in server.items() if k2.endswith("_vmhwm_kib"))
                    cpu = sum(metrics.get("cpu", {}).values())
                    log(f"[{n}/{total}] {job.name} round {rnd} {t.name}: "
                        f"{metrics[d]['iops']:,.0f} {unit}, {metrics[d]['mibs']:.1f} MiB/s, "
                        f"p50 {fmt(metrics[d]['clat_p50_us'], 0)} µs, "
                        f"p99 {fmt(metrics[d]['clat_p99_us'], 0)} µs"
                        + (f", server CPU {cpu:.2f} s, peak {peak / 1024:.1f} MiB"
                           if metrics.get("cpu") else ""))
        complete = True
    except BenchError as e:
        meta["error"] = str(e)
        log(f"ERROR: {e}")
    except KeyboardInterrupt as e:
        meta["error"] = f"interrupted ({str(e) or 'SIGINT'})"
        log(f"interrupted: cleaning up")
    except Exception as e:  # a bug in the driver: still clean up and keep what ran
        meta["error"] = f"internal error: {e!r}"
        log(f"ERROR (internal): {e!r}: cleaning up")
        import traceback
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # do not abort the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for t in targets:
            try:
                t.stop()
                if not args.keep_workdir:
                    t.cleanup()
            except Exception as e:  # keep cleaning
                log(f"cleanup: {t.name}: {e}")
        if not args.keep_workdir:
            for path in created:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            if made_workdir:
                try:
                    os.rmdir(workdir)
                except OSError as e:
                    log(f"cleanup: could not remove {workdir}: {e}")
        else:
            log(f"kept backing files in {workdir}")
        meta["load_end"] = " ".join(_read("/proc/loadavg").split()[:3])
        meta["wall_s"] = round(time.monotonic() - driver_began, 1)
        with open(os.path.join(outdir, "results.json"), "w") as f:
            json.dump({"meta": meta, "args": {k: v for k, v in vars(args).items()
                                              if k not in ("job_list", "target_list")},
                       "jobs": [j.name for j in args.job_list], "runs": results}, f, indent=1)
        if results or complete:
            summary = build_summary(args, meta, results, targets, args.job_list, complete)
            with open(os.path.join(outdir, "summary.md"), "w") as f:
                f.write(summary)
            with open(os.path.join(outdir, "chart.svg"), "w") as f:
                f.write(build_chart_svg(args, meta, results, [t.name for t in targets],
                                        args.job_list))
            print(summary)
        log(f"results: {outdir}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
