//! Regression tests for the published vulnerabilities of other NBD servers
//! (nbd-server, qemu-nbd, nbdkit), replayed against the real `pairbd serve`.
//! Each test names the CVE and the input that hurt that server; pairbd must
//! answer it correctly (an error reply, or a closed connection where the
//! framing is lost), keep its memory bounded, and go on serving everyone
//! else. tests/bad_input.rs covers the general rules; these are the shapes
//! that broke real servers.

mod common;
#[path = "common/raw_client.rs"]
mod raw_client;

use std::io::{Read, Write};

use common::{Daemon, TestDir};
use pairbd_nbd_proto::consts::*;
use raw_client::{pattern, vm_rss_bytes, RawClient};

const MIB: u64 = 1024 * 1024;
const EXPORT: &str = "x";

fn serve(dir: &TestDir) -> Daemon {
    Daemon::serve(dir, "64MiB", &["--export", EXPORT])
}

/// An option header claiming `length` bytes of data (which may not follow).
fn option_header(code: u32, length: u32) -> Vec<u8> {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b
}

/// NBD_OPT_INFO/GO data with a name-length field that need not be true.
fn info_data(claimed_name_len: u32, name: &[u8], info_count: u16, infos: &[u16]) -> Vec<u8> {
    let mut d = claimed_name_len.to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&info_count.to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// After an error reply, the same handshake still reaches the export and
/// does I/O.
fn still_works(client: &mut RawClient, seed: u64) {
    client.go(EXPORT);
    let data = pattern(seed, 4096);
    client.write_ok(MIB, &data);
    assert_eq!(client.read_ok(MIB, 4096), data);
}

/// The daemon runs, logged no panic, and a new client works.
fn serves(daemon: &mut Daemon, seed: u64) {
    assert!(
        daemon.is_running(),
        "the daemon died:\n{}",
        daemon.log_text()
    );
    assert!(
        !daemon.log_text().contains("panicked"),
        "{}",
        daemon.log_text()
    );
    let mut c = RawClient::connect(&daemon.socket);
    still_works(&mut c, seed);
}

/// An error reply, or the connection closed: never success, never a hang.
fn error_or_close(client: &mut RawClient, code: u32) -> bool {
    match client.try_read_option_reply(code) {
        Ok(reply) => {
            assert!(reply.is_error(), "option {code}: {reply:?}");
            true
        }
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "option {code}: {e}"
            );
            false
        }
    }
}

/// CVE-2022-26495 and CVE-2022-26496 (nbd-server < 3.24): the name length
/// inside NBD_OPT_INFO/GO was trusted — an integer overflow and a stack
/// buffer overflow.
#[test]
fn cve_2022_26495_26496_a_name_length_beyond_the_option() {
    let dir = TestDir::new("cve-2022-26495");
    let mut daemon = serve(&dir);
    for code in [NBD_OPT_INFO, NBD_OPT_GO] {
        for claimed in [u32::MAX, u32::MAX - 3, 5, 0x8000_0000] {
            let mut client = RawClient::connect(&daemon.socket);
            client.send_option(code, &info_data(claimed, b"x", 0, &[]));
            if error_or_close(&mut client, code) {
                still_works(&mut client, u64::from(claimed));
            }
        }
    }
    serves(&mut daemon, 1);
}

/// CVE-2017-15118 (qemu-nbd): an export name over 4 KiB in NBD_OPT_INFO/GO
/// overflowed a stack buffer.
#[test]
fn cve_2017_15118_an_8_kib_export_name() {
    let dir = TestDir::new("cve-2017-15118");
    let mut daemon = serve(&dir);
    let name = vec![b'a'; 8192];
    for code in [NBD_OPT_INFO, NBD_OPT_GO] {
        let mut client = RawClient::connect(&daemon.socket);
        client.send_option(code, &info_data(8192, &name, 0, &[]));
        if error_or_close(&mut client, code) {
            still_works(&mut client, 2);
        }
    }
    // EXPORT_NAME with the same name: the spec's only answer is a close.
    let mut client = RawClient::connect(&daemon.socket);
    assert!(client
        .export_name(&String::from_utf8(name).unwrap())
        .is_err());
    serves(&mut daemon, 3);
}

/// CVE-2017-15119 (qemu-nbd): an option claiming up to 4 GiB of data was
/// read and discarded byte by byte — a denial of service. pairbd must refuse
/// it without waiting for the 4 GiB (a close, or an error then a close).
#[test]
fn cve_2017_15119_an_option_claiming_4_gib() {
    let dir = TestDir::new("cve-2017-15119");
    let mut daemon = serve(&dir);
    for code in [0x4242, NBD_OPT_GO, NBD_OPT_LIST] {
        let mut client = RawClient::connect(&daemon.socket);
        let mut bytes = option_header(code, u32::MAX);
        bytes.extend_from_slice(&vec![0u8; 64 * 1024]);
        let _ = client.try_send_raw(&bytes);
        // The client keeps its end open and sends nothing more: a server that
        // waits for the rest never answers, and the read times out (failing).
        let mut rest = Vec::new();
        let mut s = client.stream();
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert!(
                e.kind() == std::io::ErrorKind::ConnectionReset,
                "option {code} claiming 4 GiB: the server neither answered nor closed: {e}"
            ),
        }
    }
    serves(&mut daemon, 4);
}

/// CVE-2017-7539 (qemu-nbd): malformed option data and clients leaving in
/// the middle of an option crashed the server (assertion failures).
#[test]
fn cve_2017_7539_malformed_and_truncated_options() {
    let dir = TestDir::new("cve-2017-7539");
    let mut daemon = serve(&dir);
    let cases: Vec<(u32, Vec<u8>)> = vec![
        // Too short to hold the name length.
        (NBD_OPT_GO, vec![0, 0]),
        // The info count claims 1000 requests that are not there.
        (NBD_OPT_GO, info_data(1, b"x", 1000, &[])),
        // An odd number of bytes of info requests.
        (NBD_OPT_INFO, {
            let mut d = info_data(1, b"x", 1, &[NBD_INFO_BLOCK_SIZE]);
            d.push(0);
            d
        }),
        // LIST and ABORT must carry no data.
        (NBD_OPT_LIST, vec![1, 2, 3]),
        (NBD_OPT_ABORT, vec![9; 16]),
    ];
    for (code, data) in cases {
        let mut client = RawClient::connect(&daemon.socket);
        client.send_option(code, &data);
        if code == NBD_OPT_ABORT {
            // The spec: ignore ABORT's data, acknowledge, close.
            if let Ok(r) = client.try_read_option_reply(code) {
                assert_eq!(r.reply_type, NBD_REP_ACK);
            }
            client.expect_closed("after NBD_OPT_ABORT");
        } else if error_or_close(&mut client, code) {
            still_works(&mut client, 5 + u64::from(code));
        }
    }
    // Leaving in the middle of an option's data, at every few bytes.
    let full = option_header(NBD_OPT_GO, 11)
        .into_iter()
        .chain(info_data(1, b"x", 1, &[NBD_INFO_BLOCK_SIZE]))
        .collect::<Vec<u8>>();
    for cut in 1..full.len() {
        let mut client = RawClient::connect(&daemon.socket);
        client.send_raw(&full[..cut]);
        drop(client);
    }
    serves(&mut daemon, 6);
}

/// CVE-2019-14850 (nbdkit): every NBD_OPT_INFO opened a backend, so a
/// client repeating it exhausted resources. pairbd answers each INFO from
/// what it knows, caps the options of one handshake (256), and closes the
/// connection past the cap; memory stays where it was.
#[test]
fn cve_2019_14850_thousands_of_info_requests_in_one_handshake() {
    let dir = TestDir::new("cve-2019-14850");
    let mut daemon = serve(&dir);
    let before = vm_rss_bytes(daemon.pid());
    for _ in 0..4 {
        let mut client = RawClient::connect(&daemon.socket);
        let data = info_data(1, b"x", 0, &[]);
        let mut one = option_header(NBD_OPT_INFO, data.len() as u32);
        one.extend_from_slice(&data);
        let batch: Vec<u8> = std::iter::repeat_n(one.as_slice(), 1000)
            .flatten()
            .copied()
            .collect();
        // The server may close while we are still sending.
        let _ = client.try_send_raw(&batch);
        let mut answered = 0;
        while let Ok(reply) = client.try_read_option_reply(NBD_OPT_INFO) {
            if reply.reply_type == NBD_REP_ACK {
                answered += 1;
            } else {
                assert!(!reply.is_error(), "{reply:?}");
            }
        }
        assert_eq!(
            answered, 256,
            "the first 256 INFOs are answered, then a close"
        );
    }
    let after = vm_rss_bytes(daemon.pid());
    assert!(
        after < before + 32 * MIB,
        "4,000 INFOs grew the daemon from {before} to {after} bytes"
    );
    serves(&mut daemon, 8);
}

/// CVE-2019-14851 (nbdkit): NBD_OPT_INFO followed by other options and GO hit
/// an assertion. Every order of INFO, unknown INFO, LIST and GO works.
#[test]
fn cve_2019_14851_info_list_and_go_in_any_order() {
    let dir = TestDir::new("cve-2019-14851");
    let mut daemon = serve(&dir);
    let mut client = RawClient::connect(&daemon.socket);
    for (code, name) in [
        (NBD_OPT_INFO, EXPORT),
        (NBD_OPT_INFO, "nope"),
        (NBD_OPT_INFO, ""),
        (NBD_OPT_LIST, ""),
        (NBD_OPT_INFO, EXPORT),
        (NBD_OPT_GO, "nope"),
    ] {
        let replies = if code == NBD_OPT_LIST {
            client.opt(code, &[])
        } else {
            client.opt_info(code, name)
        };
        let last = replies.last().unwrap();
        assert_eq!(
            last.reply_type == NBD_REP_ACK,
            name != "nope",
            "{code} {name:?}: {replies:?}"
        );
    }
    still_works(&mut client, 9);
    serves(&mut daemon, 10);
}

/// CVE-2021-3716 (nbdkit): options sent in plaintext right behind STARTTLS
/// were honoured. pairbd offers no TLS on NBD (ERR_UNSUP) and keeps no
/// state from a refused option: the injected STRUCTURED_REPLY is refused too,
/// and transmission uses simple replies.
#[test]
fn cve_2021_3716_options_injected_behind_starttls() {
    let dir = TestDir::new("cve-2021-3716");
    let mut daemon = serve(&dir);
    let mut client = RawClient::connect(&daemon.socket);
    let mut bytes = option_header(NBD_OPT_STARTTLS, 0);
    bytes.extend(option_header(NBD_OPT_STRUCTURED_REPLY, 0));
    client.send_raw(&bytes);
    let r = client.read_option_reply(NBD_OPT_STARTTLS);
    assert_eq!(r.reply_type, NBD_REP_ERR_UNSUP);
    let r = client.read_option_reply(NBD_OPT_STRUCTURED_REPLY);
    assert_eq!(r.reply_type, NBD_REP_ERR_UNSUP);
    // still_works reads simple replies: a structured one would fail it.
    still_works(&mut client, 11);
    serves(&mut daemon, 12);
}

/// CVE-2005-3534 and CVE-2011-0530 (nbd-server): a request length larger
/// than the server's buffer overflowed it. A READ or WRITE of 4 GiB - 1 is
/// EINVAL, and the WRITE's announced payload never arrives, so the server
/// must not wait to buffer it either.
#[test]
fn cve_2005_3534_2011_0530_requests_of_4_gib() {
    let dir = TestDir::new("cve-2005-3534");
    let mut daemon = serve(&dir);
    let (mut client, _) = RawClient::open(&daemon.socket, EXPORT);
    assert_eq!(
        client.command(0, NBD_CMD_READ, 0, u32::MAX),
        pairbd_nbd_proto::NbdError::Inval.errno()
    );
    still_works_in_transmission(&mut client, 13);
    // A WRITE header claiming 4 GiB - 1, a little data, then a close.
    let (mut client, _) = RawClient::open(&daemon.socket, EXPORT);
    let h = client.next_handle();
    let _ = client.try_send_request(0, NBD_CMD_WRITE, h, 0, u32::MAX, &[0u8; 4096]);
    drop(client);
    serves(&mut daemon, 14);
}

fn still_works_in_transmission(client: &mut RawClient, seed: u64) {
    let data = pattern(seed, 4096);
    client.write_ok(2 * MIB, &data);
    assert_eq!(client.read_ok(2 * MIB, 4096), data);
}

/// A reply flood: a client pipelines thousands of 1 MiB READs and reads no
/// reply. The server stops reading at its in-flight bound instead of
/// buffering gigabytes of replies; when the client finally reads, every
/// request is answered.
#[test]
fn a_reply_flood_is_bounded_by_backpressure() {
    let dir = TestDir::new("cve-reply-flood");
    let mut daemon = serve(&dir);
    let pid = daemon.pid();
    let before = vm_rss_bytes(pid);
    let (client, _) = RawClient::open(&daemon.socket, EXPORT);
    let mut writer = client.stream().try_clone().unwrap();
    writer.set_nonblocking(true).unwrap();
    let total = 4000u32;
    let mut sent = 0u32;
    let mut pending: Vec<u8> = Vec::new();
    let header = |i: u32| {
        pairbd_nbd_proto::transmission::encode_request_header(
            &pairbd_nbd_proto::transmission::RequestHeader {
                flags: 0,
                kind: NBD_CMD_READ,
                handle: u64::from(i),
                offset: (u64::from(i) % 60) * MIB,
                length: MIB as u32,
            },
        )
    };
    // Send until the socket pushes back (the server stopped reading).
    loop {
        if pending.is_empty() {
            if sent == total {
                break;
            }
            pending.extend_from_slice(&header(sent));
            sent += 1;
        }
        match writer.write(&pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("sending the flood: {e}"),
        }
    }
    assert!(
        sent < total,
        "the server read 4,000 x 1 MiB READs without backpressure"
    );
    let peak = vm_rss_bytes(pid);
    assert!(
        peak < before + 512 * MIB,
        "the daemon grew from {before} to {peak} bytes under a reply flood"
    );
    // Now read every reply while sending the rest.
    let mut reader = client.stream().try_clone().unwrap();
    writer.set_nonblocking(false).unwrap();
    let send_rest = std::thread::spawn(move || {
        if !pending.is_empty() {
            writer.write_all(&pending).unwrap();
        }
        for i in sent..total {
            writer.write_all(&header(i)).unwrap();
        }
    });
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..total {
        let mut h = [0u8; 16];
        reader.read_exact(&mut h).unwrap();
        let (handle, error) = pairbd_nbd_proto::transmission::decode_simple_reply(&h).unwrap();
        assert_eq!(error, 0);
        reader.read_exact(&mut buf).unwrap();
        assert!(seen.insert(handle), "handle {handle} answered twice");
    }
    send_rest.join().unwrap();
    assert_eq!(seen.len(), total as usize);
    serves(&mut daemon, 15);
}

/// CVE-2024-7409 (qemu-nbd): clients vanishing while the server shut down
/// made it use freed memory. Clients in every stage vanish around SIGTERM;
/// the daemon still exits cleanly.
#[test]
fn cve_2024_7409_clients_vanishing_during_shutdown() {
    let dir = TestDir::new("cve-2024-7409");
    let daemon = serve(&dir);
    let mut clients = Vec::new();
    for i in 0..24u64 {
        let socket = daemon.socket.clone();
        let c = match i % 4 {
            0 => RawClient::connect_raw(&socket),
            1 => RawClient::connect_greeting_only(&socket),
            2 => {
                let mut c = RawClient::connect(&socket);
                let _ = c.try_send_raw(&option_header(NBD_OPT_GO, 100));
                c
            }
            _ => {
                let (mut c, _) = RawClient::open(&socket, EXPORT);
                for k in 0..8 {
                    let h = c.next_handle();
                    c.send_request(0, NBD_CMD_READ, h, k * MIB, MIB as u32, &[]);
                }
                c
            }
        };
        clients.push(c);
    }
    common::signal(daemon.pid(), "TERM");
    // Half vanish at once, half right after.
    let rest = clients.split_off(12);
    drop(clients);
    drop(rest);
    let status = daemon.stop_after_signal();
    assert!(status.success(), "exit status {status}");
}
