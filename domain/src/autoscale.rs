//! The autoscale decision: how many instances to add or drain, from what the edges have in flight.
//!
//! Load must be sustained to count: instances are added when even the lowest of the recent samples is above
//! the target, and removed (one at a time, after the cooldown) only when even the highest is below it. Autoscale
//! never goes below one instance: with a minimum of 0, scale to zero (the service's idle time) stops the last.

use crate::api::Autoscale;

/// What the decision looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Instances running.
    pub running: u32,
    /// Instances wanted running that are not yet.
    pub starting: u32,
    /// Lowest total in flight over the recent samples.
    pub low: u64,
    /// Highest total in flight over the recent samples.
    pub high: u64,
    /// Seconds since autoscale last changed the service (`None`: never).
    pub since_last_change: Option<u64>,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing.
    Stay,
    /// Add this many instances.
    Up(u32),
    /// Drain away this many instances.
    Down(u32),
}

/// Decides for one service.
pub fn decide(policy: &Autoscale, load: &Load) -> Decision {
    let current = load.running + load.starting;
    let target = u64::from(policy.target_in_flight.max(1));
    let floor = policy.min.max(1);
    if current < floor {
        return Decision::Up(floor - current);
    }
    if current > policy.max {
        return Decision::Down(current - policy.max);
    }
    let needed = |in_flight: u64| in_flight.div_ceil(target).min(u64::from(policy.max)) as u32;
    let up = needed(load.low);
    if up > current {
        return Decision::Up(up - current);
    }
    let down = needed(load.high).max(floor);
    let cooled = load.since_last_change.is_none_or(|s| s >= u64::from(policy.cooldown_seconds));
    if down < load.running && load.starting == 0 && cooled {
        return Decision::Down(1);
    }
    Decision::Stay
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min: u32, max: u32, target: u32) -> Autoscale {
        Autoscale { min, max, target_in_flight: target, cooldown_seconds: 30 }
    }

    fn load(running: u32, starting: u32, low: u64, high: u64, since: Option<u64>) -> Load {
        Load { running, starting, low, high, since_last_change: since }
    }

    #[test]
    fn decisions_follow_sustained_load_within_bounds() {
        let p = policy(1, 4, 5);
        let cases = [
            // Below the minimum (nothing runs yet): up to it.
            (policy(2, 4, 5), load(0, 0, 0, 0, None), Decision::Up(2)),
            // Above the maximum (it was lowered): down to it.
            (p, load(6, 0, 0, 0, Some(0)), Decision::Down(2)),
            // 12 in flight sustained on one instance at a target of 5: three instances.
            (p, load(1, 0, 12, 14, Some(0)), Decision::Up(2)),
            // A spike (the lowest sample is low): nothing.
            (p, load(1, 0, 3, 40, Some(100)), Decision::Stay),
            // More than the maximum would take: the maximum.
            (p, load(1, 0, 100, 100, None), Decision::Up(3)),
            // Instances still starting count: no second round of additions.
            (p, load(1, 2, 12, 12, Some(1)), Decision::Stay),
            // Quiet, after the cooldown: one goes.
            (p, load(3, 0, 0, 2, Some(31)), Decision::Down(1)),
            // Quiet, within the cooldown: none goes.
            (p, load(3, 0, 0, 2, Some(10)), Decision::Stay),
            // Never below one, even with a minimum of 0 (scale to zero stops the last).
            (policy(0, 4, 5), load(1, 0, 0, 0, None), Decision::Stay),
            // Load at the target exactly: steady.
            (p, load(2, 0, 10, 10, None), Decision::Stay),
        ];
        for (p, l, want) in cases {
            assert_eq!(decide(&p, &l), want, "{p:?} {l:?}");
        }
    }
}
