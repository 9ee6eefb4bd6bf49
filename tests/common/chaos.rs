//! A seeded UDP chaos proxy between two pairbd daemons: the dialing node's
//! configuration points its peer's `connect` address at the proxy, which
//! forwards to the peer's real replication address and, per direction and on
//! command, drops, duplicates, reorders, delays or cuts datagrams. QUIC sees
//! exactly what a bad network would give it. Loopback only.
//!
//! Two threads, one per direction; each waits on its socket with a short
//! read timeout so that it can release delayed datagrams and notice `stop`.

#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Fault settings for one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Datagrams dropped, in percent.
    pub drop_pct: u64,
    /// Datagrams sent twice, in percent.
    pub dup_pct: u64,
    /// Datagrams held back behind the next one, in percent.
    pub reorder_pct: u64,
    /// Each datagram is delayed by a random 0..=delay_ms.
    pub delay_ms: u64,
    /// Everything is dropped (a partition in this direction).
    pub cut: bool,
}

/// What the proxy did, per direction (0: dialer → peer, 1: peer → dialer).
#[derive(Debug, Default)]
pub struct Stats {
    pub forwarded: [AtomicU64; 2],
    pub dropped: [AtomicU64; 2],
    pub duplicated: [AtomicU64; 2],
    pub reordered: [AtomicU64; 2],
    pub delayed: [AtomicU64; 2],
}

impl Stats {
    fn add(counter: &[AtomicU64; 2], dir: usize) {
        counter[dir].fetch_add(1, Ordering::Relaxed);
    }

    /// A one-line summary.
    pub fn summary(&self) -> String {
        let g = |c: &[AtomicU64; 2]| c[0].load(Ordering::Relaxed) + c[1].load(Ordering::Relaxed);
        format!(
            "forwarded {}, dropped {}, duplicated {}, reordered {}, delayed {}",
            g(&self.forwarded),
            g(&self.dropped),
            g(&self.duplicated),
            g(&self.reordered),
            g(&self.delayed)
        )
    }

    /// Datagrams the proxy interfered with.
    pub fn faults(&self) -> u64 {
        let g = |c: &[AtomicU64; 2]| c[0].load(Ordering::Relaxed) + c[1].load(Ordering::Relaxed);
        g(&self.dropped) + g(&self.duplicated) + g(&self.reordered) + g(&self.delayed)
    }
}

/// A running proxy; stops on drop.
pub struct ChaosProxy {
    /// Where the dialing node should send (its peer's `connect` address).
    pub addr: SocketAddr,
    faults: Arc<Mutex<[Faults; 2]>>,
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

struct Direction {
    dir: usize,
    from: UdpSocket,
    to: UdpSocket,
    /// Where datagrams go: fixed (the peer) or learned (the dialer).
    target: Arc<Mutex<Option<SocketAddr>>>,
    /// The learned dialer address, for the other direction.
    learn: Option<Arc<Mutex<Option<SocketAddr>>>>,
    faults: Arc<Mutex<[Faults; 2]>>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    rng: u64,
}

impl Direction {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn run(mut self) {
        let mut buf = vec![0u8; 65536];
        let mut delayed: Vec<(Instant, Vec<u8>)> = Vec::new();
        let mut held: Option<Vec<u8>> = None;
        self.from
            .set_read_timeout(Some(Duration::from_millis(2)))
            .unwrap();
        while !self.stop.load(Ordering::Relaxed) {
            let got = self.from.recv_from(&mut buf);
            let now = Instant::now();
            if let Ok((n, src)) = got {
                if let Some(learn) = &self.learn {
                    *learn.lock().unwrap() = Some(src);
                }
                let f = self.faults.lock().unwrap()[self.dir];
                let packet = buf[..n].to_vec();
                let roll = self.next() % 100;
                if f.cut || roll < f.drop_pct {
                    Stats::add(&self.stats.dropped, self.dir);
                } else {
                    let copies = if self.next() % 100 < f.dup_pct {
                        Stats::add(&self.stats.duplicated, self.dir);
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let delay = if f.delay_ms > 0 {
                            Stats::add(&self.stats.delayed, self.dir);
                            Duration::from_millis(self.next() % (f.delay_ms + 1))
                        } else {
                            Duration::ZERO
                        };
                        if self.next() % 100 < f.reorder_pct && held.is_none() {
                            Stats::add(&self.stats.reordered, self.dir);
                            held = Some(packet.clone());
                            continue;
                        }
                        delayed.push((now + delay, packet.clone()));
                        // A held datagram goes out behind this one.
                        if let Some(h) = held.take() {
                            delayed.push((now + delay, h));
                        }
                    }
                }
            } else if let Some(h) = held.take() {
                // Nothing followed for a moment: release it.
                delayed.push((now, h));
            }
            let target = *self.target.lock().unwrap();
            let Some(target) = target else {
                delayed.clear();
                continue;
            };
            let mut i = 0;
            while i < delayed.len() {
                if delayed[i].0 <= now {
                    let (_, p) = delayed.remove(i);
                    if self.to.send_to(&p, target).is_ok() {
                        Stats::add(&self.stats.forwarded, self.dir);
                    }
                } else {
                    i += 1;
                }
            }
        }
    }
}

impl ChaosProxy {
    /// A proxy on a fresh loopback port forwarding to `peer`.
    pub fn start(peer: SocketAddr, seed: u64) -> ChaosProxy {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind the proxy's front");
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind the proxy's back");
        let addr = front.local_addr().unwrap();
        let faults = Arc::new(Mutex::new([Faults::default(); 2]));
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let dialer = Arc::new(Mutex::new(None));
        let forward = Direction {
            dir: 0,
            from: front.try_clone().unwrap(),
            to: back.try_clone().unwrap(),
            target: Arc::new(Mutex::new(Some(peer))),
            learn: Some(Arc::clone(&dialer)),
            faults: Arc::clone(&faults),
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            rng: seed | 1,
        };
        let backward = Direction {
            dir: 1,
            from: back,
            to: front,
            target: dialer,
            learn: None,
            faults: Arc::clone(&faults),
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            rng: (seed ^ 0xDEAD_BEEF) | 1,
        };
        let threads = vec![
            std::thread::spawn(move || forward.run()),
            std::thread::spawn(move || backward.run()),
        ];
        ChaosProxy {
            addr,
            faults,
            stats,
            stop,
            threads,
        }
    }

    /// Sets the faults of both directions.
    pub fn set(&self, both: Faults) {
        *self.faults.lock().unwrap() = [both, both];
    }

    /// Sets the faults of one direction (0: dialer → peer, 1: back).
    pub fn set_direction(&self, dir: usize, f: Faults) {
        self.faults.lock().unwrap()[dir] = f;
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
