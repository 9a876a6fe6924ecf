//! Private address allocation. Each tenant owns a subnet carved from a platform pool, so private IPs are unique
//! platform-wide and a source address names its tenant.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The lowest subnet of `prefix_len` inside `pool` that overlaps none of `used`.
pub fn next_free_subnet(pool: Ipv4Net, prefix_len: u8, used: &[Ipv4Net]) -> Option<Ipv4Net> {
    let subnets = pool.subnets(prefix_len).ok()?;
    let overlaps = |n: &Ipv4Net| used.iter().any(|u| u.contains(&n.network()) || n.contains(&u.network()));
    subnets.into_iter().find(|n| !overlaps(n))
}

/// The first host address, reserved for the tenant's bridge.
pub fn gateway(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).saturating_add(1))
}

/// The lowest host address of `net` that is neither the gateway nor in `used` (network and broadcast
/// addresses are never hosts). Walks `used` in order, so the cost is O(used), whatever the size of `net`.
pub fn first_free_host(net: Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    next_free_host(net, used, None)
}

/// The first free host address after `after`, wrapping around to the start of `net`. Handing addresses out
/// in a cycle reuses a released address as late as possible: anything still holding an old route to it (an
/// edge catching up, a client's DNS cache) then meets nothing rather than another instance.
pub fn next_free_host(net: Ipv4Net, used: &BTreeSet<Ipv4Addr>, after: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u32::from(gateway(net)).checked_add(1)?;
    let last = u32::from(net.broadcast()).checked_sub(1)?;
    if first > last {
        return None;
    }
    let start = after.map(u32::from).filter(|a| (first..last).contains(a)).map_or(first, |a| a + 1);
    free_between(start, last, used).or_else(|| free_between(first, start.checked_sub(1)?, used))
}

/// The lowest address in `lo..=hi` not in `used`.
fn free_between(lo: u32, hi: u32, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let mut candidate = lo;
    for ip in used.range(Ipv4Addr::from(lo)..) {
        let ip = u32::from(*ip);
        if ip > candidate {
            break;
        }
        if ip == candidate {
            candidate = candidate.checked_add(1)?;
        }
    }
    (candidate <= hi && candidate >= lo).then(|| Ipv4Addr::from(candidate))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_are_carved_in_order_without_overlap() {
        let pool = net("10.96.0.0/12");
        assert_eq!(next_free_subnet(pool, 22, &[]), Some(net("10.96.0.0/22")));
        let used = [net("10.96.0.0/22"), net("10.96.8.0/22")];
        assert_eq!(next_free_subnet(pool, 22, &used), Some(net("10.96.4.0/22")));
        // A larger used network blocks all subnets inside it.
        assert_eq!(next_free_subnet(pool, 22, &[net("10.96.0.0/16")]), Some(net("10.97.0.0/22")));
        let full = [pool];
        assert_eq!(next_free_subnet(pool, 22, &full), None);
        assert_eq!(next_free_subnet(net("10.0.0.0/24"), 16, &[]), None, "prefix shorter than the pool");
    }

    #[test]
    fn hosts_skip_network_gateway_broadcast_and_used() {
        let n = net("10.96.0.0/22");
        assert_eq!(gateway(n), Ipv4Addr::new(10, 96, 0, 1));
        let mut used = BTreeSet::new();
        assert_eq!(first_free_host(n, &used), Some(Ipv4Addr::new(10, 96, 0, 2)));
        used.extend([Ipv4Addr::new(10, 96, 0, 2), Ipv4Addr::new(10, 96, 0, 3), Ipv4Addr::new(10, 96, 0, 5)]);
        assert_eq!(first_free_host(n, &used), Some(Ipv4Addr::new(10, 96, 0, 4)));
        // A /30 has two hosts: the gateway and one instance.
        let small = net("10.0.0.0/30");
        assert_eq!(first_free_host(small, &BTreeSet::new()), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(first_free_host(small, &BTreeSet::from([Ipv4Addr::new(10, 0, 0, 2)])), None);
        assert_eq!(first_free_host(net("10.0.0.0/31"), &BTreeSet::new()), None);
    }

    #[test]
    fn allocation_in_a_huge_network_is_cheap() {
        let n = net("10.0.0.0/8");
        let used: BTreeSet<Ipv4Addr> = (2..100_002u32).map(|i| Ipv4Addr::from(u32::from(n.network()) + i)).collect();
        assert_eq!(first_free_host(n, &used), Some(Ipv4Addr::from(u32::from(n.network()) + 100_002)));
    }

    #[test]
    fn addresses_are_handed_out_in_a_cycle() {
        let n = net("10.0.0.0/29"); // hosts .2 to .6 (.1 is the gateway)
        let ip = |d: u8| Ipv4Addr::new(10, 0, 0, d);
        let used = BTreeSet::from([ip(3)]);
        assert_eq!(next_free_host(n, &used, None), Some(ip(2)));
        assert_eq!(next_free_host(n, &used, Some(ip(2))), Some(ip(4)), "after the last one, skipping used");
        // .2 was released, but the cycle goes on before coming back to it.
        assert_eq!(next_free_host(n, &used, Some(ip(4))), Some(ip(5)));
        assert_eq!(next_free_host(n, &used, Some(ip(6))), Some(ip(2)), "wraps around");
        let full = BTreeSet::from([ip(2), ip(3), ip(4), ip(5), ip(6)]);
        assert_eq!(next_free_host(n, &full, Some(ip(4))), None);
        let almost = BTreeSet::from([ip(2), ip(3), ip(5), ip(6)]);
        assert_eq!(next_free_host(n, &almost, Some(ip(4))), Some(ip(4)), "the only free one, even the last used");
        // A cursor outside the network (an old value) starts from the beginning.
        assert_eq!(next_free_host(n, &used, Some(Ipv4Addr::new(192, 0, 2, 1))), Some(ip(2)));
    }
}
