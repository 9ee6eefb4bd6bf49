//! Fault injection for tests: make the next N operations of one kind fail with an
//! errno, before they reach the engine, exactly as if the kernel had returned it.
//!
//! Hidden from the docs; costs one relaxed atomic load per operation when unused.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

use crate::engine::Op;

/// Where an injected error strikes.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// `read`.
    Read,
    /// `write` without FUA, a vectored write (also the zero-writing fallback).
    Write,
    /// `write` with FUA on an O_DIRECT store, i.e. RWF_DSYNC (poisons the store).
    /// A buffered store's FUA write is a plain write and a flush: see `Write`
    /// and `Flush`.
    FuaWrite,
    /// `flush`, i.e. fdatasync (poisons the store).
    Flush,
    /// fallocate, as used by `discard` and `write_zeroes`.
    Fallocate,
}

const POINT_COUNT: usize = 5;

impl FaultPoint {
    fn index(self) -> usize {
        match self {
            FaultPoint::Read => 0,
            FaultPoint::Write => 1,
            FaultPoint::FuaWrite => 2,
            FaultPoint::Flush => 3,
            FaultPoint::Fallocate => 4,
        }
    }

    fn of(op: &Op) -> FaultPoint {
        match op {
            Op::Read { .. } => FaultPoint::Read,
            Op::Write { fua: false, .. } | Op::WriteVectored { .. } => FaultPoint::Write,
            Op::Write { fua: true, .. } => FaultPoint::FuaWrite,
            Op::Flush => FaultPoint::Flush,
            Op::Fallocate { .. } => FaultPoint::Fallocate,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    any_armed: AtomicBool,
    remaining: [AtomicU32; POINT_COUNT],
    errno: [AtomicI32; POINT_COUNT],
}

impl Faults {
    pub(crate) fn arm(&self, point: FaultPoint, count: u32, errno: i32) {
        self.errno[point.index()].store(errno, Ordering::SeqCst);
        self.remaining[point.index()].store(count, Ordering::SeqCst);
        self.any_armed.store(true, Ordering::SeqCst);
    }

    /// Whether any fault is armed (the inline fast path then stands aside, so that
    /// every request meets the injection point).
    pub(crate) fn any_armed(&self) -> bool {
        self.any_armed.load(Ordering::SeqCst)
    }

    /// The injected error for `op`, if one is armed (and consumes it).
    pub(crate) fn take(&self, op: &Op) -> Option<io::Error> {
        if !self.any_armed.load(Ordering::Relaxed) {
            return None;
        }
        let index = FaultPoint::of(op).index();
        self.remaining[index]
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .ok()
            .map(|_| io::Error::from_raw_os_error(self.errno[index].load(Ordering::SeqCst)))
    }
}
