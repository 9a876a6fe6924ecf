//! A token bucket per source address, for the one endpoint anyone may call without a token (join). In memory and
//! per API process: a guesser spread over replicas gets each replica's rate, which still leaves a 256-bit secret
//! out of reach; the point is to keep one source from hammering the database.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `burst` attempts at once per source, refilled at one per `every`.
#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    every: Duration,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Sources remembered before full buckets are forgotten.
const MAX_SOURCES: usize = 10_000;

impl RateLimiter {
    /// A limiter of `burst` attempts refilled at one per `every`.
    pub fn new(burst: u32, every: Duration) -> Self {
        Self { burst: f64::from(burst), every, buckets: Mutex::default() }
    }

    /// Takes one attempt for `source`, or says how long until it may try again.
    pub fn admit(&self, source: IpAddr) -> Result<(), Duration> {
        self.admit_at(source, Instant::now())
    }

    fn admit_at(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let Ok(mut buckets) = self.buckets.lock() else { return Ok(()) };
        let refill = |(tokens, at): (f64, Instant)| {
            (self.burst.min(tokens + now.saturating_duration_since(at).as_secs_f64() / self.every.as_secs_f64()), now)
        };
        if buckets.len() >= MAX_SOURCES {
            buckets.retain(|_, b| refill(*b).0 < self.burst);
        }
        let bucket = buckets.entry(source).or_insert((self.burst, now));
        *bucket = refill(*bucket);
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            return Ok(());
        }
        Err(self.every.mul_f64(1.0 - bucket.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_one_per_interval_and_others_are_not_affected() {
        let limiter = RateLimiter::new(3, Duration::from_secs(6));
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.admit_at(a, t0).is_ok());
        }
        let wait = limiter.admit_at(a, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(6));
        assert!(limiter.admit_at(b, t0).is_ok(), "another source has its own bucket");
        assert_eq!(limiter.admit_at(a, t0 + Duration::from_secs(3)).unwrap_err(), Duration::from_secs(3));
        assert!(limiter.admit_at(a, t0 + Duration::from_secs(6)).is_ok());
        assert!(limiter.admit_at(a, t0 + Duration::from_secs(6)).is_err());
    }
}
