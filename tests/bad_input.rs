//! Hostile and unusual NBD clients against the real `pairbd serve`: requests out of
//! range or too large, rejected writes whose payload is still on the wire, malformed
//! headers and handshakes, pipelines, vanishing clients and shutdown with requests in
//! flight. Each test starts its own daemon on its own directory and speaks the protocol
//! byte by byte through `common/raw_client.rs`.
//!
//! The rule behind most of them: bad input from one client gets an error reply (or, where
//! the framing is lost, a closed connection) and never disturbs the daemon or any other
//! client. Nothing here sleeps to synchronise; socket timeouts only bound failures.

mod common;
#[path = "common/raw_client.rs"]
mod raw_client;

use std::collections::{HashMap, HashSet};

use common::{Daemon, TestDir};
use pairbd_nbd_proto::consts::*;
use pairbd_nbd_proto::NbdError;
use raw_client::{parse_info_replies, parse_list_replies, pattern, vm_rss_bytes, RawClient};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// The size of the default test volume ("64MiB").
const VOLUME: u64 = 64 * MIB;
/// The advertised maximum READ/WRITE payload.
const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
const BLOCK: u32 = 4096;
/// The export name every test daemon serves.
const EXPORT: &str = "x";

fn einval() -> u32 {
    NbdError::Inval.errno()
}
fn enospc() -> u32 {
    NbdError::NoSpc.errno()
}
fn eperm() -> u32 {
    NbdError::Perm.errno()
}
fn enotsup() -> u32 {
    NbdError::NotSup.errno()
}

/// Starts the default daemon: a 64 MiB volume exported as "x".
fn serve(dir: &TestDir) -> Daemon {
    Daemon::serve(dir, "64MiB", &["--export", EXPORT])
}

/// Opens a new connection in transmission on the test export.
fn open(daemon: &Daemon) -> RawClient {
    RawClient::open(&daemon.socket, EXPORT).0
}

/// Writes a fresh pattern at `offset` and reads it back on this connection.
fn assert_usable(client: &mut RawClient, offset: u64, seed: u64) {
    let data = pattern(seed, BLOCK as usize);
    client.write_ok(offset, &data);
    assert_eq!(
        client.read_ok(offset, BLOCK),
        data,
        "read-back after write at {offset}"
    );
}

/// The daemon is still running and a brand-new client can attach and do I/O.
fn assert_daemon_serves(daemon: &mut Daemon, seed: u64) {
    assert!(
        daemon.is_running(),
        "the daemon died; its log:\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert!(
        !log.contains("panicked"),
        "the daemon logged a panic:\n{log}"
    );
    let mut client = open(daemon);
    assert_usable(&mut client, 8 * MIB, seed);
    client.disconnect();
    assert!(client
        .try_read_reply_header()
        .expect("clean close after NBD_CMD_DISC")
        .is_none());
}

// ---- Out-of-range and oversized requests ----

#[test]
fn read_past_the_end_is_einval_and_the_connection_stays_usable() {
    let dir = TestDir::new("read-past-end");
    let daemon = serve(&dir);
    let mut client = open(&daemon);
    let last = VOLUME - u64::from(BLOCK);
    let data = pattern(1, BLOCK as usize);
    client.write_ok(last, &data);

    assert_eq!(
        client.read_at(0, last, 2 * BLOCK),
        Err(einval()),
        "READ straddling the end"
    );
    assert_eq!(
        client.read_at(0, VOLUME, BLOCK),
        Err(einval()),
        "READ starting at the end"
    );
    assert_eq!(
        client.read_at(0, VOLUME + GIB, BLOCK),
        Err(einval()),
        "READ far past the end"
    );
    assert_eq!(
        client.read_at(0, last + 512, BLOCK),
        Err(einval()),
        "READ overhanging by 512 bytes"
    );

    // The same connection still works, and the valid part is intact.
    assert_eq!(client.read_ok(last, BLOCK), data);
    assert_usable(&mut client, 0, 2);
}

#[test]
fn read_whose_offset_plus_length_overflows_u64_is_einval() {
    let dir = TestDir::new("read-overflow");
    let daemon = serve(&dir);
    let mut client = open(&daemon);

    // offset + length wraps past 2^64 to a small number that would look in range.
    assert_eq!(client.read_at(0, u64::MAX - 4095, 2 * BLOCK), Err(einval()));
    // offset + length == 2^64 exactly.
    assert_eq!(
        client.read_at(0, 0u64.wrapping_sub(u64::from(BLOCK)), BLOCK),
        Err(einval())
    );
    assert_eq!(client.read_at(0, u64::MAX, 1), Err(einval()));
    // The other range commands must not wrap either (EINVAL or ENOSPC are both fair).
    for kind in [NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES, NBD_CMD_CACHE] {
        let error = client.command(0, kind, u64::MAX - 4095, 2 * BLOCK);
        assert!(
            error == einval() || error == enospc(),
            "command {kind} with a wrapping range must fail with EINVAL or ENOSPC, got {error}"
        );
    }
    // A WRITE that wraps: ENOSPC, and its payload is consumed.
    let payload = pattern(3, 2 * BLOCK as usize);
    assert_eq!(client.write_at(0, u64::MAX - 4095, &payload), enospc());

    assert_usable(&mut client, 0, 4);
}

#[test]
fn write_past_the_end_is_enospc_and_its_payload_is_consumed() {
    let dir = TestDir::new("write-past-end");
    let daemon = serve(&dir);
    let mut client = open(&daemon);
    let last = VOLUME - u64::from(BLOCK);
    let original = pattern(10, BLOCK as usize);
    client.write_ok(last, &original);

    // Straddling the end: nothing may be written, not even the part inside.
    let straddling = pattern(11, 2 * BLOCK as usize);
    assert_eq!(
        client.write_at(0, last, &straddling),
        enospc(),
        "WRITE straddling the end"
    );
    // Wholly past the end, with a payload big enough to span many socket reads.
    let beyond = pattern(12, MIB as usize);
    assert_eq!(
        client.write_at(0, VOLUME, &beyond),
        enospc(),
        "WRITE past the end"
    );
    assert_eq!(
        client.write_at(FUA_FLAG, VOLUME + GIB, &straddling),
        enospc(),
        "FUA WRITE past the end"
    );

    // Had any payload byte been left on the socket, this READ would be misparsed.
    assert_eq!(
        client.read_ok(last, BLOCK),
        original,
        "the valid area must be untouched"
    );
    assert_usable(&mut client, 0, 13);
}

/// `NBD_CMD_FLAG_FUA`, named for the call sites.
const FUA_FLAG: u16 = NBD_CMD_FLAG_FUA;

#[test]
fn a_read_only_export_refuses_writes_trims_and_write_zeroes_with_eperm() {
    let dir = TestDir::new("read-only");
    let backing = dir.join("backing.img");
    common::write_random_file(&backing, VOLUME as usize, 77);
    let before = std::fs::read(&backing).expect("read the backing file");
    let daemon = Daemon::serve(&dir, "64MiB", &["--export", EXPORT, "--read-only"]);
    let (mut client, details) = RawClient::open(&daemon.socket, EXPORT);
    assert_ne!(
        details.transmission_flags & NBD_FLAG_READ_ONLY,
        0,
        "READ_ONLY must be advertised"
    );

    let block = |offset: u64| before[offset as usize..offset as usize + BLOCK as usize].to_vec();
    assert_eq!(
        client.write_at(0, 0, &pattern(1, BLOCK as usize)),
        eperm(),
        "WRITE"
    );
    // The payload was consumed: the next request parses.
    assert_eq!(client.read_ok(0, BLOCK), block(0));
    assert_eq!(
        client.write_at(FUA_FLAG, MIB, &pattern(2, MIB as usize)),
        eperm(),
        "1 MiB FUA WRITE"
    );
    assert_eq!(client.read_ok(MIB, BLOCK), block(MIB));
    assert_eq!(
        client.command(0, NBD_CMD_TRIM, 0, MIB as u32),
        eperm(),
        "TRIM"
    );
    assert_eq!(
        client.command(0, NBD_CMD_WRITE_ZEROES, 0, MIB as u32),
        eperm(),
        "WRITE_ZEROES"
    );
    assert_eq!(
        client.command(
            NBD_CMD_FLAG_NO_HOLE,
            NBD_CMD_WRITE_ZEROES,
            2 * MIB,
            MIB as u32
        ),
        eperm(),
        "WRITE_ZEROES NO_HOLE"
    );
    assert_eq!(
        client.command(
            NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_WRITE_ZEROES,
            2 * MIB,
            MIB as u32
        ),
        eperm(),
        "WRITE_ZEROES FAST_ZERO"
    );
    assert_eq!(client.read_ok(0, BLOCK), block(0));
    assert_eq!(client.read_ok(2 * MIB, BLOCK), block(2 * MIB));

    client.disconnect();
    assert!(client
        .try_read_reply_header()
        .expect("clean close")
        .is_none());
    let status = daemon.stop();
    assert!(status.success(), "the daemon exited with {status}");
    let after = std::fs::read(&backing).expect("read the backing file");
    assert!(
        before == after,
        "a read-only export changed its backing file"
    );
}

#[test]
fn read_larger_than_32_mib_is_einval() {
    let dir = TestDir::new("read-too-big");
    let daemon = serve(&dir);
    let mut client = open(&daemon);

    assert_eq!(
        client.read_at(0, 0, MAX_PAYLOAD + 512),
        Err(einval()),
        "READ of 32 MiB + 512"
    );
    assert_eq!(
        client.read_at(0, 0, u32::MAX),
        Err(einval()),
        "READ of 4 GiB - 1"
    );
    assert_eq!(
        client.read_at(0, 0, 0xFFFF_F000),
        Err(einval()),
        "READ of 4 GiB - 4 KiB"
    );
    // The maximum itself is allowed.
    let data = client.read_ok(0, MAX_PAYLOAD);
    assert_eq!(data.len(), MAX_PAYLOAD as usize);
    assert_usable(&mut client, 0, 5);
}

#[test]
fn write_of_33_mib_is_einval_and_its_payload_is_discarded_without_buffering() {
    let dir = TestDir::new("write-too-big");
    let daemon = serve(&dir);
    let mut client = open(&daemon);
    let pid = daemon.pid();
    // Warm up the connection's read path, then measure.
    let marker = pattern(20, BLOCK as usize);
    client.write_ok(0, &marker);
    assert_eq!(client.read_ok(0, BLOCK), marker);

    let reset_peak = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let rss_before = vm_rss_bytes(pid);
    let peak_before = vm_hwm_bytes(pid);

    let size = 33 * MIB as usize;
    let payload = pattern(21, size);
    assert_eq!(client.write_at(0, 0, &payload), einval(), "WRITE of 33 MiB");
    // The whole payload was read off the socket: the next request parses and nothing
    // of the refused payload reached the disk.
    assert_eq!(client.read_ok(0, BLOCK), marker);
    assert_eq!(client.read_ok(16 * MIB, BLOCK), vec![0u8; BLOCK as usize]);

    let rss_after = vm_rss_bytes(pid);
    let peak_after = vm_hwm_bytes(pid);
    let bound = 24 * MIB;
    assert!(
        rss_after < rss_before + bound,
        "the daemon's RSS grew from {rss_before} to {rss_after} bytes while discarding a refused 33 MiB payload"
    );
    // The peak catches a buffer that was allocated and freed again.
    let peak_base = if reset_peak { rss_before } else { peak_before };
    assert!(
        peak_after < peak_base + bound,
        "the daemon's peak RSS rose from {peak_base} to {peak_after} bytes while discarding a refused 33 MiB payload"
    );
    assert_usable(&mut client, MIB, 22);
}

/// The peak resident set size (VmHWM) of process `pid`, in bytes.
fn vm_hwm_bytes(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .expect("VmHWM line in /proc/PID/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .expect("VmHWM value");
    kib * 1024
}

#[test]
fn a_write_header_claiming_4_gib_then_a_close_does_not_hurt_the_daemon() {
    let dir = TestDir::new("write-4gib-close");
    let mut daemon = serve(&dir);

    // A header announcing 0xFFFF_FFFF bytes, a little payload, then the client is gone.
    let mut client = open(&daemon);
    let handle = client.next_handle();
    client.send_request(
        0,
        NBD_CMD_WRITE,
        handle,
        0,
        u32::MAX,
        &pattern(30, 64 * 1024),
    );
    drop(client);

    // Same with nothing after the header at all.
    let mut client = open(&daemon);
    let handle = client.next_handle();
    client.send_request(0, NBD_CMD_WRITE, handle, 0, u32::MAX, &[]);
    drop(client);

    // And a valid 16 MiB WRITE whose payload stops half-way.
    let mut client = open(&daemon);
    let handle = client.next_handle();
    client.send_request(
        0,
        NBD_CMD_WRITE,
        handle,
        0,
        16 * MIB as u32,
        &pattern(31, 8 * MIB as usize),
    );
    drop(client);

    // A client that shuts down only its sending side mid-payload gets no reply for the
    // unfinished WRITE, and then a close.
    let mut client = open(&daemon);
    let handle = client.next_handle();
    client.send_request(0, NBD_CMD_WRITE, handle, 0, u32::MAX, &pattern(32, 4096));
    client.shutdown_write();
    let received = client.read_to_eof();
    // A server may answer the refused WRITE before giving up on its payload; it must
    // not answer anything else.
    assert!(
        received.is_empty() || received.len() == 16,
        "unexpected bytes after a truncated 4 GiB WRITE: {received:02x?}"
    );

    assert_daemon_serves(&mut daemon, 33);
}

// ---- TRIM and WRITE_ZEROES of ~4 GiB (no payload, so no payload limit) ----

/// The range the big zeroing tests cover: 4 GiB - 4 KiB starting at 1 GiB.
const BIG_OFFSET: u64 = GIB;
const BIG_LENGTH: u32 = 0xFFFF_F000;

/// Starts an 8 GiB daemon (a sparse file), writes patterns inside and around the big
/// range, runs `kind` with `flags` over it, and checks the inside reads back as zeroes
/// and the outside is untouched.
fn zero_a_big_range(name: &str, kind: u16, flags: u16) {
    let dir = TestDir::new(name);
    let daemon = Daemon::serve(&dir, "8GiB", &["--export", EXPORT]);
    let (mut client, details) = RawClient::open(&daemon.socket, EXPORT);
    assert_eq!(details.size, 8 * GIB);
    let end = BIG_OFFSET + u64::from(BIG_LENGTH);
    let inside = [
        BIG_OFFSET,
        BIG_OFFSET + 4096 * 12_345,
        BIG_OFFSET + 2 * GIB,
        BIG_OFFSET + 3 * GIB + 4096 * 777,
        end - u64::from(BLOCK),
    ];
    let outside = [BIG_OFFSET - u64::from(BLOCK), end, 6 * GIB];
    for (index, offset) in inside.iter().chain(outside.iter()).enumerate() {
        client.write_ok(*offset, &pattern(100 + index as u64, BLOCK as usize));
    }

    let error = client.command(flags, kind, BIG_OFFSET, BIG_LENGTH);
    assert_eq!(
        error, 0,
        "command {kind} flags {flags:#x} over {BIG_LENGTH:#x} bytes failed"
    );

    for offset in inside {
        assert!(
            client.read_ok(offset, BLOCK).iter().all(|byte| *byte == 0),
            "block at {offset} is not zero after command {kind} flags {flags:#x}"
        );
    }
    for (index, offset) in outside.iter().enumerate() {
        let seed = 100 + (inside.len() + index) as u64;
        assert_eq!(
            client.read_ok(*offset, BLOCK),
            pattern(seed, BLOCK as usize),
            "block at {offset} outside the zeroed range changed"
        );
    }
    // A FLUSH after it all works too.
    assert_eq!(client.command(0, NBD_CMD_FLUSH, 0, 0), 0);
}

#[test]
fn trim_of_4_gib_succeeds_and_reads_back_zeroes() {
    // The spec leaves trimmed data unspecified; pairbd promises zeroes (it punches holes).
    zero_a_big_range("trim-4gib", NBD_CMD_TRIM, 0);
}

#[test]
fn write_zeroes_of_4_gib_succeeds_and_reads_back_zeroes() {
    zero_a_big_range("write-zeroes-4gib", NBD_CMD_WRITE_ZEROES, 0);
}

#[test]
fn write_zeroes_no_hole_of_4_gib_succeeds_and_reads_back_zeroes() {
    zero_a_big_range(
        "write-zeroes-no-hole-4gib",
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_FLAG_NO_HOLE,
    );
}

#[test]
fn write_zeroes_fast_zero_of_4_gib_is_accepted_on_a_sparse_file() {
    // Punching a hole in a file is fast, so FAST_ZERO must succeed here.
    zero_a_big_range(
        "write-zeroes-fast-4gib",
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_FLAG_FAST_ZERO,
    );
}

#[test]
fn write_zeroes_fast_zero_with_no_hole_is_accepted_or_refused_with_enotsup() {
    let dir = TestDir::new("fast-zero-no-hole");
    let daemon = serve(&dir);
    let mut client = open(&daemon);
    let data = pattern(40, MIB as usize);
    client.write_ok(MIB, &data);
    let error = client.command(
        NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE,
        NBD_CMD_WRITE_ZEROES,
        MIB,
        MIB as u32,
    );
    let after = client.read_ok(MIB, MIB as u32);
    if error == 0 {
        assert!(
            after.iter().all(|byte| *byte == 0),
            "FAST_ZERO|NO_HOLE succeeded but left data"
        );
    } else {
        // The spec's only allowed failure for a fast zero it cannot do fast.
        assert_eq!(
            error,
            enotsup(),
            "FAST_ZERO|NO_HOLE must succeed or fail with ENOTSUP"
        );
    }
    assert_usable(&mut client, 0, 41);
}

// ---- Flags and handles ----

#[test]
fn fua_is_accepted_on_read_flush_and_every_write() {
    let dir = TestDir::new("fua-everywhere");
    let daemon = serve(&dir);
    let mut client = open(&daemon);
    let data = pattern(50, 64 * 1024);
    assert_eq!(
        client.write_at(FUA_FLAG, 4 * MIB, &data),
        0,
        "WRITE with FUA"
    );
    assert_eq!(
        client.read_at(FUA_FLAG, 4 * MIB, 64 * 1024),
        Ok(data.clone()),
        "READ with FUA"
    );
    assert_eq!(
        client.command(FUA_FLAG, NBD_CMD_FLUSH, 0, 0),
        0,
        "FLUSH with FUA"
    );
    assert_eq!(
        client.command(FUA_FLAG, NBD_CMD_CACHE, 0, MIB as u32),
        0,
        "CACHE with FUA"
    );
    assert_eq!(
        client.command(FUA_FLAG, NBD_CMD_TRIM, 8 * MIB, MIB as u32),
        0,
        "TRIM with FUA"
    );
    assert_eq!(
        client.command(
            FUA_FLAG | NBD_CMD_FLAG_NO_HOLE,
            NBD_CMD_WRITE_ZEROES,
            4 * MIB,
            BLOCK
        ),
        0,
        "WRITE_ZEROES with FUA and NO_HOLE"
    );
    let mut expected = data;
    expected[..BLOCK as usize].fill(0);
    assert_eq!(client.read_ok(4 * MIB, 64 * 1024), expected);
}

#[test]
fn the_64_bit_handle_is_echoed_exactly() {
    let dir = TestDir::new("handles");
    let daemon = serve(&dir);
    let mut client = open(&daemon);
    let handles: [u64; 10] = [
        0,
        1,
        u64::MAX,
        0x8000_0000_0000_0000,
        0xFFFF_FFFF_0000_0000,
        0x0000_0001_0000_0000,
        0xDEAD_BEEF_CAFE_F00D,
        0x1234_5678_0000_0042,
        0x0000_0000_FFFF_FFFF,
        0x7FFF_FFFF_8000_0001,
    ];
    // Each handle on a different kind of request, pipelined, including an error reply.
    let mut expected: HashMap<u64, (u32, usize)> = HashMap::new();
    for (index, handle) in handles.iter().enumerate() {
        let offset = index as u64 * u64::from(BLOCK);
        let (kind, error, data) = match index % 5 {
            0 => (NBD_CMD_READ, 0, BLOCK as usize),
            1 => (NBD_CMD_WRITE, 0, 0),
            2 => (NBD_CMD_FLUSH, 0, 0),
            3 => (NBD_CMD_READ, einval(), 0),
            _ => (NBD_CMD_WRITE_ZEROES, 0, 0),
        };
        let (offset, payload) = match (kind, error) {
            (NBD_CMD_READ, 0) => (offset, Vec::new()),
            (NBD_CMD_READ, _) => (VOLUME, Vec::new()),
            (NBD_CMD_WRITE, _) => (offset, pattern(index as u64, BLOCK as usize)),
            _ => (offset, Vec::new()),
        };
        let (offset, length) = if kind == NBD_CMD_FLUSH {
            (0, 0)
        } else {
            (offset, BLOCK)
        };
        client.send_request(0, kind, *handle, offset, length, &payload);
        expected.insert(*handle, (error, data));
    }
    for _ in 0..handles.len() {
        let reply = client.read_reply(|handle| expected.get(&handle).map_or(0, |entry| entry.1));
        let Some((error, _)) = expected.remove(&reply.handle) else {
            panic!(
                "reply with handle {:#018x}, which was never sent or was answered twice",
                reply.handle
            );
        };
        assert_eq!(
            reply.error, error,
            "error for handle {:#018x}",
            reply.handle
        );
    }
    assert!(expected.is_empty());
}

// ---- Pipelining and disconnects ----

#[test]
fn two_hundred_pipelined_requests_are_each_answered_exactly_once() {
    let dir = TestDir::new("pipeline-200");
    let daemon = serve(&dir);
    let mut client = open(&daemon);
    const PREFILLED: u64 = 50;
    for block in 0..PREFILLED {
        client.write_ok(
            block * u64::from(BLOCK),
            &pattern(1000 + block, BLOCK as usize),
        );
    }

    // Even requests write distinct fresh blocks, odd ones read prefilled blocks (never
    // a block written in the same pipeline: their order is not guaranteed).
    let mut expected: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
    let mut written = Vec::new();
    for index in 0..200u64 {
        let handle = client.next_handle();
        if index % 2 == 0 {
            let offset = (1000 + index) * u64::from(BLOCK);
            let data = pattern(5000 + index, BLOCK as usize);
            client.send_request(0, NBD_CMD_WRITE, handle, offset, BLOCK, &data);
            written.push((offset, data));
            expected.insert(handle, None);
        } else {
            let block = (index / 2) % PREFILLED;
            client.send_request(
                0,
                NBD_CMD_READ,
                handle,
                block * u64::from(BLOCK),
                BLOCK,
                &[],
            );
            expected.insert(handle, Some(pattern(1000 + block, BLOCK as usize)));
        }
    }
    let mut answered = HashSet::new();
    for _ in 0..200 {
        let reply = client.read_reply(|handle| match expected.get(&handle) {
            Some(Some(_)) => BLOCK as usize,
            _ => 0,
        });
        assert!(
            answered.insert(reply.handle),
            "handle {:#018x} answered twice",
            reply.handle
        );
        let Some(want) = expected.get(&reply.handle) else {
            panic!("reply for unknown handle {:#018x}", reply.handle);
        };
        assert_eq!(reply.error, 0, "request {:#018x} failed", reply.handle);
        if let Some(data) = want {
            assert!(
                &reply.data == data,
                "READ {:#018x} returned wrong data",
                reply.handle
            );
        }
    }
    assert_eq!(answered.len(), 200);
    for (offset, data) in written {
        assert_eq!(
            client.read_ok(offset, BLOCK),
            data,
            "pipelined WRITE at {offset}"
        );
    }
}

#[test]
fn disc_after_pipelined_requests_answers_them_all_then_closes() {
    let dir = TestDir::new("disc-pipelined");
    let daemon = serve(&dir);
    let mut client = open(&daemon);
    let mut expected: HashMap<u64, usize> = HashMap::new();
    let mut written = Vec::new();
    for index in 0..24u64 {
        let handle = client.next_handle();
        let offset = index * 64 * 1024;
        if index % 3 == 2 {
            client.send_request(0, NBD_CMD_READ, handle, offset + 32 * MIB, 64 * 1024, &[]);
            expected.insert(handle, 64 * 1024);
        } else {
            let data = pattern(200 + index, 64 * 1024);
            client.send_request(0, NBD_CMD_WRITE, handle, offset, 64 * 1024, &data);
            written.push((offset, data));
            expected.insert(handle, 0);
        }
    }
    let handle = client.next_handle();
    client.send_request(0, NBD_CMD_FLUSH, handle, 0, 0, &[]);
    expected.insert(handle, 0);
    client.disconnect();

    let total = expected.len();
    for _ in 0..total {
        let reply = client.read_reply(|handle| expected.get(&handle).copied().unwrap_or(0));
        assert!(
            expected.remove(&reply.handle).is_some(),
            "reply for handle {:#018x}, unknown or answered twice",
            reply.handle
        );
        assert_eq!(reply.error, 0);
    }
    // NBD_CMD_DISC has no reply; the server closes after the last one.
    match client.try_read_reply_header() {
        Ok(None) => {}
        Ok(Some(reply)) => panic!("a reply after every request was answered: {reply:?}"),
        Err(error) => panic!("expected a clean close after NBD_CMD_DISC: {error}"),
    }

    let mut check = open(&daemon);
    for (offset, data) in written {
        assert_eq!(
            check.read_ok(offset, 64 * 1024),
            data,
            "WRITE at {offset} before DISC"
        );
    }
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let dir = TestDir::new("bad-magic");
    let mut daemon = serve(&dir);
    let mut good = open(&daemon);
    let mut bad = open(&daemon);

    // A request in flight on the good connection while the other one misbehaves.
    let data = pattern(60, BLOCK as usize);
    let handle = good.next_handle();
    good.send_request(0, NBD_CMD_WRITE, handle, 0, BLOCK, &data);

    let mut garbage = [0u8; 28];
    garbage[..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    garbage[4..].copy_from_slice(&pattern(61, 24));
    bad.send_raw(&garbage);
    bad.expect_closed("after a request with a bad magic");

    let reply = good.read_reply(|_| 0);
    assert_eq!((reply.handle, reply.error), (handle, 0));
    assert_eq!(good.read_ok(0, BLOCK), data);
    assert_usable(&mut good, MIB, 62);

    // A reply magic instead of a request magic, and a request magic with its bytes
    // swapped, are bad magics too.
    for magic in [NBD_SIMPLE_REPLY_MAGIC, NBD_REQUEST_MAGIC.swap_bytes()] {
        let mut bad = open(&daemon);
        let mut header = [0u8; 28];
        header[..4].copy_from_slice(&magic.to_be_bytes());
        bad.send_raw(&header);
        bad.expect_closed("after a request with a bad magic");
    }
    assert_usable(&mut good, 2 * MIB, 63);
    assert_daemon_serves(&mut daemon, 64);
}

#[test]
fn unknown_command_types_are_einval_and_the_connection_stays_usable() {
    let dir = TestDir::new("unknown-command");
    let daemon = serve(&dir);
    let mut client = open(&daemon);
    // BLOCK_STATUS and RESIZE were never negotiated; the others do not exist.
    for kind in [
        NBD_CMD_BLOCK_STATUS,
        NBD_CMD_RESIZE,
        9,
        0x00FF,
        0x7FFF,
        0xFFFF,
    ] {
        assert_eq!(
            client.command(0, kind, 0, BLOCK),
            einval(),
            "command type {kind}"
        );
        assert_usable(
            &mut client,
            u64::from(kind) * 4096 % VOLUME,
            70 + u64::from(kind),
        );
    }
}

#[test]
fn clients_vanishing_with_requests_in_flight_do_not_hurt_the_daemon() {
    let dir = TestDir::new("vanishing");
    let mut daemon = serve(&dir);
    for round in 0..3u64 {
        let mut client = open(&daemon);
        for index in 0..50u64 {
            let handle = client.next_handle();
            let offset = (round * 50 + index) * u64::from(BLOCK);
            client.send_request(
                0,
                NBD_CMD_WRITE,
                handle,
                offset,
                BLOCK,
                &pattern(round * 100 + index, 4096),
            );
        }
        // Some reads whose replies will never be read, then gone.
        for index in 0..10u64 {
            let handle = client.next_handle();
            client.send_request(0, NBD_CMD_READ, handle, index * MIB, MIB as u32, &[]);
        }
        drop(client);
    }
    assert_daemon_serves(&mut daemon, 80);
}

// ---- Handshake ----

#[test]
fn truncated_handshakes_do_not_hurt_the_daemon() {
    let dir = TestDir::new("truncated-handshake");
    let mut daemon = serve(&dir);

    // Gone before reading the greeting.
    drop(RawClient::connect_raw(&daemon.socket));
    // Half the client flags.
    let mut client = RawClient::connect_greeting_only(&daemon.socket);
    client.send_raw(&CLIENT_FLAGS_BYTES[..2]);
    drop(client);
    // Half an option header.
    let mut client = RawClient::connect(&daemon.socket);
    client.send_raw(&IHAVEOPT.to_be_bytes()[..8]);
    client.send_raw(&NBD_OPT_GO.to_be_bytes()[..2]);
    drop(client);
    // A GO header announcing 100 bytes of data, then only 10 of them.
    let mut client = RawClient::connect(&daemon.socket);
    client.send_raw(&IHAVEOPT.to_be_bytes());
    client.send_raw(&NBD_OPT_GO.to_be_bytes());
    client.send_raw(&100u32.to_be_bytes());
    client.send_raw(&[0u8; 10]);
    drop(client);
    // A half-sent EXPORT_NAME.
    let mut client = RawClient::connect(&daemon.socket);
    client.send_raw(&IHAVEOPT.to_be_bytes());
    client.send_raw(&NBD_OPT_EXPORT_NAME.to_be_bytes());
    client.send_raw(&1u32.to_be_bytes());
    drop(client);
    // In transmission, half a request header.
    let mut client = open(&daemon);
    client.send_raw(&NBD_REQUEST_MAGIC.to_be_bytes());
    client.send_raw(&[0u8; 10]);
    drop(client);
    // The same cuts, but half-closing so the server sees EOF while we still listen:
    // it must close its side too.
    let mut client = RawClient::connect_greeting_only(&daemon.socket);
    client.send_raw(&CLIENT_FLAGS_BYTES[..3]);
    client.shutdown_write();
    client.expect_closed("after half the client flags and EOF");
    let mut client = RawClient::connect(&daemon.socket);
    client.send_raw(&IHAVEOPT.to_be_bytes()[..5]);
    client.shutdown_write();
    client.expect_closed("after half an option header and EOF");

    assert_daemon_serves(&mut daemon, 90);
}

/// The usual client flags, as bytes on the wire.
const CLIENT_FLAGS_BYTES: [u8; 4] = raw_client::CLIENT_FLAGS.to_be_bytes();

#[test]
fn a_stalled_handshake_does_not_block_other_clients() {
    let dir = TestDir::new("stalled-handshake");
    let mut daemon = serve(&dir);
    // Three clients stuck at different points of the handshake, all kept open.
    let silent = RawClient::connect_raw(&daemon.socket);
    let greeted = RawClient::connect_greeting_only(&daemon.socket);
    let mut half_option = RawClient::connect(&daemon.socket);
    half_option.send_raw(&IHAVEOPT.to_be_bytes());
    half_option.send_raw(&NBD_OPT_GO.to_be_bytes());
    half_option.send_raw(&64u32.to_be_bytes());
    half_option.send_raw(&[0u8; 6]);
    // One stuck in transmission, half-way through a WRITE payload.
    let mut half_write = open(&daemon);
    let handle = half_write.next_handle();
    half_write.send_request(0, NBD_CMD_WRITE, handle, 0, MIB as u32, &pattern(91, 4096));

    // Others attach, list, and do I/O meanwhile.
    let mut lister = RawClient::connect(&daemon.socket);
    let names = parse_list_replies(&lister.opt(NBD_OPT_LIST, &[]));
    assert!(
        names.iter().any(|name| name == EXPORT),
        "NBD_OPT_LIST gave {names:?}"
    );
    lister.go(EXPORT);
    assert_usable(&mut lister, 4 * MIB, 92);
    assert_daemon_serves(&mut daemon, 93);

    drop((silent, greeted, half_option, half_write));
    assert_daemon_serves(&mut daemon, 94);
}

#[test]
fn unsupported_options_get_err_unsup_and_the_handshake_continues() {
    let dir = TestDir::new("unsupported-options");
    let daemon = serve(&dir);
    let mut client = RawClient::connect(&daemon.socket);
    let unsupported: [(u32, &[u8]); 9] = [
        (0x1234_5678, b"junk data"),
        (0xFFFF_FFFF, b""),
        (0, b""),
        (NBD_OPT_PEEK_EXPORT, b""),
        (NBD_OPT_STARTTLS, b""),
        (NBD_OPT_STRUCTURED_REPLY, b""),
        (NBD_OPT_LIST_META_CONTEXT, &[0, 0, 0, 1, b'x', 0, 0, 0, 0]),
        (
            NBD_OPT_SET_META_CONTEXT,
            &[
                0, 0, 0, 1, b'x', 0, 0, 0, 1, 0, 0, 0, 4, b'b', b'a', b's', b'e',
            ],
        ),
        (NBD_OPT_EXTENDED_HEADERS, b""),
    ];
    for (code, data) in unsupported {
        let replies = client.opt(code, data);
        assert_eq!(replies.len(), 1, "option {code:#x}: {replies:?}");
        assert_eq!(
            replies[0].reply_type, NBD_REP_ERR_UNSUP,
            "option {code:#x}: {replies:?}"
        );
    }
    let details = client.go(EXPORT);
    assert_eq!(details.size, VOLUME);
    assert_usable(&mut client, 0, 100);
    // Structured replies were refused, so a READ still gets a simple reply (which the
    // client checks by its magic).
    assert_eq!(client.read_ok(0, BLOCK).len(), BLOCK as usize);
}

#[test]
fn info_and_go_with_an_unknown_export_get_err_unknown_and_the_handshake_continues() {
    let dir = TestDir::new("unknown-export-go");
    let daemon = serve(&dir);
    let mut client = RawClient::connect(&daemon.socket);
    for code in [NBD_OPT_INFO, NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_GO] {
        for name in ["nope", "x2", "X", "x\0"] {
            let replies = client.opt_info(code, name);
            let last = replies.last().expect("a reply");
            assert_eq!(
                last.reply_type, NBD_REP_ERR_UNKNOWN,
                "option {code} {name:?}: {replies:?}"
            );
            assert!(
                replies.iter().all(|reply| reply.reply_type != NBD_REP_ACK),
                "option {code} {name:?} acknowledged: {replies:?}"
            );
        }
    }
    let replies = client.opt_info(NBD_OPT_INFO, EXPORT);
    assert_eq!(
        replies.last().expect("a reply").reply_type,
        NBD_REP_ACK,
        "{replies:?}"
    );
    assert_eq!(
        parse_info_replies(&replies).expect("NBD_INFO_EXPORT").size,
        VOLUME
    );
    client.go(EXPORT);
    assert_usable(&mut client, 0, 110);
}

#[test]
fn export_name_with_an_unknown_export_closes_the_connection() {
    let dir = TestDir::new("unknown-export-name");
    let mut daemon = serve(&dir);
    let mut client = RawClient::connect(&daemon.socket);
    match client.export_name("nope") {
        Ok(details) => panic!("NBD_OPT_EXPORT_NAME \"nope\" was accepted: {details:?}"),
        Err(error) => assert!(
            matches!(
                error.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            "expected the server to close the connection, got {error}"
        ),
    }
    // A bogus EXPORT_NAME after some options also closes.
    let mut client = RawClient::connect(&daemon.socket);
    let _ = client.opt(NBD_OPT_LIST, &[]);
    assert!(
        client.export_name("y").is_err(),
        "EXPORT_NAME \"y\" was accepted"
    );
    assert_daemon_serves(&mut daemon, 120);
}

#[test]
fn the_empty_name_reaches_the_default_export() {
    let dir = TestDir::new("empty-name");
    let daemon = serve(&dir);
    let mut named = open(&daemon);
    let data = pattern(130, BLOCK as usize);
    named.write_ok(0, &data);

    // NBD_OPT_GO "": the full advertisement.
    let mut client = RawClient::connect(&daemon.socket);
    assert_eq!(
        client.handshake_flags,
        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
        "handshake flags"
    );
    let info =
        parse_info_replies(&client.opt_info(NBD_OPT_INFO, "")).expect("NBD_OPT_INFO \"\" answered");
    let details = client.go("");
    assert_eq!(info, details, "INFO and GO describe the same export");
    assert_eq!(details.size, VOLUME);
    let expected_flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_FAST_ZERO
        | NBD_FLAG_SEND_CACHE
        | NBD_FLAG_CAN_MULTI_CONN;
    assert_eq!(
        details.transmission_flags, expected_flags,
        "transmission flags"
    );
    assert_eq!(
        details.block_sizes,
        Some((512, 4096, MAX_PAYLOAD)),
        "block sizes"
    );
    assert_eq!(client.read_ok(0, BLOCK), data);

    // NBD_OPT_EXPORT_NAME "": size and flags, no zero padding (NO_ZEROES).
    let mut old_style = RawClient::connect(&daemon.socket);
    let details = old_style
        .export_name("")
        .expect("EXPORT_NAME \"\" accepted");
    assert_eq!(details.size, VOLUME);
    assert_eq!(details.transmission_flags, expected_flags);
    assert_eq!(old_style.read_ok(0, BLOCK), data);
    assert_usable(&mut old_style, MIB, 131);
    assert_eq!(named.read_ok(MIB, BLOCK), pattern(131, BLOCK as usize));

    // EXPORT_NAME with the real name works too.
    let mut by_name = RawClient::connect(&daemon.socket);
    assert_eq!(
        by_name.export_name(EXPORT).expect("EXPORT_NAME x").size,
        VOLUME
    );
    assert_eq!(by_name.read_ok(0, BLOCK), data);
}

#[test]
fn opt_list_lists_the_export() {
    let dir = TestDir::new("opt-list");
    let daemon = serve(&dir);
    let mut client = RawClient::connect(&daemon.socket);
    let replies = client.opt(NBD_OPT_LIST, &[]);
    assert_eq!(
        replies.last().expect("a reply").reply_type,
        NBD_REP_ACK,
        "{replies:?}"
    );
    assert_eq!(
        parse_list_replies(&replies),
        vec![EXPORT.to_string()],
        "{replies:?}"
    );
    // LIST with data is invalid, and answered with an error.
    let replies = client.opt(NBD_OPT_LIST, b"junk");
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert!(
        replies[0].is_error(),
        "NBD_OPT_LIST with data must fail: {replies:?}"
    );
    // And again, then on to GO.
    assert_eq!(
        parse_list_replies(&client.opt(NBD_OPT_LIST, &[])),
        vec![EXPORT.to_string()]
    );
    client.go(EXPORT);
    assert_usable(&mut client, 0, 140);
}

#[test]
fn opt_abort_is_acknowledged_and_closes() {
    let dir = TestDir::new("opt-abort");
    let mut daemon = serve(&dir);
    let mut client = RawClient::connect(&daemon.socket);
    client.send_option(NBD_OPT_ABORT, &[]);
    // The spec wants an ACK, but a client must cope with a plain close too.
    match client.try_read_option_reply(NBD_OPT_ABORT) {
        Ok(reply) => {
            assert_eq!(reply.reply_type, NBD_REP_ACK, "{reply:?}");
            client.expect_closed("after acknowledging NBD_OPT_ABORT");
        }
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}"),
    }
    assert_daemon_serves(&mut daemon, 150);
}

#[test]
fn an_option_with_a_1_mib_payload_gets_an_error_or_a_close_and_the_daemon_survives() {
    let dir = TestDir::new("option-1mib");
    let mut daemon = serve(&dir);
    let big = pattern(160, MIB as usize);
    let info_data = raw_client_info_with_name(&big);
    let cases: [(u32, &[u8]); 5] = [
        (0x4242, &big),
        (NBD_OPT_GO, &info_data),
        (NBD_OPT_INFO, &info_data),
        (NBD_OPT_LIST, &big),
        (NBD_OPT_EXPORT_NAME, &big),
    ];
    for (code, data) in cases {
        let mut client = RawClient::connect(&daemon.socket);
        // The server may close while we are still sending.
        let sent = client.try_send_option(code, data);
        match client.try_read_option_reply(code) {
            Ok(reply) => {
                assert!(
                    reply.is_error(),
                    "option {code} with 1 MiB of data succeeded: {reply:?}"
                );
                assert_ne!(
                    code, NBD_OPT_EXPORT_NAME,
                    "EXPORT_NAME cannot be answered with an option reply"
                );
                // It answered, so it must have consumed the data: the handshake goes on.
                assert!(
                    sent.is_ok(),
                    "the server answered before reading the option: {sent:?}"
                );
                client.go(EXPORT);
                assert_usable(&mut client, 0, 161 + u64::from(code));
            }
            Err(error) => assert!(
                matches!(
                    error.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "option {code} with 1 MiB of data: expected an error reply or a close, got {error}"
            ),
        }
    }
    assert_daemon_serves(&mut daemon, 170);
}

/// The data of NBD_OPT_INFO/GO naming `name` and asking for nothing extra.
fn raw_client_info_with_name(name: &[u8]) -> Vec<u8> {
    pairbd_nbd_proto::client::encode_info_request(name, &[])
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let dir = TestDir::new("unknown-client-flags");
    let mut daemon = serve(&dir);
    for flags in [
        raw_client::CLIENT_FLAGS | 1 << 2,
        raw_client::CLIENT_FLAGS | 1 << 31,
        0xFFFF_FFFF,
    ] {
        let mut client = RawClient::connect_greeting_only(&daemon.socket);
        client.send_client_flags(flags);
        // Whatever we send next must not be answered.
        let _ = client.try_send_option(NBD_OPT_LIST, &[]);
        client.expect_closed(&format!("after client flags {flags:#010x}"));
    }
    assert_daemon_serves(&mut daemon, 180);
}

// ---- Shutdown ----

#[test]
fn sigterm_answers_every_accepted_request_then_exits_zero_and_the_data_survives_a_restart() {
    let dir = TestDir::new("sigterm-pending");
    let daemon = serve(&dir);
    let mut client = open(&daemon);
    // Earlier data, acknowledged before the signal.
    let early = pattern(190, 4 * MIB as usize);
    client.write_ok(40 * MIB, &early);

    // 40 READs of 1 MiB first: their 40 MiB of replies cannot fit in the socket buffers
    // while we read nothing, so the server holds accepted requests with replies pending
    // when the signal arrives. Then 50 WRITEs, whose replies queue behind them.
    let mut reads: HashMap<u64, Vec<u8>> = HashMap::new();
    for index in 0..40u64 {
        let handle = client.next_handle();
        let piece = index % 4;
        client.send_request(
            0,
            NBD_CMD_READ,
            handle,
            40 * MIB + piece * MIB,
            MIB as u32,
            &[],
        );
        reads.insert(
            handle,
            early[(piece * MIB) as usize..((piece + 1) * MIB) as usize].to_vec(),
        );
    }
    let mut pending: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
    for index in 0..50u64 {
        let handle = client.next_handle();
        let offset = index * 128 * 1024;
        let data = pattern(2000 + index, 64 * 1024);
        client.send_request(0, NBD_CMD_WRITE, handle, offset, 64 * 1024, &data);
        pending.insert(handle, (offset, data));
    }
    // One reply proves the server is working on them; then the signal.
    let mut answered = Vec::new();
    let mut check_reply = |client: &mut RawClient, handle: u64, error: u32| {
        assert_eq!(error, 0, "request {handle:#018x} failed during shutdown");
        if let Some(expected) = reads.remove(&handle) {
            let data = client.read_data(MIB as usize);
            assert!(
                data == expected,
                "READ {handle:#018x} returned wrong data during shutdown"
            );
        } else if let Some(write) = pending.remove(&handle) {
            answered.push(write);
        } else {
            panic!("reply for handle {handle:#018x}, unknown or answered twice");
        }
    };
    let (handle, error) = client.read_reply_header();
    check_reply(&mut client, handle, error);
    common::signal(daemon.pid(), "TERM");

    // Every request the server accepted is answered, then it closes at a reply boundary.
    loop {
        match client.try_read_reply_header() {
            Ok(Some((handle, error))) => check_reply(&mut client, handle, error),
            Ok(None) => break,
            Err(error) => panic!("the connection broke inside a reply during shutdown: {error}"),
        }
    }
    let status = daemon.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "the daemon must exit with status 0 after SIGTERM, got {status}"
    );

    let daemon = serve(&dir);
    let mut client = open(&daemon);
    assert_eq!(
        client.read_ok(40 * MIB, 4 * MIB as u32),
        early,
        "data acknowledged before SIGTERM"
    );
    for (offset, data) in &answered {
        assert_eq!(
            &client.read_ok(*offset, 64 * 1024),
            data,
            "WRITE at {offset} acknowledged during shutdown"
        );
    }
    // A WRITE that was never answered must not have been executed: the server either
    // did not accept it (nothing written) or accepted it and then owed a reply.
    for (offset, data) in pending.values() {
        let on_disk = client.read_ok(*offset, 64 * 1024);
        assert!(
            on_disk.iter().all(|byte| *byte == 0),
            "WRITE at {offset} reached the disk but was never answered (equal to its payload: {})",
            &on_disk == data
        );
    }
    let status = daemon.stop();
    assert!(status.success(), "second daemon exited with {status}");
}
