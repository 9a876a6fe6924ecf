//! How the agent waits between attempts at a write PostgreSQL did not take (it did not answer in time, or could
//! not be reached): the first retry soon, then less and less often, so an outage costs the database little
//! when it comes back and the agent's log one line, not one per attempt.

use std::time::Duration;

/// First wait after a failed write.
pub(crate) const FIRST: Duration = Duration::from_millis(500);
/// Longest wait between two attempts.
pub(crate) const LONGEST: Duration = Duration::from_secs(5);

/// Doubling waits from [`FIRST`] up to [`LONGEST`], reset by a success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: FIRST }
    }
}

impl Backoff {
    /// The wait before the next attempt, and doubles the one after.
    pub fn after_failure(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(LONGEST);
        wait
    }

    /// After a success: the next failure waits [`FIRST`] again. True when failures preceded it.
    pub fn succeeded(&mut self) -> bool {
        std::mem::replace(&mut self.next, FIRST) != FIRST
    }

    /// Whether the last attempt failed.
    pub fn failing(&self) -> bool {
        self.next != FIRST
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_longest_and_a_success_starts_over() {
        let mut b = Backoff::default();
        assert!(!b.failing());
        let waits: Vec<u128> = (0..6).map(|_| b.after_failure().as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 5000, 5000]);
        assert!(b.failing());
        assert!(b.succeeded(), "failures preceded this success");
        assert!(!b.succeeded());
        assert_eq!(b.after_failure(), FIRST);
    }
}
