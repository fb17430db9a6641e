//! Waiting for a condition, with a deadline that can't overflow.

use std::time::{Duration, Instant};

/// Calls `ready` every `every` until it says true (returns true) or
/// `timeout` has passed (returns false). `ready` is always called at least
/// once, and once more at the deadline.
pub fn until(timeout: Duration, every: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if started.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(every.min(timeout.saturating_sub(started.elapsed())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_ready_or_the_deadline() {
        let mut calls = 0;
        assert!(until(
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                calls += 1;
                calls == 3
            }
        ));
        assert!(!until(
            Duration::from_millis(20),
            Duration::from_millis(5),
            || false
        ));
        // A timeout of any size is fine: nothing adds it to an Instant.
        assert!(until(Duration::MAX, Duration::from_millis(1), || true));
    }
}
