//! Properties of the port-spec grammar over arbitrary input.

use std::collections::HashSet;

use cloud_domain::ports::{Handler, PortPolicy, PortSpec, expand};
use proptest::prelude::*;

fn handler() -> impl Strategy<Value = Handler> {
    prop_oneof![Just(Handler::Tls), Just(Handler::Http), Just(Handler::Redirect), Just(Handler::Tcp)]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![Just(0u16), Just(80), Just(443), Just(8443), Just(30001), Just(30002), any::<u16>()]
}

fn spec() -> impl Strategy<Value = PortSpec> {
    (
        port(),
        proptest::option::of(port()),
        proptest::option::of(proptest::collection::vec(handler(), 0..4)),
        any::<bool>(),
    )
        .prop_map(|(port, destination_port, handlers, proxy)| PortSpec { port, destination_port, handlers, proxy })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parsing_never_panics(s in "\\PC{0,24}") {
        let _ = s.parse::<PortSpec>();
    }

    #[test]
    fn grammar_like_strings_never_panic(s in "[0-9]{0,6}(:[0-9]{0,6})?(/[a-z+]{0,20})?") {
        if let Ok(spec) = s.parse::<PortSpec>() {
            let _ = expand(&[spec], &PortPolicy::default());
        }
    }

    #[test]
    fn display_round_trips(spec in spec()) {
        // Only specs whose handler list has no duplicates and is non-empty are writable as text.
        let writable = spec.handlers.as_ref().is_none_or(|h| !h.is_empty() && h.iter().collect::<HashSet<_>>().len() == h.len());
        prop_assume!(writable);
        let text = spec.to_string();
        prop_assert_eq!(text.parse::<PortSpec>().unwrap(), spec);
    }

    #[test]
    fn expanded_sets_obey_the_rules(specs in proptest::collection::vec(spec(), 0..4)) {
        let policy = PortPolicy::default();
        if let Ok(mappings) = expand(&specs, &policy) {
            let mut seen = HashSet::new();
            for m in &mappings {
                if m.port != 0 {
                    prop_assert!(seen.insert(m.port), "duplicate public port {}", m.port);
                }
                prop_assert!(m.destination_port != 0);
                let h = &m.handlers;
                prop_assert!(!h.is_empty());
                prop_assert!(h.windows(2).all(|w| w[0] < w[1]), "canonical order");
                if h.contains(&Handler::Tcp) {
                    prop_assert_eq!(h.len(), 1);
                    prop_assert!(m.port == 0 || policy.tcp_ports.contains(&m.port));
                }
                match m.port {
                    443 => prop_assert_eq!(h.as_slice(), &[Handler::Tls, Handler::Http]),
                    80 => prop_assert!(h.contains(&Handler::Http) && !h.contains(&Handler::Tls)),
                    _ => prop_assert!(!h.contains(&Handler::Redirect)),
                }
                if h.contains(&Handler::Redirect) {
                    prop_assert_eq!(m.destination_port, 443);
                    prop_assert!(mappings.iter().any(|o| o.port == 443));
                }
                if m.proxy {
                    prop_assert!(h == &[Handler::Tcp] || h == &[Handler::Tls]);
                }
            }
        }
    }
}
