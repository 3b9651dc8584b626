//! Time, injected.
//!
//! The engine never reads the system clock directly: it asks a `Clock`. The
//! default clock counts from tokio's `Instant`, so a test that pauses tokio's
//! time (`#[tokio::test(start_paused = true)]`) runs timers and timeouts in
//! virtual time, with no sleeps.

use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in ms since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Now, in ms since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// Wall time at start plus tokio's monotonic time since: never goes backwards,
/// and follows tokio's paused time in tests.
pub struct TokioClock {
    base_ms: u64,
    base: tokio::time::Instant,
}

impl TokioClock {
    /// A clock starting at the system's current time.
    pub fn new() -> TokioClock {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        TokioClock::starting_at(base_ms)
    }

    /// A clock starting at `base_ms`, for deterministic tests.
    pub fn starting_at(base_ms: u64) -> TokioClock {
        TokioClock {
            base_ms,
            base: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }
}
