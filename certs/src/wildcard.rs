//! Certificates the platform CA issues to the platform's own servers and replaces before they end: the wildcard
//! (`*.<zone>` and `<zone>`) an edge serves for every service name, and the API's certificate for its own names.
//! Whoever serves one is given each issued certificate through a closure, so this crate does not know the edge's
//! certificate store or the API's TLS settings.

use std::time::Duration;

use time::OffsetDateTime;

use crate::{CertsError, Issued, PlatformCa};

/// Validity of each wildcard.
pub const VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long before its end a wildcard is replaced.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Wait after a failed renewal before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What a caller's closure returns when it cannot serve a certificate.
pub type ServeError = Box<dyn std::error::Error + Send + Sync>;

/// Why a certificate could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WildcardError {
    /// The platform CA could not issue it.
    #[error("cannot issue a platform certificate for {names}")]
    Issue {
        /// The names it was for, joined by ", ".
        names: String,
        /// What failed.
        #[source]
        source: CertsError,
    },
    /// The caller's closure refused it.
    #[error("cannot serve a platform certificate for {names}")]
    Serve {
        /// The names it was for, joined by ", ".
        names: String,
        /// What failed.
        #[source]
        source: ServeError,
    },
}

/// Issues the wildcard of `zone` now and hands it to `serve`, then keeps replacing it [`RENEW_BEFORE`] its end
/// (hourly retries on failure) in the returned task, which runs until aborted. The first failure is returned.
pub fn serve_and_renew<F>(ca: PlatformCa, zone: String, serve: F) -> Result<tokio::task::JoinHandle<()>, WildcardError>
where
    F: FnMut(Issued) -> Result<(), ServeError> + Send + 'static,
{
    serve_and_renew_names(ca, vec![format!("*.{zone}"), zone], serve)
}

/// [`serve_and_renew`] for a certificate of `names` (DNS names, wildcards or IP addresses).
pub fn serve_and_renew_names<F>(
    ca: PlatformCa,
    names: Vec<String>,
    mut serve: F,
) -> Result<tokio::task::JoinHandle<()>, WildcardError>
where
    F: FnMut(Issued) -> Result<(), ServeError> + Send + 'static,
{
    let mut not_after = issue(&ca, &names, &mut serve)?;
    Ok(tokio::spawn(async move {
        loop {
            let wait = (not_after - RENEW_BEFORE - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
            tokio::time::sleep(wait.try_into().unwrap_or(Duration::ZERO).max(Duration::from_secs(1))).await;
            match issue(&ca, &names, &mut serve) {
                Ok(t) => not_after = t,
                Err(e) => {
                    let error = cloud_domain::error_chain(&e);
                    tracing::warn!(%error, "cannot renew a platform certificate; retrying in an hour");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }))
}

fn issue<F>(ca: &PlatformCa, names: &[String], serve: &mut F) -> Result<OffsetDateTime, WildcardError>
where
    F: FnMut(Issued) -> Result<(), ServeError>,
{
    let joined = || names.join(", ");
    let issued = ca.issue(names, VALIDITY).map_err(|source| WildcardError::Issue { names: joined(), source })?;
    let not_after = issued.not_after;
    serve(issued).map_err(|source| WildcardError::Serve { names: joined(), source })?;
    tracing::info!(names = %joined(), not_after = %not_after, "serving a certificate of the platform CA");
    Ok(not_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_wildcard_is_handed_over_valid_for_ninety_days_and_a_refusal_is_returned() {
        let store = cloud_tests::fresh_store().await;
        let key = crate::seal::SecretKey::from_bytes(&[7; 32]);
        let ca = PlatformCa::load_or_create(&store, &key).await.unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let renewal = serve_and_renew(ca, "dev.cloud.localhost".into(), move |issued| {
            tx.send(issued.not_after).map_err(|e| e.into())
        })
        .unwrap();
        let not_after = rx.recv().unwrap();
        let days = (not_after - OffsetDateTime::now_utc()).whole_days();
        assert!((89..=90).contains(&days), "{days}");
        renewal.abort();

        let ca = PlatformCa::load_or_create(&store, &key).await.unwrap();
        let err = serve_and_renew(ca, "dev.cloud.localhost".into(), |_| Err("no room".into())).unwrap_err();
        assert!(
            matches!(&err, WildcardError::Serve { names, .. } if names == "*.dev.cloud.localhost, dev.cloud.localhost"),
            "{err:?}"
        );
    }
}
