//! The replication link as the core experiences it: one QUIC connection at a
//! time carrying two ordered, reliable streams (lanes) each way.
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
//! duplicated or reordered inside a live stream: that would be a broken
//! QUIC, not a fault the core has to survive.
//!
//! The lanes: each direction has a main lane and, with a bulk lane
//! configured (`Lanes`), a bulk lane carrying the client writes of at least
//! `bulk_lane_bytes` (`Message::lane`). Each lane is FIFO on its own (its
//! own queue and its own last arrival time); the main lane overtakes the
//! bulk lane, never the reverse (as the daemon's bulk reader waits for the
//! main frames sent before each bulk frame).
//! A bulk message waits an extra random delay (drawn from the scenario's own
//! stream), as a lower-priority stream does behind the main one, so that
//! acks, flushes and small writes really pass the big writes sent before
//! them. A partition holds both lanes; a reset or a close loses both.

use std::collections::VecDeque;

use pairbd_repl_core::{Lane, Message};

use crate::rng::Rng;

/// A message in flight.
struct InFlight {
    /// When it arrives (`None`: held by a partition).
    at: Option<u64>,
    /// Its place in the sender's order across both lanes (to tell an
    /// overtaking message).
    sent: u64,
    msg: Message<Vec<u8>>,
}

/// The index of a lane in the per-lane arrays.
pub fn lane_index(lane: Lane) -> usize {
    match lane {
        Lane::Main => 0,
        Lane::Bulk => 1,
    }
}

/// Both lanes, in index order.
pub const LANES: [Lane; 2] = [Lane::Main, Lane::Bulk];

/// One connection between the two nodes.
pub struct Conn {
    /// Distinguishes connections in scheduled events.
    pub id: u64,
    /// Whether each node's driver still holds its end.
    pub open: [bool; 2],
    /// Reset: nothing more is carried; the ends learn it shortly.
    pub dead: bool,
    /// Messages in flight, indexed by sender and lane, oldest first.
    queue: [[VecDeque<InFlight>; 2]; 2],
    /// Messages each sender has sent on this connection.
    sent: [u64; 2],
}

impl Conn {
    /// Whether no message is in flight either way.
    pub fn quiet(&self) -> bool {
        self.queue.iter().flatten().all(|q| q.is_empty())
    }

    /// Messages in flight from `sender`, main lane first.
    pub fn in_flight(&self, sender: usize) -> impl Iterator<Item = &Message<Vec<u8>>> {
        self.queue[sender].iter().flatten().map(|f| &f.msg)
    }

    fn clear(&mut self, sender: usize) {
        for q in &mut self.queue[sender] {
            q.clear();
        }
    }
}

/// The bulk lane of a run (the lanes scenario).
#[derive(Debug, Clone)]
pub struct Lanes {
    /// Client writes of at least this many bytes take the bulk lane.
    pub bulk_lane_bytes: u64,
    /// A bulk message's extra delay, at most (µs).
    pub bulk_delay_max_us: u64,
    /// One flush in this many that overtook a bulk write plans a power cut
    /// of its receiver soon after (`None`: never).
    pub power_cut_one_in: Option<u64>,
    /// The scenario's own random stream (the extra delays).
    pub rng: Rng,
}

/// What the lanes did in a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct LaneCounts {
    /// Messages sent on a bulk lane.
    pub bulk_messages: u64,
    /// Main-lane messages delivered while a bulk message sent before them
    /// was still in flight ...
    pub overtakes: u64,
    /// ... of which flushes.
    pub flush_overtakes: u64,
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
    /// Per sender and lane.
    last_arrival: [[u64; 2]; 2],
    /// The bulk lane, if this run has one.
    pub lanes: Option<Lanes>,
    /// What the lanes did.
    pub lane_counts: LaneCounts,
}

impl Net {
    /// A network with no connection, the given base latencies and, with
    /// `lanes`, a bulk lane.
    pub fn new(latency_us: [(u64, u64); 2], lanes: Option<Lanes>) -> Net {
        Net {
            conn: None,
            next_id: 1,
            blocked: [false; 2],
            block_token: [0; 2],
            spike: [None; 2],
            latency_us,
            last_arrival: [[0; 2]; 2],
            lanes,
            lane_counts: LaneCounts::default(),
        }
    }

    /// The lane `msg` takes (always the main one without a bulk lane).
    pub fn lane_of(&self, msg: &Message<Vec<u8>>) -> Lane {
        self.lanes
            .as_ref()
            .map_or(Lane::Main, |l| msg.lane(l.bulk_lane_bytes))
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

    /// The one-way delay from `sender` on `lane`: the bulk lane's messages
    /// wait behind the main lane (the extra delay comes from the lanes'
    /// own stream, so a run without a bulk lane draws what it always drew).
    fn lane_delay(&mut self, sender: usize, lane: Lane, now: u64, rng: &mut Rng) -> u64 {
        let delay = self.delay(sender, now, rng);
        match (lane, self.lanes.as_mut()) {
            (Lane::Bulk, Some(l)) => delay + l.rng.between(0, l.bulk_delay_max_us),
            _ => delay,
        }
    }

    /// Opens a new connection (the caller has dealt with the old one).
    pub fn open(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.conn = Some(Conn {
            id,
            open: [true, true],
            dead: false,
            queue: Default::default(),
            sent: [0; 2],
        });
        id
    }

    /// The id of the connection `node` holds, if it holds one.
    pub fn held_by(&self, node: usize) -> Option<u64> {
        self.conn.as_ref().filter(|c| c.open[node]).map(|c| c.id)
    }

    /// Sends `msg` from `sender` on its connection, on the lane it takes.
    /// Returns the lane and when it arrives (for the caller to schedule), or
    /// `None` if it is held by a partition or goes nowhere (no connection,
    /// or the receiver already closed).
    pub fn send(
        &mut self,
        sender: usize,
        msg: Message<Vec<u8>>,
        now: u64,
        rng: &mut Rng,
    ) -> Option<(Lane, u64)> {
        let lane = self.lane_of(&msg);
        let delay = self.lane_delay(sender, lane, now, rng);
        let blocked = self.blocked[sender];
        let after_main = self.after_main(sender);
        let conn = self.conn.as_mut()?;
        if conn.dead || !conn.open[sender] || !conn.open[1 - sender] {
            return None;
        }
        let li = lane_index(lane);
        if lane == Lane::Bulk {
            self.lane_counts.bulk_messages += 1;
        }
        let at = if blocked {
            None
        } else {
            let mut at = (now + delay).max(self.last_arrival[sender][li]);
            if lane == Lane::Bulk {
                at = at.max(after_main);
            }
            self.last_arrival[sender][li] = at;
            Some(at)
        };
        let sent = conn.sent[sender];
        conn.sent[sender] += 1;
        conn.queue[sender][li].push_back(InFlight { at, sent, msg });
        at.map(|at| (lane, at))
    }

    /// The earliest a bulk message from `sender` sent now may arrive: just
    /// after every main message sent before it. The daemon's bulk reader
    /// hands a bulk frame to the core only after the main frames its sender
    /// wrote before it (`send_bulk_batch`): the main lane overtakes the bulk
    /// lane, never the reverse. (A microsecond later, so that no tie in the
    /// event queue can deliver the bulk message first.)
    fn after_main(&self, sender: usize) -> u64 {
        self.last_arrival[sender][lane_index(Lane::Main)] + 1
    }

    /// The oldest message from `sender` on `lane` if it has arrived by `now`.
    pub fn pop_arrived(
        &mut self,
        conn_id: u64,
        sender: usize,
        lane: Lane,
        now: u64,
    ) -> Option<Message<Vec<u8>>> {
        let conn = self.conn.as_mut().filter(|c| c.id == conn_id)?;
        let queue = &mut conn.queue[sender][lane_index(lane)];
        let f = match queue.front() {
            Some(InFlight { at: Some(at), .. }) if *at <= now => queue.pop_front()?,
            _ => return None,
        };
        if lane == Lane::Main {
            let bulk = &conn.queue[sender][lane_index(Lane::Bulk)];
            if bulk.front().is_some_and(|b| b.sent < f.sent) {
                self.lane_counts.overtakes += 1;
                if matches!(f.msg, Message::Flush { .. }) {
                    self.lane_counts.flush_overtakes += 1;
                }
            }
        }
        Some(f.msg)
    }

    /// Heals direction `sender`: held messages leave now, each lane in
    /// order. Returns their lanes and arrival times for the caller to
    /// schedule.
    pub fn unblock(&mut self, sender: usize, now: u64, rng: &mut Rng) -> Vec<(Lane, u64)> {
        self.blocked[sender] = false;
        let mut times = Vec::new();
        for lane in LANES {
            let li = lane_index(lane);
            let held = self.conn.as_ref().map_or(0, |c| {
                c.queue[sender][li]
                    .iter()
                    .filter(|f| f.at.is_none())
                    .count()
            });
            let delays: Vec<u64> = (0..held)
                .map(|_| self.lane_delay(sender, lane, now, rng))
                .collect();
            let mut last = self.last_arrival[sender][li];
            if lane == Lane::Bulk {
                // After every main message released above (some were sent
                // after these; waiting for them too is only a delay).
                last = last.max(self.after_main(sender));
            }
            if let Some(conn) = self.conn.as_mut() {
                let held_slots = conn.queue[sender][li].iter_mut().filter(|f| f.at.is_none());
                for (f, delay) in held_slots.zip(delays) {
                    let t = (now + delay).max(last);
                    last = t;
                    f.at = Some(t);
                    times.push((lane, t));
                }
            }
            self.last_arrival[sender][li] = last;
        }
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
        conn.clear(1 - node);
        if discard_sent {
            conn.clear(node);
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
            c.clear(0);
            c.clear(1);
        }
    }

    /// Whether nothing is in flight.
    pub fn quiet(&self) -> bool {
        self.conn.as_ref().is_none_or(|c| c.quiet())
    }
}
