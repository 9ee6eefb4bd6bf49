//! The adaptive resync controller (DRBD's c-min-rate idea), pure: while
//! application I/O is active the sync source sends at most the configured
//! minimum rate; otherwise up to `sync-rate` (or unlimited).
//!
//! "Active" means a client write, trim, zeroing or flush arrived within the
//! last [`APP_IO_ACTIVE_WINDOW`]. Time comes in as arguments; nothing here
//! reads a clock.

use std::time::{Duration, Instant};

/// Application I/O this recent makes the resync yield.
pub const APP_IO_ACTIVE_WINDOW: Duration = Duration::from_millis(100);

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct ResyncRate {
    max_bytes_per_sec: Option<u64>,
    min_bytes_per_sec: Option<u64>,
    last_app_io: Option<Instant>,
}

impl ResyncRate {
    /// A controller between `min` (while clients are active; `None`: no
    /// yielding) and `max` (`None`: unlimited). Zero counts as `None`.
    pub fn new(max: Option<u64>, min: Option<u64>) -> ResyncRate {
        let max = max.filter(|r| *r > 0);
        // A minimum above the maximum would speed the sync up under load.
        let min = min.filter(|r| *r > 0).map(|m| max.map_or(m, |x| m.min(x)));
        ResyncRate {
            max_bytes_per_sec: max,
            min_bytes_per_sec: min,
            last_app_io: None,
        }
    }

    /// A client request arrived at `now`.
    pub fn note_app_io(&mut self, now: Instant) {
        self.last_app_io = Some(now);
    }

    /// Whether application I/O is active at `now`.
    pub fn app_active(&self, now: Instant) -> bool {
        self.last_app_io
            .is_some_and(|t| now.saturating_duration_since(t) < APP_IO_ACTIVE_WINDOW)
    }

    /// The rate a sync may use at `now` (`None`: unlimited).
    pub fn rate(&self, now: Instant) -> Option<u64> {
        match self.min_bytes_per_sec {
            Some(min) if self.app_active(now) => Some(min),
            _ => self.max_bytes_per_sec,
        }
    }

    /// Whether the sync is paced at all (some rate may apply).
    pub fn paced(&self) -> bool {
        self.max_bytes_per_sec.is_some() || self.min_bytes_per_sec.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_to_application_io_then_runs_at_full_rate() {
        let t0 = Instant::now();
        let mut c = ResyncRate::new(None, Some(1 << 20));
        assert_eq!(c.rate(t0), None, "idle: unlimited");
        c.note_app_io(t0);
        assert_eq!(c.rate(t0 + Duration::from_millis(50)), Some(1 << 20));
        assert_eq!(c.rate(t0 + APP_IO_ACTIVE_WINDOW), None);
        let c = ResyncRate::new(Some(4 << 20), Some(8 << 20));
        assert_eq!(c.min_bytes_per_sec, Some(4 << 20), "min capped by max");
        assert!(ResyncRate::new(Some(0), None).rate(t0).is_none());
        assert!(!ResyncRate::new(None, None).paced());
    }
}
