//! Generated names: service FQDNs, `<adjective>-<noun>` service names and `<image>-<5>` instance names.

use rand::Rng;

use crate::names::MAX_LABEL;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Length of the random part of a service FQDN's first label.
pub const FQDN_SUFFIX_LEN: usize = 8;

const ADJECTIVES: &[&str] = &[
    "amber", "ancient", "bold", "brave", "breezy", "bright", "calm", "clever", "cosmic", "crimson", "crisp", "curious",
    "daring", "dusty", "eager", "early", "electric", "emerald", "fancy", "fast", "fierce", "gentle", "giant", "golden",
    "grand", "happy", "hidden", "humble", "icy", "jolly", "keen", "kind", "lively", "lucky", "mellow", "merry",
    "mighty", "misty", "modest", "noble", "odd", "patient", "polished", "proud", "quick", "quiet", "rapid", "rosy",
    "rustic", "sharp", "shiny", "silent", "silver", "sleek", "smooth", "snowy", "solar", "steady", "sunny", "swift",
    "tidy", "tiny", "vivid", "warm", "wild", "wise", "witty", "young", "zesty",
];

const NOUNS: &[&str] = &[
    "anchor", "aurora", "badger", "beacon", "bird", "boat", "breeze", "brook", "canyon", "cedar", "cloud", "comet",
    "coral", "crane", "creek", "dawn", "delta", "dune", "eagle", "ember", "falcon", "fern", "field", "finch", "fjord",
    "forest", "fox", "galaxy", "garden", "glacier", "harbor", "hawk", "heron", "hill", "island", "lake", "lantern",
    "leaf", "lion", "lotus", "maple", "meadow", "meteor", "moon", "mountain", "ocean", "orbit", "otter", "panda",
    "pebble", "pine", "planet", "prairie", "rain", "reef", "river", "rocket", "sea", "shadow", "sky", "snow",
    "sparrow", "star", "stone", "storm", "sun", "thunder", "tiger", "valley", "wave", "willow", "wind", "wolf",
];

/// `len` random characters from `[a-z0-9]`.
pub fn random_suffix<R: Rng + ?Sized>(rng: &mut R, len: usize) -> String {
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// Cuts a label to `max` characters without leaving a trailing '-'.
fn cut(label: &str, max: usize) -> &str {
    let cut = &label[..label.len().min(max)];
    cut.trim_end_matches('-')
}

/// A service FQDN: `<name>-<8 random [a-z0-9]>.<region>.<base_domain>`. A name longer than 54 characters is cut
/// so the first label stays within 63.
pub fn service_fqdn<R: Rng + ?Sized>(name: &str, region: &str, base_domain: &str, rng: &mut R) -> String {
    let name = cut(name, MAX_LABEL - FQDN_SUFFIX_LEN - 1);
    format!("{name}-{}.{region}.{base_domain}", random_suffix(rng, FQDN_SUFFIX_LEN))
}

/// A friendly name for an unnamed service: `<adjective>-<noun>`.
pub fn random_service_name<R: Rng + ?Sized>(rng: &mut R) -> String {
    let adjective = ADJECTIVES[rng.random_range(0..ADJECTIVES.len())];
    let noun = NOUNS[rng.random_range(0..NOUNS.len())];
    format!("{adjective}-{noun}")
}

/// An instance name: `<image>-<5 random [a-z0-9]>`, the image part being the last path segment of the image
/// name made into a valid label.
pub fn instance_name<R: Rng + ?Sized>(image: &str, rng: &mut R) -> String {
    let last = image.rsplit(['/', ':', '@']).find(|s| !s.is_empty()).unwrap_or("");
    let mut label = String::with_capacity(last.len());
    for c in last.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            label.push(c);
        } else if !label.ends_with('-') {
            label.push('-');
        }
    }
    let base = cut(label.trim_matches('-'), MAX_LABEL - 6);
    let base = if base.is_empty() { "instance" } else { base };
    format!("{base}-{}", random_suffix(rng, 5))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::names::{NameKind, RESERVED_NAMES, validate_name};

    #[test]
    fn fqdn_shape() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let fqdn = service_fqdn("my-service", "dev", "cloud.localhost", &mut rng);
            let (label, rest) = fqdn.split_once('.').unwrap();
            assert_eq!(rest, "dev.cloud.localhost");
            let suffix = label.strip_prefix("my-service-").unwrap();
            assert_eq!(suffix.len(), 8);
            assert!(suffix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{fqdn}");
        }
        let long = format!("{}-{}", "a".repeat(53), "b".repeat(9));
        let fqdn = service_fqdn(&long, "dev", "x.io", &mut rng);
        let label = fqdn.split('.').next().unwrap();
        assert!(label.len() <= 63 && !label.contains("--"), "{label}");
        validate_name(NameKind::Service, label).unwrap();
    }

    #[test]
    fn generated_names_are_valid_and_varied() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::HashSet::new();
        for w in ADJECTIVES.iter().chain(NOUNS) {
            assert!(!RESERVED_NAMES.contains(w), "{w}");
        }
        for _ in 0..500 {
            let name = random_service_name(&mut rng);
            validate_name(NameKind::Service, &name).unwrap();
            seen.insert(name);
        }
        assert!(seen.len() > 400, "only {} distinct names", seen.len());
    }

    #[test]
    fn instance_names_follow_the_image() {
        let mut rng = StdRng::seed_from_u64(3);
        let cases = [
            ("hello", "hello"),
            ("registry/My_App:v1", "v1"),
            ("org/My_App", "my-app"),
            ("__", "instance"),
            (&"x".repeat(80), &"x".repeat(57)),
        ];
        for (image, base) in cases {
            let name = instance_name(image, &mut rng);
            let (b, suffix) = name.rsplit_once('-').unwrap();
            assert_eq!((b, suffix.len()), (base, 5), "{image}");
            validate_name(NameKind::Instance, &name).unwrap();
        }
    }
}
