//! A service's own settings beside its ports and domains: the per-instance limits the edge balances by, and
//! scaling to zero.

/// The longest idle time after which a service may scale to zero, in seconds (a week): longer than any real idle
/// period worth stopping for, short enough that the edge's idle clocks stay small numbers.
pub const MAX_SCALE_TO_ZERO_SECS: i64 = 604_800;

/// Why a service's limits were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitsError {
    /// The soft limit is above the hard limit, so the edge would refuse requests before it prefers other instances.
    #[error("soft_limit {soft} must not exceed hard_limit {hard}")]
    SoftAboveHard {
        /// The soft limit.
        soft: u32,
        /// The hard limit.
        hard: u32,
    },
}

/// The soft limit is at most the hard limit when both are set (each one's bounds are checked as the body is
/// read). A change is checked with the limits it leaves, the stored ones where it keeps them.
pub fn check_limits(soft: Option<u32>, hard: Option<u32>) -> Result<(), LimitsError> {
    match (soft, hard) {
        (Some(soft), Some(hard)) if soft > hard => Err(LimitsError::SoftAboveHard { soft, hard }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CreateService, UpdateService};

    #[test]
    fn the_soft_limit_is_at_most_the_hard_limit() {
        for ok in [(None, None), (Some(1), Some(1)), (None, Some(5)), (Some(7), None), (Some(4), Some(5))] {
            assert_eq!(check_limits(ok.0, ok.1), Ok(()), "{ok:?}");
        }
        let e = check_limits(Some(6), Some(5)).unwrap_err();
        assert_eq!(e, LimitsError::SoftAboveHard { soft: 6, hard: 5 });
        assert_eq!(e.to_string(), "soft_limit 6 must not exceed hard_limit 5");
    }

    #[test]
    fn scale_to_zero_is_from_one_second_to_a_week() {
        let create = |v: i64| serde_json::from_value::<CreateService>(serde_json::json!({"scale_to_zero_after": v}));
        let update = |v: i64| serde_json::from_value::<UpdateService>(serde_json::json!({"scale_to_zero_after": v}));
        for ok in [1, MAX_SCALE_TO_ZERO_SECS] {
            assert_eq!(create(ok).unwrap().scale_to_zero_after, Some(ok as u32));
            assert_eq!(update(ok).unwrap().scale_to_zero_after, Some(Some(ok as u32)));
        }
        for bad in [0, MAX_SCALE_TO_ZERO_SECS + 1] {
            assert!(create(bad).unwrap_err().to_string().contains("expected an integer from 1 to 604800"), "{bad}");
            assert!(update(bad).is_err(), "{bad}");
        }
        // The document declares the same bound.
        for schema in [
            serde_json::to_value(<CreateService as utoipa::PartialSchema>::schema()).unwrap(),
            serde_json::to_value(<UpdateService as utoipa::PartialSchema>::schema()).unwrap(),
        ] {
            let field = &schema["properties"]["scale_to_zero_after"];
            assert_eq!((field["minimum"].as_i64(), field["maximum"].as_i64()), (Some(1), Some(MAX_SCALE_TO_ZERO_SECS)));
        }
    }
}
