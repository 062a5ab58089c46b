//! The inflight window towards one upstream: how many rows, and how many bytes, may await their
//! PUBACK at once, and when to send more.
//!
//! Guarantees:
//! - At most `max_rows` rows and at most `max_bytes` bytes are in flight, except that an empty
//!   window always takes one row, however large (a row larger than the byte budget is still
//!   sent, alone).
//! - A window of [`BATCHED_REFILL_FROM`] rows or more is refilled only once an eighth of it
//!   is free (or nothing is in flight); a smaller one after every answer. Acknowledgements
//!   arrive a few at a time; refilling after each few costs a write to the upstream and a
//!   wake-up on both sides per few rows. Waiting for an eighth sends them in larger writes, and
//!   a large window still has seven eighths of itself in flight, which is plenty to cover the
//!   round trip. A small window is not: waiting there leaves the link idle (measured: with 100
//!   rows, waiting for 12 free delivered a fifth less; BENCHMARKS, "The uplink's window").
//!
//! Pure bookkeeping: no I/O, no clock.

/// Windows of at least this many rows are refilled in batches of an eighth.
pub const BATCHED_REFILL_FROM: usize = 256;

/// The rows and bytes in flight on one connection, against the link's limits.
#[derive(Debug, Clone)]
pub struct Window {
    max_rows: usize,
    max_bytes: usize,
    refill_at: usize,
    rows: usize,
    bytes: usize,
}

impl Window {
    /// An empty window for at most `max_rows` rows (at least 1) and `max_bytes` bytes.
    pub fn new(max_rows: usize, max_bytes: usize) -> Window {
        let max_rows = max_rows.max(1);
        Window {
            max_rows,
            max_bytes,
            refill_at: if max_rows >= BATCHED_REFILL_FROM {
                max_rows / 8
            } else {
                1
            },
            rows: 0,
            bytes: 0,
        }
    }

    /// Whether to start sending again: nothing is in flight, or enough of the window is free
    /// (an eighth of a large window; one row of a small one).
    pub fn wants_refill(&self) -> bool {
        self.rows == 0 || self.max_rows - self.rows >= self.refill_at
    }

    /// Whether a row of `size` bytes fits now. An empty window takes any one row.
    pub fn admits(&self, size: usize) -> bool {
        self.rows == 0
            || (self.rows < self.max_rows && self.bytes.saturating_add(size) <= self.max_bytes)
    }

    /// Counts a row of `size` bytes as sent.
    pub fn sent(&mut self, size: usize) {
        self.rows += 1;
        self.bytes = self.bytes.saturating_add(size);
    }

    /// Counts a row of `size` bytes (as given to [`Window::sent`]) as answered.
    pub fn answered(&mut self, size: usize) {
        self.rows = self.rows.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size);
    }

    /// Rows in flight.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes in flight.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The most rows it takes.
    #[cfg(test)]
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Fills `window` the way the session does: while it wants a refill, rows go out until one
    /// does not fit. Returns how many were sent.
    fn fill(window: &mut Window, sizes: &mut impl Iterator<Item = usize>, sent: &mut Vec<usize>) {
        if !window.wants_refill() {
            return;
        }
        for size in sizes.by_ref() {
            if !window.admits(size) {
                // The session keeps the row for the next refill; here it is dropped, which
                // only shortens the stream.
                break;
            }
            window.sent(size);
            sent.push(size);
        }
    }

    #[test]
    fn an_empty_window_takes_one_row_of_any_size() {
        let mut window = Window::new(10, 100);
        assert!(window.admits(1_000_000));
        window.sent(1_000_000);
        assert!(!window.admits(1), "a full byte budget takes nothing more");
        window.answered(1_000_000);
        assert_eq!((window.rows(), window.bytes()), (0, 0));
        assert!(window.admits(1));
    }

    #[test]
    fn rows_and_bytes_each_cap_the_window() {
        let mut window = Window::new(3, 1_000);
        for _ in 0..3 {
            assert!(window.admits(10));
            window.sent(10);
        }
        assert!(!window.admits(10), "three rows is the row limit");

        let mut window = Window::new(100, 1_000);
        window.sent(600);
        assert!(window.admits(400), "exactly the budget fits");
        assert!(!window.admits(401), "one byte over does not");
    }

    #[test]
    fn large_windows_refill_once_an_eighth_is_free() {
        let mut window = Window::new(1000, usize::MAX);
        for _ in 0..1000 {
            window.sent(1);
        }
        for answered in 1..=1000 {
            window.answered(1);
            assert_eq!(
                window.wants_refill(),
                answered >= 125,
                "{answered} of 1000 answered"
            );
        }
    }

    #[test]
    fn small_windows_refill_after_every_answer() {
        for max_rows in [1, 3, 100, BATCHED_REFILL_FROM - 1] {
            let mut window = Window::new(max_rows, usize::MAX);
            for _ in 0..max_rows {
                window.sent(1);
            }
            assert!(!window.wants_refill(), "{max_rows}: full");
            window.answered(1);
            assert!(window.wants_refill(), "{max_rows}: one free");
        }
        let mut window = Window::new(BATCHED_REFILL_FROM, usize::MAX);
        for _ in 0..BATCHED_REFILL_FROM {
            window.sent(1);
        }
        window.answered(1);
        assert!(!window.wants_refill(), "the smallest batched window waits");
    }

    proptest! {
        /// Whatever the sizes and the order of answers: never more than the limits in flight
        /// (beyond the single row an empty window takes), the counts return to zero, and a
        /// window that is not refilled still has rows in flight (so an answer will come).
        #[test]
        fn never_over_the_limits_and_never_stuck(
            max_rows in 1usize..1200,
            max_bytes in 1usize..5_000,
            sizes in proptest::collection::vec(0usize..2_000, 1..400),
            answer_batches in proptest::collection::vec(1usize..50, 1..100),
        ) {
            let mut window = Window::new(max_rows, max_bytes);
            let mut stream = sizes.clone().into_iter();
            let mut in_flight: std::collections::VecDeque<usize> = Default::default();
            let mut batches = answer_batches.into_iter().cycle();
            let mut sent_total = 0usize;
            loop {
                let mut sent = Vec::new();
                fill(&mut window, &mut stream, &mut sent);
                sent_total += sent.len();
                in_flight.extend(sent);
                prop_assert!(window.rows() <= window.max_rows());
                prop_assert!(window.rows() <= 1 || window.bytes() <= max_bytes);
                prop_assert_eq!(window.rows(), in_flight.len());
                prop_assert_eq!(window.bytes(), in_flight.iter().sum::<usize>());
                if in_flight.is_empty() {
                    break;
                }
                for _ in 0..batches.next().unwrap_or(1) {
                    if let Some(size) = in_flight.pop_front() {
                        window.answered(size);
                    }
                }
            }
            prop_assert_eq!((window.rows(), window.bytes()), (0, 0));
            prop_assert!(sent_total >= 1);
        }
    }
}
