//! The run lifecycle's vocabulary in one place (API.md "Runs"): a run's and a step's
//! statuses, which changes between them are legal, the sets other code asks about
//! (unfinished, final), and the error kinds a step fails with. The engine
//! (`sparkops-engine`) is the only writer of these statuses; everything else reads them
//! through these types.

use std::fmt;

/// Declares a closed set of names: the enum, `ALL`, `as_str`, `parse` and `Display`.
macro_rules! names {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names! {
    /// A run's status.
    RunStatus {
        Queued = "queued",
        Running = "running",
        /// Nothing in flight but a step awaiting an approval.
        Waiting = "waiting",
        /// Paused by request: starts no new step, and its timeouts stand still.
        Paused = "paused",
        Succeeded = "succeeded",
        Failed = "failed",
        TimedOut = "timed_out",
        /// Asked to stop; the engine's next advance cancels what is left.
        Cancelling = "cancelling",
        Cancelled = "cancelled",
    }
}

impl RunStatus {
    /// A run that holds a concurrency slot and may still change.
    pub const UNFINISHED: &'static [RunStatus] = &[
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Waiting,
        RunStatus::Paused,
        RunStatus::Cancelling,
    ];
    /// A run whose clock runs: it may time out, and its approvals may expire. A paused
    /// run's does not.
    pub const TIMED: &'static [RunStatus] =
        &[RunStatus::Queued, RunStatus::Running, RunStatus::Waiting];
    /// A run that ended: it never changes again.
    pub const FINAL: &'static [RunStatus] = &[
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::TimedOut,
        RunStatus::Cancelled,
    ];
    /// A run a cancel request may stop (`cancelling` is already stopping).
    pub const CANCELLABLE: &'static [RunStatus] = &[
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Waiting,
        RunStatus::Paused,
    ];
    /// A run a pause request may pause.
    pub const PAUSABLE: &'static [RunStatus] =
        &[RunStatus::Queued, RunStatus::Running, RunStatus::Waiting];

    pub fn is_final(self) -> bool {
        !Self::UNFINISHED.contains(&self)
    }

    /// Whether the engine may move a run from `self` to `next`.
    pub fn may_become(self, next: RunStatus) -> bool {
        use RunStatus::*;
        match self {
            Queued => matches!(next, Running | Paused | Cancelling | Cancelled | TimedOut),
            Running | Waiting => matches!(
                next,
                Running | Waiting | Paused | Cancelling | Succeeded | Failed | TimedOut | Cancelled
            ),
            // Resumed (the next advance says running or waiting), or stopped.
            Paused => matches!(next, Running | Cancelling),
            Cancelling => next == Cancelled,
            Succeeded | Failed | TimedOut | Cancelled => false,
        }
    }
}

names! {
    /// A step's status.
    StepStatus {
        Pending = "pending",
        Ready = "ready",
        Running = "running",
        /// Waiting for `next_attempt_at`.
        Retrying = "retrying",
        /// Waiting for an approval, or held by a budget (until it has room, or an admin
        /// lets the call pass).
        Waiting = "waiting",
        Succeeded = "succeeded",
        Failed = "failed",
        Skipped = "skipped",
        Cancelled = "cancelled",
    }
}

impl StepStatus {
    /// A step with work left; a run's end cancels these.
    pub const UNFINISHED: &'static [StepStatus] = &[
        StepStatus::Pending,
        StepStatus::Ready,
        StepStatus::Running,
        StepStatus::Retrying,
        StepStatus::Waiting,
    ];
    /// A step something is happening to: an attempt running, a retry or an approval awaited.
    pub const IN_FLIGHT: &'static [StepStatus] = &[
        StepStatus::Running,
        StepStatus::Retrying,
        StepStatus::Waiting,
    ];

    /// Finished for good.
    pub fn is_final(self) -> bool {
        !Self::UNFINISHED.contains(&self)
    }

    /// Whether the engine may move a step from `self` to `next`.
    pub fn may_become(self, next: StepStatus) -> bool {
        use StepStatus::*;
        match self {
            Pending => matches!(next, Ready | Skipped | Cancelled),
            Ready => matches!(next, Running | Waiting | Cancelled),
            // A lease taken back makes a running step ready again; a budget holds it.
            Running => matches!(
                next,
                Succeeded | Failed | Retrying | Ready | Waiting | Cancelled
            ),
            Retrying => matches!(next, Ready | Cancelled),
            // A held step goes on when its budget lets it.
            Waiting => matches!(next, Succeeded | Failed | Ready | Cancelled),
            Succeeded | Failed | Skipped | Cancelled => false,
        }
    }
}

names! {
    /// Why a step attempt failed: what retry policies' `non_retryable` names and what the
    /// step's `error.kind` says.
    ErrorKind {
        /// A policy refused a model or tool call.
        PolicyViolation = "policy-violation",
        /// The step's input, a tool's answer or a model's arguments did not fit.
        Validation = "validation",
        Timeout = "timeout",
        ToolError = "tool-error",
        ProviderError = "provider-error",
        RateLimited = "rate-limited",
        Cancelled = "cancelled",
        /// An agent used up its iterations without a final answer.
        MaxIterations = "max-iterations",
        /// A person rejected an approval step.
        Rejected = "rejected",
        /// The control plane could not run the step (a bug or a lost dependency).
        Internal = "internal",
        /// Never emitted now; still accepted in retry policies saved when approval steps
        /// did not run yet.
        NotImplemented = "not-implemented",
    }
}

/// The names of `set`, for messages: `queued, running, ...`.
pub fn names<T: Copy + fmt::Display>(set: &[T]) -> String {
    let names: Vec<String> = set.iter().map(T::to_string).collect();
    names.join(", ")
}

/// The names of `set` as a SQL array, e.g. `array['queued', 'running']`.
pub fn sql_array<T: Copy + fmt::Display>(set: &[T]) -> String {
    format!("array[{}]", quoted(set))
}

/// A run or step status list as SQL, e.g. `('queued', 'running')`, for `status in ...`.
pub fn sql_list<T: Copy + fmt::Display>(set: &[T]) -> String {
    format!("({})", quoted(set))
}

/// `'a', 'b'`: the names of `set` as SQL string literals (they are fixed identifiers).
fn quoted<T: Copy + fmt::Display>(set: &[T]) -> String {
    let names: Vec<String> = set.iter().map(|s| format!("'{s}'")).collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        for s in RunStatus::ALL {
            assert_eq!(RunStatus::parse(s.as_str()), Some(*s));
        }
        for s in StepStatus::ALL {
            assert_eq!(StepStatus::parse(s.as_str()), Some(*s));
        }
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(k.as_str()), Some(*k));
        }
        assert_eq!(RunStatus::parse("done"), None);
    }

    #[test]
    fn a_final_status_never_changes_again() {
        for from in RunStatus::ALL.iter().filter(|s| s.is_final()) {
            assert!(RunStatus::ALL.iter().all(|to| !from.may_become(*to)));
        }
        for from in StepStatus::ALL.iter().filter(|s| s.is_final()) {
            assert!(StepStatus::ALL.iter().all(|to| !from.may_become(*to)));
        }
        assert!(RunStatus::Cancelling.may_become(RunStatus::Cancelled));
        assert!(!RunStatus::Cancelling.may_become(RunStatus::Succeeded));
        assert!(StepStatus::Running.may_become(StepStatus::Ready));
        assert!(!StepStatus::Pending.may_become(StepStatus::Running));
    }

    #[test]
    fn the_sets_are_what_sql_reads() {
        assert_eq!(
            sql_list(RunStatus::UNFINISHED),
            "('queued', 'running', 'waiting', 'paused', 'cancelling')"
        );
        assert_eq!(
            sql_list(StepStatus::IN_FLIGHT),
            "('running', 'retrying', 'waiting')"
        );
        assert!(RunStatus::TimedOut.is_final() && !RunStatus::Waiting.is_final());
        let finals: Vec<RunStatus> = RunStatus::ALL
            .iter()
            .copied()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(finals, RunStatus::FINAL);
        assert_eq!(
            sql_array(RunStatus::FINAL),
            "array['succeeded', 'failed', 'timed_out', 'cancelled']"
        );
        assert_eq!(
            names(RunStatus::ALL),
            "queued, running, waiting, paused, succeeded, failed, timed_out, cancelling, cancelled"
        );
    }
}
