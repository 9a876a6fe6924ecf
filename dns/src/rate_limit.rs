//! Response-rate limiting against reflection and amplification: a token bucket per source network (an IPv4 /24,
//! an IPv6 /56), applied to UDP only, since a TCP peer has proven its address with the handshake.
//!
//! Beyond the rate every `slip`-th response is sent as an empty truncated answer, so a real client behind a
//! limited network still gets its answer by retrying over TCP, while a spoofed victim receives only tiny packets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Response-rate limits per source network.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained responses per second per source network.
    pub responses_per_second: f64,
    /// Responses a source network may send in a burst above the sustained rate.
    pub burst: u32,
    /// Of the responses beyond the rate, every `slip`-th is sent truncated (TC=1) instead of dropped; 0 drops all.
    pub slip: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self { responses_per_second: 100.0, burst: 200, slip: 2 }
    }
}

/// The limit as a configuration file writes it: its table, or `"off"`.
pub(crate) mod setting {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::RateLimit;

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Setting {
        Limit(RateLimit),
        Off(Off),
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Off {
        Off,
    }

    pub fn serialize<S: Serializer>(limit: &Option<RateLimit>, s: S) -> Result<S::Ok, S::Error> {
        match limit {
            Some(l) => Setting::Limit(*l),
            None => Setting::Off(Off::Off),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RateLimit>, D::Error> {
        match Setting::deserialize(d) {
            Ok(Setting::Limit(l)) => Ok(Some(l)),
            Ok(Setting::Off(Off::Off)) => Ok(None),
            Err(_) => Err(serde::de::Error::custom(
                "expected \"off\" or { responses_per_second = <number>, burst = <number>, slip = <number> }",
            )),
        }
    }
}

/// What to do with one UDP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Send,
    Truncate,
    Drop,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    limited: u32,
}

/// The buckets of every source network seen recently.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    swept: Mutex<Instant>,
}

/// Buckets idle this long are full again, so forgetting them changes nothing.
const IDLE: Duration = Duration::from_secs(60);

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self { limit, buckets: Mutex::new(HashMap::new()), swept: Mutex::new(Instant::now()) }
    }

    /// The source network a bucket is kept for: spoofers vary low bits, and one bucket per address would let a
    /// single /24 multiply its allowance by 256.
    fn key(src: IpAddr) -> IpAddr {
        match src.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & 0xffff_ff00).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 72) - 1)).into()),
        }
    }

    pub fn check(&self, src: IpAddr, now: Instant) -> Verdict {
        self.sweep(now);
        let burst = f64::from(self.limit.burst.max(1));
        // A poisoned lock only means another query panicked mid-update; the map is still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(Self::key(src)).or_insert(Bucket { tokens: burst, refilled: now, limited: 0 });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.limit.responses_per_second).min(burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Verdict::Send;
        }
        bucket.limited = bucket.limited.wrapping_add(1);
        if self.limit.slip > 0 && bucket.limited.is_multiple_of(self.limit.slip) {
            Verdict::Truncate
        } else {
            Verdict::Drop
        }
    }

    /// Forgets idle buckets now and then, so a spoofed flood over many networks cannot grow the map forever.
    fn sweep(&self, now: Instant) {
        let mut swept = self.swept.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(*swept) < IDLE {
            return;
        }
        *swept = now;
        drop(swept);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.retain(|_, b| now.saturating_duration_since(b.refilled) < IDLE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_slip_then_refill() {
        let rl = RateLimiter::new(RateLimit { responses_per_second: 10.0, burst: 3, slip: 2 });
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let same_net: IpAddr = "198.51.100.200".parse().unwrap();
        let other: IpAddr = "198.51.101.7".parse().unwrap();
        let verdicts: Vec<Verdict> = (0..7).map(|_| rl.check(a, t0)).collect();
        use Verdict::*;
        assert_eq!(verdicts, [Send, Send, Send, Drop, Truncate, Drop, Truncate]);
        assert_eq!(rl.check(same_net, t0), Drop, "the /24 shares one bucket");
        assert_eq!(rl.check(other, t0), Send);
        assert_eq!(rl.check(a, t0 + Duration::from_millis(100)), Send, "one token refilled after 100 ms at 10/s");
    }

    #[test]
    fn slip_zero_drops_everything_beyond_the_rate() {
        let rl = RateLimiter::new(RateLimit { responses_per_second: 1.0, burst: 1, slip: 0 });
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(rl.check(a, t0), Verdict::Send);
        assert!((0..10).all(|_| rl.check(a, t0) == Verdict::Drop));
    }
}
