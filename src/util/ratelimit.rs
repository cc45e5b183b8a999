//! Rate limiting for log lines a guest can trigger at will.
//!
//! Each call site owns a [`RateLimit`]; [`RateLimit::check`] allows a burst, then about one line
//! per interval, and reports how many lines were suppressed in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines allowed in a burst.
const BURST: u64 = 10;
/// Milliseconds per line once the burst is spent.
const INTERVAL_MS: u64 = 1000;

/// A token bucket for one log call site.
pub struct RateLimit {
    /// GCRA "theoretical arrival time" in ms since the first check.
    tat_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A full bucket.
    pub const fn new() -> Self {
        RateLimit {
            tat_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(suppressed_since_last)` if a line may be logged now.
    pub fn check(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64;
        let mut stored = self.tat_ms.load(Ordering::Relaxed);
        loop {
            let tat = stored.max(now);
            if tat - now > (BURST - 1) * INTERVAL_MS {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.tat_ms.compare_exchange_weak(
                stored,
                tat + INTERVAL_MS,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(t) => stored = t,
            }
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs at `warn` level through a per-call-site [`RateLimit`].
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::util::ratelimit::RateLimit = $crate::util::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.check() {
            if suppressed > 0 {
                log::warn!("{} ({} similar messages suppressed)", format_args!($($arg)+), suppressed);
            } else {
                log::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppressed() {
        let l = RateLimit::new();
        for _ in 0..BURST {
            assert_eq!(l.check(), Some(0));
        }
        assert_eq!(l.check(), None);
        assert_eq!(l.check(), None);
        assert_eq!(l.suppressed.load(Ordering::Relaxed), 2);
    }
}
