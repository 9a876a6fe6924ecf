//! The platform's settings that rules and generated names depend on: the zone service names live in, the pools
//! networks and raw TCP ports come from, and how long things are held. Plain data that every role reads the same
//! way; `cloudd` fills it from its configuration.

use std::ops::RangeInclusive;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::ports::PortPolicy;

/// [`Settings::database_timeout`] unless configured otherwise.
pub const DEFAULT_DATABASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Platform-wide settings the store needs to generate names and allocate resources.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Region label in service FQDNs.
    pub region: String,
    /// Base domain in service FQDNs.
    pub base_domain: String,
    /// The pool tenants' private networks are carved from.
    pub tenant_pool: Ipv4Net,
    /// Prefix length of each tenant's network.
    pub tenant_prefix: u8,
    /// The pool hosts' overlay addresses come from: one address per node that runs the overlay, the source of
    /// its own traffic (edge, DNS) towards instances on other hosts.
    pub host_pool: Ipv4Net,
    /// Public ports raw TCP services are allocated from.
    pub tcp_ports: RangeInclusive<u16>,
    /// How long a deleted instance's private IP stays unallocated: longer than any edge or DNS cache may still
    /// route to it and than the node takes to tear the old sandbox down, so the address never reaches a newcomer
    /// while something still means the old instance.
    pub ip_hold: Duration,
    /// How long an unverified custom-domain claim lasts: long enough for an owner to publish a TXT record, short
    /// enough that an abandoned or squatting claim does not linger.
    pub domain_claim_ttl: Duration,
    /// How long an instance being stopped or deleted may take to finish the requests in flight once no edge
    /// sends it new ones; it stops at the end of this time whatever is left.
    pub drain_timeout: Duration,
    /// How long one operation may wait for PostgreSQL, taking a connection included, before it fails with
    /// `cloud_store::StoreError::Unresponsive`: a frozen, overloaded or cut-off server makes callers fail in
    /// bounded time instead of hanging (a server that froze leaves its TCP connections open, so nothing else would
    /// end the wait). Operations that move image data get more time for their bytes
    /// (`cloud_store::BULK_BYTES_PER_SECOND`).
    pub database_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            region: "dev".into(),
            base_domain: "cloud.localhost".into(),
            tenant_pool: "10.96.0.0/12".parse().expect("valid literal"),
            tenant_prefix: 22,
            host_pool: "100.64.0.0/16".parse().expect("valid literal"),
            tcp_ports: 30000..=32767,
            ip_hold: Duration::from_secs(60),
            domain_claim_ttl: Duration::from_secs(7 * 86400),
            drain_timeout: Duration::from_secs(30),
            database_timeout: DEFAULT_DATABASE_TIMEOUT,
        }
    }
}

impl Settings {
    /// The zone service FQDNs live in: `<region>.<base_domain>`.
    pub fn zone(&self) -> String {
        format!("{}.{}", self.region, self.base_domain)
    }

    /// What the port rules need of the platform: which public ports are raw TCP's.
    pub fn port_policy(&self) -> PortPolicy {
        PortPolicy { tcp_ports: self.tcp_ports.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zone_is_the_region_under_the_base_domain() {
        let s = Settings { region: "eu".into(), base_domain: "example.net".into(), ..Settings::default() };
        assert_eq!(s.zone(), "eu.example.net");
        assert_eq!(Settings::default().zone(), "dev.cloud.localhost");
        assert_eq!(s.port_policy(), PortPolicy { tcp_ports: 30000..=32767 });
    }
}
