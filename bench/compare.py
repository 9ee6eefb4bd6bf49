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
    def __init__(self, letter, name, title, dirs, flush):
        self.letter, self.name, self.title = letter, name, title
        self.dirs, self.flush = dirs, flush

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
    flavour = "nbd"          # which job directory: bench/jobs/<flavour>/
    description = ""

    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.backing = os.path.join(workdir, f"{self.name}.img")

    def preflight(self):
        """Check (and build) what the target needs; return {tool: version}."""
        return {}

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
                            "--listen", f"unix:{self.sock}", "--export", EXPORT])]


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


class PairbdPairTarget(PairbdTarget):
    """The replicated pair: two `pairbd daemon`s on this machine (loopback QUIC,
    Unix sockets), alpha Primary serving the bench socket, beta its secondary.
    The first start syncs beta fully from alpha (pairbd cannot know the two
    copies start equal); later starts find both UpToDate and only promote."""
    name = "pairbd-pair"
    description = "pairbd daemon pair (replicated, protocol C, both nodes on this machine)"

    def __init__(self, args, workdir):
        super().__init__(args, workdir)
        self.pdir = os.path.join(workdir, "pairbd-pair.d")
        self.config = os.path.join(self.pdir, "pairbd.toml")
        self.secondary = os.path.join(self.pdir, "beta.img")

    def cli(self, node, *argv, check=True):
        r = subprocess.run([self.args.pairbd, "--config", self.config, "--node", node, *argv],
                           capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise BenchError(f"{self.name}: pairbd {' '.join(argv)} on {node} failed: "
                             f"{r.stderr.strip() or r.stdout.strip()}")
        return r

    def setup_once(self):
        if os.path.exists(self.config):
            return
        os.makedirs(self.pdir, exist_ok=True)
        for node in ("alpha", "beta"):
            subprocess.run([self.args.pairbd, "gen-cert", "--node", node, "--out", self.pdir],
                           check=True, capture_output=True)
        ports = []
        for _ in range(2):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", 0))
                ports.append(u.getsockname()[1])
        subprocess.run(["cp", "--reflink=auto", self.backing, self.secondary], check=True)
        text = f"[resource.{EXPORT}]\nsize = {self.args.size_bytes}\n"
        backings = {"alpha": self.backing, "beta": self.secondary}
        listen = {"alpha": f'["unix:{self.sock}"]', "beta": "[]"}
        for i, node in enumerate(("alpha", "beta")):
            text += (f"\n[resource.{EXPORT}.node.{node}]\nid = {i + 1}\n"
                     f'backing = "{backings[node]}"\nmeta = "{node}.meta"\n'
                     f"listen = {listen[node]}\nreplication = \"127.0.0.1:{ports[i]}\"\n"
                     f'certificate = "{node}.crt"\nkey = "{node}.key"\n'
                     f'control = "{node}.ctl"\n')
        with open(self.config, "w") as f:
            f.write(text)
        for node in ("alpha", "beta"):
            self.cli(node, "create-md", EXPORT)

    def commands(self):
        return [(node, [self.args.pairbd, "--config", self.config, "--node", node, "daemon"])
                for node in ("beta", "alpha")]

    def wait_ready(self):
        # Both daemons print a ready line; clients are accepted only once
        # alpha is Primary, which start() arranges next.
        deadline = time.monotonic() + self.args.start_timeout
        while not all("ready" in _read(lp) for _, _, lp in self.procs):
            for lbl, p, lp in self.procs:
                if exited(p):
                    raise BenchError(f"{self.name}: '{lbl}' exited during start-up "
                                     f"({exit_description(p)}; see {lp}):\n{tail(lp)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: daemons not ready after "
                                 f"{self.args.start_timeout}s")
            time.sleep(0.1)

    def start(self, run_tag, logdir):
        self.setup_once()
        env = super().start(run_tag, logdir)
        deadline = time.monotonic() + max(self.args.start_timeout, 600)
        promoted = False
        while True:
            st = json.loads(self.cli("alpha", "status", "--json").stdout)
            if st["connection"] == "Connected" and not promoted:
                force = st["disk"] != "UpToDate"
                if st["role"] != "Primary":
                    self.cli("alpha", "promote", *(["--force"] if force else []))
                promoted = True
            elif (promoted and st["role"] == "Primary" and st["sync"] is None
                  and (st["peer"] or {}).get("disk") == "UpToDate"):
                return env
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: not in sync in time: {st}")
            time.sleep(0.2)

    def stop(self):
        stats = super().stop()
        # The bench reads alpha's peak memory as "pairbd".
        if "alpha_vmhwm_kib" in stats:
            stats["pairbd_vmhwm_kib"] = stats["alpha_vmhwm_kib"]
        return stats

    def cleanup(self):
        shutil.rmtree(self.pdir, ignore_errors=True)


TARGETS = {cls.name: cls for cls in (PairbdTarget, PairbdPoolTarget, PairbdPairTarget, NbdkitTarget,
                                     QemuNbdTarget,
                                     RawTarget)}
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


def tail(path, n=15):
    return "\n".join("    " + l for l in _read(path).splitlines()[-n:]) or "    (empty)"


# --------------------------------------------------------------------------
# fio
# --------------------------------------------------------------------------

def run_fio(args, job, target_env, flavour, out_json, fio_log):
    env = dict(os.environ, BENCH_RUNTIME=str(args.runtime), BENCH_RAMP=str(args.ramp),
               **target_env)
    argv = [args.fio, "--output-format=json", f"--output={out_json}", job.file(flavour)]
    with open(fio_log, "wb") as lf:
        proc = spawn(argv, stdout=lf, env=env)
    try:
        proc.wait(timeout=args.runtime + args.ramp + 120)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio timed out: {shlex.join(argv)}")
    finally:
        stop_group(proc)
    if proc.returncode != 0:
        raise BenchError(f"fio exited {proc.returncode} ({fio_log}):\n{tail(fio_log)}")
    return parse_fio(out_json)


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
                  "clat_p50_us": pct(clat, "50.000000"), "clat_p99_us": pct(clat, "99.000000")}
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
    L.append("")
    L.append("Targets: " + "; ".join(f"`{t.name}` = {t.describe()}" for t in targets))
    L.append("")
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
                   help="comma-separated job names or letters a-e (default: all)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)} (default: all)")
    p.add_argument("--reference", default="pairbd",
                   help="target whose IOPS are divided by each peer's (default pairbd)")
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
    p.add_argument("--fio", default="fio", help="fio binary (default fio)")
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
    old.reference = args.reference
    jobs = [j for name in saved["jobs"] for j in JOBS if j.name == name]
    targets = [TARGETS[n](old, saved["meta"]["workdir"]) for n in old.targets.split(",")
               if n in TARGETS]
    complete = "error" not in saved["meta"]
    summary = build_summary(old, saved["meta"], saved["runs"], targets, jobs, complete)
    with open(os.path.join(args.report, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)
    return 0


def main(argv):
    args = parse_args(argv)
    if args.report:
        return report(args)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    # Preflight (tools, pairbd build) before anything is created on disk.
    try:
        need(args.fio)
        need("nbdinfo")
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
    results, targets, created = [], [], []
    complete = False
    try:
        if meta["workdir_fs"] in ("tmpfs", "ramfs"):
            raise BenchError(f"workdir {workdir} is on {meta['workdir_fs']}: use a real disk "
                             "(O_DIRECT and the page cache behave differently on tmpfs)")
        targets = [TARGETS[n](args, workdir) for n in args.target_list]

        need_bytes = args.size_bytes * (len(targets) + 1) + 256 * MIB
        st = os.statvfs(workdir)
        if st.f_bavail * st.f_frsize < need_bytes:
            raise BenchError(f"not enough space in {workdir}: need {need_bytes / MIB:.0f} MiB")

        # One pre-filled file (random data: reads never hit holes), copied per target.
        prefill = os.path.join(workdir, "prefill.img")
        created.append(prefill)
        log(f"pre-filling {prefill} with {args.size_bytes / MIB:.0f} MiB of random data")
        subprocess.run(["dd", "if=/dev/urandom", f"of={prefill}", "bs=1M",
                        f"count={args.size_bytes // MIB}", "iflag=fullblock", "conv=fsync",
                        "status=none"], check=True)
        for t in targets:
            created.append(t.backing)
            subprocess.run(["cp", "--reflink=auto", prefill, t.backing], check=True)
        os.unlink(prefill)
        created.remove(prefill)
        os.sync()

        total = len(args.job_list) * args.rounds * len(targets)
        n = 0
        for job in args.job_list:
            for rnd in range(1, args.rounds + 1):
                k = (rnd - 1) % len(targets)
                order = targets[k:] + targets[:k]   # alternate, rotating who goes first
                for pos, t in enumerate(order):
                    n += 1
                    tag = f"{job.name}__{t.name}__r{rnd}"
                    out_json = os.path.join(outdir, tag + ".json")
                    server = {}
                    try:
                        env = t.start(tag, outdir)
                        dropped = drop_caches()
                        meta["drop_caches"] = "yes" if dropped else "NO (not root?)"
                        metrics = run_fio(args, job, env, t.flavour, out_json,
                                          os.path.join(outdir, tag + ".fio.log"))
                    finally:
                        server = t.stop()
                    results.append({"job": job.name, "target": t.name, "round": rnd,
                                    "position": pos, "metrics": metrics, "server": server,
                                    "json": os.path.basename(out_json)})
                    d = job.dirs[0]
                    log(f"[{n}/{total}] {job.name} round {rnd} {t.name}: "
                        f"{metrics[d]['iops']:,.0f} {d} IOPS, {metrics[d]['mibs']:.1f} MiB/s, "
                        f"p99 {fmt(metrics[d]['clat_p99_us'], 0)} µs"
                        + (f", peak {server['pairbd_vmhwm_kib'] / 1024:.1f} MiB"
                           if server.get("pairbd_vmhwm_kib") else ""))
        complete = True
    except BenchError as e:
        meta["error"] = str(e)
        log(f"ERROR: {e}")
    except KeyboardInterrupt as e:
        meta["error"] = f"interrupted ({e or 'Ctrl-C'})"
        log(f"interrupted: cleaning up")
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
        with open(os.path.join(outdir, "results.json"), "w") as f:
            json.dump({"meta": meta, "args": {k: v for k, v in vars(args).items()
                                              if k not in ("job_list", "target_list")},
                       "jobs": [j.name for j in args.job_list], "runs": results}, f, indent=1)
        if results or complete:
            summary = build_summary(args, meta, results, targets, args.job_list, complete)
            with open(os.path.join(outdir, "summary.md"), "w") as f:
                f.write(summary)
            print(summary)
        log(f"results: {outdir}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
