//! Image references as users write them: `[host[:port]/]repository[:tag][@sha256:...]`.

use std::fmt;

use crate::{Digest, OciError};

/// Where an image lives in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` of the registry.
    pub registry: String,
    /// The repository path, e.g. `library/nginx`.
    pub repository: String,
    /// The tag, when no digest pins the image (default `latest`).
    pub tag: Option<String>,
    /// The manifest digest, when pinned.
    pub digest: Option<Digest>,
}

/// The registry of references that name none (Docker's default).
pub const DEFAULT_REGISTRY: &str = "docker.io";

impl Reference {
    /// Parses a reference. The first path component names the registry when it has a `.` or a `:` or is
    /// `localhost`, as Docker reads it; otherwise the registry is Docker Hub.
    pub fn parse(input: &str) -> Result<Self, OciError> {
        let err = |reason: &str| OciError::Reference { input: input.into(), reason: reason.into() };
        if input.is_empty() || input.len() > 512 {
            return Err(err("must be 1 to 512 characters"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => (rest, Some(Digest::parse(d).map_err(|_| err("the digest must be sha256:<64 hex>"))?)),
            None => (input, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => (first.to_owned(), path),
            _ => (DEFAULT_REGISTRY.to_owned(), rest),
        };
        // A tag follows the last ':' after the last '/'.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_owned())),
            _ => (path, None),
        };
        let host_ok =
            registry.split(':').next().is_some_and(|h| {
                !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            }) && registry.split_once(':').is_none_or(|(_, p)| {
                // Digits without a leading zero, as the OpenAPI document's pattern has it.
                !p.starts_with('0') && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
            });
        if !host_ok {
            return Err(err("the registry must be host[:port]"));
        }
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if !repository.split('/').all(component_ok) {
            return Err(err("the repository must be lowercase path components of [a-z0-9._-]"));
        }
        if let Some(t) = &tag
            && (t.is_empty()
                || t.len() > 128
                || !t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                || t.starts_with(['.', '-']))
        {
            return Err(err("the tag must be 1 to 128 of [A-Za-z0-9._-], not starting with '.' or '-'"));
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_owned()
        };
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_owned()) } else { tag };
        Ok(Self { registry, repository, tag, digest })
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.as_str(),
            (None, Some(t)) => t,
            (None, None) => "latest",
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_reads_them() {
        let d = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        for (input, registry, repo, tag) in [
            ("nginx", "docker.io", "library/nginx", Some("latest")),
            ("nginx:1.25", "docker.io", "library/nginx", Some("1.25")),
            ("user/app", "docker.io", "user/app", Some("latest")),
            ("127.0.0.1:5000/hello:v1", "127.0.0.1:5000", "hello", Some("v1")),
            ("localhost/a/b", "localhost", "a/b", Some("latest")),
            ("reg.example.com/a/b:t", "reg.example.com", "a/b", Some("t")),
        ] {
            let r = Reference::parse(input).unwrap();
            assert_eq!(
                (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref(), r.digest.is_some()),
                (registry, repo, tag, false),
                "{input}"
            );
        }
        let pinned = Reference::parse(&format!("127.0.0.1:5000/hello@{d}")).unwrap();
        assert_eq!((pinned.tag.as_deref(), pinned.manifest_ref()), (None, d));
        assert_eq!(pinned.to_string(), format!("127.0.0.1:5000/hello@{d}"));
        for bad in ["", "Upper/case", "a//b", "host:0/x", "x:", "x:-t", "x@sha256:12", "h:99999/x", "a/../b", "ä"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
