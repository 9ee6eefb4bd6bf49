//! The replication link as the core experiences it: one QUIC connection at a
//! time carrying one ordered, reliable stream each way.
//!
//! Modelling choice: QUIC retransmits lost packets, drops duplicates and puts
//! reordered packets back in order before the stream hands them up, so at
//! the stream a dropped, duplicated or reordered packet can only show as
//! delay. A loss that lasts (a partition) shows as silence, and QUIC's idle
//! timeout (the daemon's ping-timeout) then closes the connection: after a
//! full partition both sides time out; after a one-way partition the side
//! that hears nothing times out and its close reaches the other side, if
//! that direction still works. So the faults here are: per-direction delay
//! (and delay spikes), connection resets (the link is cut at once; data in
//! flight is lost), and full or one-way partitions. Messages are never lost,
//! duplicated or reordered inside a live connection: that would be a broken
//! QUIC, not a fault the core has to survive.

use std::collections::VecDeque;

use pairbd_repl_core::Message;

use crate::rng::Rng;

/// A message in flight: when it arrives (`None`: held by a partition).
type InFlight = (Option<u64>, Message<Vec<u8>>);

/// One connection between the two nodes.
pub struct Conn {
    /// Distinguishes connections in scheduled events.
    pub id: u64,
    /// Whether each node's driver still holds its end.
    pub open: [bool; 2],
    /// Reset: nothing more is carried; the ends learn it shortly.
    pub dead: bool,
    /// Messages in flight, indexed by sender, oldest first.
    queue: [VecDeque<InFlight>; 2],
}

impl Conn {
    /// Whether no message is in flight either way.
    pub fn quiet(&self) -> bool {
        self.queue[0].is_empty() && self.queue[1].is_empty()
    }

    /// Messages in flight from `sender`.
    pub fn in_flight(&self, sender: usize) -> impl Iterator<Item = &Message<Vec<u8>>> {
        self.queue[sender].iter().map(|(_, m)| m)
    }
}

/// The network between the two nodes.
pub struct Net {
    /// The current connection, if any end of it is still open.
    pub conn: Option<Conn>,
    next_id: u64,
    /// `blocked[d]`: packets from node `d` to the other do not arrive.
    pub blocked: [bool; 2],
    /// Bumped whenever a direction is blocked, so a stale idle timeout from
    /// an earlier partition is ignored.
    pub block_token: [u64; 2],
    /// Extra delay per direction and until when (simulated µs).
    pub spike: [Option<(u64, u64)>; 2],
    /// Base one-way latency range per direction, in µs.
    pub latency_us: [(u64, u64); 2],
    last_arrival: [u64; 2],
}

impl Net {
    /// A network with no connection and the given base latencies.
    pub fn new(latency_us: [(u64, u64); 2]) -> Net {
        Net {
            conn: None,
            next_id: 1,
            blocked: [false; 2],
            block_token: [0; 2],
            spike: [None; 2],
            latency_us,
            last_arrival: [0; 2],
        }
    }

    /// The one-way delay from `sender` for a packet sent now.
    pub fn delay(&self, sender: usize, now: u64, rng: &mut Rng) -> u64 {
        let (lo, hi) = self.latency_us[sender];
        let extra = match self.spike[sender] {
            Some((until, extra)) if now < until => extra,
            _ => 0,
        };
        rng.between(lo, hi) + extra
    }

    /// Opens a new connection (the caller has dealt with the old one).
    pub fn open(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.conn = Some(Conn {
            id,
            open: [true, true],
            dead: false,
            queue: [VecDeque::new(), VecDeque::new()],
        });
        id
    }

    /// The id of the connection `node` holds, if it holds one.
    pub fn held_by(&self, node: usize) -> Option<u64> {
        self.conn.as_ref().filter(|c| c.open[node]).map(|c| c.id)
    }

    /// Sends `msg` from `sender` on its connection. Returns when it arrives
    /// (for the caller to schedule), or `None` if it is held by a partition
    /// or goes nowhere (no connection, or the receiver already closed).
    pub fn send(
        &mut self,
        sender: usize,
        msg: Message<Vec<u8>>,
        now: u64,
        rng: &mut Rng,
    ) -> Option<u64> {
        let delay = self.delay(sender, now, rng);
        let blocked = self.blocked[sender];
        let conn = self.conn.as_mut()?;
        if conn.dead || !conn.open[sender] || !conn.open[1 - sender] {
            return None;
        }
        let at = if blocked {
            None
        } else {
            let at = (now + delay).max(self.last_arrival[sender]);
            self.last_arrival[sender] = at;
            Some(at)
        };
        conn.queue[sender].push_back((at, msg));
        at
    }

    /// The oldest message from `sender` if it has arrived by `now`.
    pub fn pop_arrived(
        &mut self,
        conn_id: u64,
        sender: usize,
        now: u64,
    ) -> Option<Message<Vec<u8>>> {
        let conn = self.conn.as_mut().filter(|c| c.id == conn_id)?;
        match conn.queue[sender].front() {
            Some((Some(at), _)) if *at <= now => conn.queue[sender].pop_front().map(|(_, m)| m),
            _ => None,
        }
    }

    /// Heals direction `sender`: held messages leave now, in order. Returns
    /// their arrival times for the caller to schedule.
    pub fn unblock(&mut self, sender: usize, now: u64, rng: &mut Rng) -> Vec<u64> {
        self.blocked[sender] = false;
        let held = self.conn.as_ref().map_or(0, |c| {
            c.queue[sender]
                .iter()
                .filter(|(at, _)| at.is_none())
                .count()
        });
        let delays: Vec<u64> = (0..held).map(|_| self.delay(sender, now, rng)).collect();
        let mut times = Vec::with_capacity(held);
        let mut last = self.last_arrival[sender];
        if let Some(conn) = self.conn.as_mut() {
            let held_slots = conn.queue[sender].iter_mut().filter(|(at, _)| at.is_none());
            for ((at, _), delay) in held_slots.zip(delays) {
                let t = (now + delay).max(last);
                last = t;
                *at = Some(t);
                times.push(t);
            }
        }
        self.last_arrival[sender] = last;
        times
    }

    /// Blocks direction `sender`; returns the new token for its idle timeout.
    pub fn block(&mut self, sender: usize) -> u64 {
        self.blocked[sender] = true;
        self.block_token[sender] += 1;
        self.block_token[sender]
    }

    /// `node`'s driver lets go of its end: nothing more reaches it, and
    /// with `discard_sent` (a close, not a crash) what it sent is dropped too.
    /// Returns whether it held an end.
    pub fn close_end(&mut self, node: usize, discard_sent: bool) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        if !conn.open[node] {
            return false;
        }
        conn.open[node] = false;
        conn.queue[1 - node].clear();
        if discard_sent {
            conn.queue[node].clear();
        }
        if !conn.open[1 - node] {
            self.conn = None;
        }
        true
    }

    /// Resets the connection: everything in flight is lost, nothing more is
    /// carried.
    pub fn reset(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            c.dead = true;
            c.queue[0].clear();
            c.queue[1].clear();
        }
    }

    /// Whether nothing is in flight.
    pub fn quiet(&self) -> bool {
        self.conn.as_ref().is_none_or(|c| c.quiet())
    }
}
