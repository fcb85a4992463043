//! The adaptive polling window after each wakeup.

use std::time::{Duration, Instant};

/// The adaptive polling window after each wakeup, in the manner of KVM's halt polling.
///
/// After handling what woke it, the worker keeps polling (the virtqueue for new requests,
/// the rings for completions) until nothing has turned up for `current`. Each time polling
/// gives up and the worker sleeps, the next wakeup tells how long it was waiting: if the
/// event came so soon that a window of at most `max` would have caught it (a disk's own
/// latency at queue depth 1 is tens of µs), the window grows to cover that wait; if even
/// `max` would have missed it, the window closes (zero), so an idle disk, or one whose
/// completions are too far apart for polling to pay, costs no polling CPU.
pub struct PollWindow {
    current: Duration,
    max: Duration,
    /// When polling last gave up without finding anything (None: it found work).
    gave_up: Option<Instant>,
}

impl PollWindow {
    /// The first window, and the smallest non-zero one.
    const MIN: Duration = Duration::from_micros(4);

    pub fn new(max: Duration) -> Self {
        PollWindow {
            current: Duration::ZERO,
            max,
            gave_up: None,
        }
    }

    /// The window for this wakeup, given when it happened.
    pub(super) fn budget(&mut self, now: Instant) -> Duration {
        if let Some(t) = self.gave_up.take() {
            // How long the worker waited for this event, counting the window it had polled.
            let waited = self.current + now.saturating_duration_since(t);
            if waited <= self.max {
                // A window of `waited` would have caught it: grow to cover it (with room).
                self.current = (waited + waited / 2)
                    .max(self.current * 2)
                    .max(Self::MIN)
                    .min(self.max);
            } else {
                // Even the longest window would have missed it: stop polling until events
                // come close together again (KVM's halt polling resets the same way).
                self.current = Duration::ZERO;
            }
        }
        self.current
    }

    /// Polling gave up at `now`: nothing turned up within the window.
    pub(super) fn gave_up(&mut self, now: Instant) {
        self.gave_up = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn poll_window_starts_closed() {
        let mut w = PollWindow::new(MAX);
        assert_eq!(w.budget(Instant::now()), Duration::ZERO);
    }

    #[test]
    fn poll_window_grows_to_cover_a_disk_latency_within_max() {
        // Completions come 30 µs after polling gives up (a disk at queue depth 1): the window
        // must grow until it covers them, and not beyond max.
        let mut w = PollWindow::new(MAX);
        let mut t = Instant::now();
        let mut budget = w.budget(t);
        for _ in 0..8 {
            w.gave_up(t);
            t += us(30).saturating_sub(budget);
            budget = w.budget(t);
        }
        assert!(budget >= us(30), "{budget:?}");
        assert!(budget <= MAX, "{budget:?}");
    }

    #[test]
    fn poll_window_closes_when_events_come_later_than_max() {
        // An idle disk: every wakeup comes long after polling gave up. The window must close
        // within a few wakeups and stay closed.
        let mut w = PollWindow::new(MAX);
        let mut t = Instant::now();
        w.gave_up(t);
        t += us(10);
        assert!(w.budget(t) > Duration::ZERO);
        for _ in 0..8 {
            w.gave_up(t);
            t += Duration::from_millis(5);
            w.budget(t);
        }
        assert_eq!(w.budget(t), Duration::ZERO);
    }

    #[test]
    fn poll_window_zero_max_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        let t = Instant::now();
        for _ in 0..4 {
            w.gave_up(t);
            assert_eq!(w.budget(t), Duration::ZERO);
        }
    }

    #[test]
    fn poll_window_keeps_its_size_while_polling_finds_work() {
        let mut w = PollWindow::new(MAX);
        let t = Instant::now();
        w.gave_up(t);
        let b = w.budget(t + us(20));
        // No give-up in between (polling kept finding work): the next wakeup keeps the window.
        assert_eq!(w.budget(t + Duration::from_secs(1)), b);
    }
}
