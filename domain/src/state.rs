//! Instance states and the transitions a tenant may ask for.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        // utoipa does not see a `rename` whose text comes from a macro argument, and so documented `OnFailure`:
        // every spelling is the kebab-case of its variant, which it does see (a test holds them together).
        #[serde(rename_all = "kebab-case")]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $text)] $variant,)*
        }

        impl $name {
            /// The wire and database spelling.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text,)* }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)*
                    other => Err(format!(
                        concat!("unknown ", stringify!($name), " \"{}\" (expected one of: ", $($text, " ",)* ")"),
                        other
                    )),
                }
            }
        }
    };
}

wire_enum! {
    /// What the platform observes of an instance.
    InstanceState {
        /// Accepted, not started yet.
        Pending = "pending",
        /// Started, not yet accepting connections.
        Starting = "starting",
        /// Accepting connections.
        Running = "running",
        /// Being stopped or deleted: the edges send it no new requests, those in flight finish (within the
        /// platform's drain timeout), then it stops or goes.
        Draining = "draining",
        /// Being stopped.
        Stopping = "stopping",
        /// Not running, by request.
        Stopped = "stopped",
        /// Exited or never became ready; see the state reason.
        Failed = "failed",
        /// Gone.
        Deleted = "deleted",
    }
}

wire_enum! {
    /// What the tenant asked for.
    DesiredState {
        /// Keep it running.
        Running = "running",
        /// Keep it stopped.
        Stopped = "stopped",
    }
}

wire_enum! {
    /// When the platform restarts an instance that exited.
    RestartPolicy {
        /// Never.
        Never = "never",
        /// Whatever the exit code.
        Always = "always",
        /// Only after a non-zero exit.
        OnFailure = "on-failure",
    }
}

wire_enum! {
    /// What a rollout does with the instances it replaces (kraft cloud's vocabulary).
    RolloutStrategy {
        /// Each old instance drains and is deleted once a new one runs.
        Replace = "replace",
        /// Each old instance drains and stops (kept, to start again) once a new one runs.
        Stop = "stop",
        /// The old instances stay; the new ones join them.
        Keep = "keep",
    }
}

wire_enum! {
    /// Where a rollout is.
    RolloutState {
        /// Under way.
        Running = "running",
        /// Every new instance runs and no old one serves.
        Succeeded = "succeeded",
        /// A new instance failed or did not become ready in time: the rollout stopped, and the instances that
        /// were healthy keep serving.
        Failed = "failed",
        /// Cancelled by the tenant: the new instances that did not run went, the others stayed.
        Cancelled = "cancelled",
    }
}

#[allow(clippy::derivable_impls)]
impl Default for RolloutStrategy {
    fn default() -> Self {
        Self::Replace
    }
}

// Written out because the enum comes from a macro that does not take per-variant `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for RestartPolicy {
    fn default() -> Self {
        Self::Never
    }
}

/// The states an accepted request moves an instance to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// New desired state.
    pub desired: DesiredState,
    /// New observed state.
    pub state: InstanceState,
}

/// A state change the current state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The request does not apply in this state.
    #[error("{0}")]
    NotAllowed(String),
}

/// Asks a stopped or failed instance to run.
pub fn start(current: InstanceState) -> Result<Transition, StateError> {
    use InstanceState::*;
    match current {
        Stopped | Failed => Ok(Transition { desired: DesiredState::Running, state: Pending }),
        Draining | Stopping => {
            Err(StateError::NotAllowed(format!("instance is {current}; start it once it is stopped")))
        }
        Deleted => Err(StateError::NotAllowed("instance is deleted".into())),
        Pending | Starting | Running => Err(StateError::NotAllowed(format!("instance is already {current}"))),
    }
}

/// Asks an instance to stop. One that never started is stopped at once; one that serves drains first.
pub fn stop(current: InstanceState) -> Result<Transition, StateError> {
    use InstanceState::*;
    let to = |state| Ok(Transition { desired: DesiredState::Stopped, state });
    match current {
        Pending | Failed => to(Stopped),
        Starting => to(Stopping),
        Running => to(Draining),
        Draining | Stopping | Stopped => Err(StateError::NotAllowed(format!("instance is already {current}"))),
        Deleted => Err(StateError::NotAllowed("instance is deleted".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceState::*;
    use super::*;

    #[test]
    fn the_document_spells_each_state_as_the_wire_does() {
        fn documented<T: utoipa::PartialSchema>() -> Vec<String> {
            let schema = serde_json::to_value(T::schema()).unwrap();
            serde_json::from_value(schema["enum"].clone()).unwrap()
        }
        let wire = |all: &[&str]| all.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            documented::<InstanceState>(),
            wire(&["pending", "starting", "running", "draining", "stopping", "stopped", "failed", "deleted"])
        );
        assert_eq!(documented::<DesiredState>(), wire(&["running", "stopped"]));
        assert_eq!(documented::<RestartPolicy>(), wire(&["never", "always", "on-failure"]));
        for p in [RestartPolicy::Never, RestartPolicy::Always, RestartPolicy::OnFailure] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
    }

    #[test]
    fn start_and_stop_follow_the_table() {
        let run = |s| Transition { desired: DesiredState::Running, state: s };
        let halt = |s| Transition { desired: DesiredState::Stopped, state: s };
        let cases: [(InstanceState, Result<Transition, &str>, Result<Transition, &str>); 8] = [
            (Pending, Err("instance is already pending"), Ok(halt(Stopped))),
            (Starting, Err("instance is already starting"), Ok(halt(Stopping))),
            (Running, Err("instance is already running"), Ok(halt(Draining))),
            (Draining, Err("instance is draining; start it once it is stopped"), Err("instance is already draining")),
            (Stopping, Err("instance is stopping; start it once it is stopped"), Err("instance is already stopping")),
            (Stopped, Ok(run(Pending)), Err("instance is already stopped")),
            (Failed, Ok(run(Pending)), Ok(halt(Stopped))),
            (Deleted, Err("instance is deleted"), Err("instance is deleted")),
        ];
        for (state, want_start, want_stop) in cases {
            assert_eq!(start(state).map_err(|e| e.to_string()), want_start.map_err(String::from), "start {state}");
            assert_eq!(stop(state).map_err(|e| e.to_string()), want_stop.map_err(String::from), "stop {state}");
        }
    }

    #[test]
    fn wire_spellings_round_trip() {
        for p in [RestartPolicy::Never, RestartPolicy::Always, RestartPolicy::OnFailure] {
            assert_eq!(p.as_str().parse::<RestartPolicy>(), Ok(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        assert_eq!(RestartPolicy::OnFailure.as_str(), "on-failure");
        assert!("sometimes".parse::<RestartPolicy>().unwrap_err().contains("on-failure"));
        for s in [Pending, Starting, Running, Draining, Stopping, Stopped, Failed, Deleted] {
            assert_eq!(s.as_str().parse::<InstanceState>(), Ok(s));
        }
    }
}
