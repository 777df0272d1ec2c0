//! The one error a host ends with: which host, in which stage, and a typed
//! cause, rendered only when the user reads it.

use super::plan::PlanError;
use super::report::Stage;
use crate::remote::RemoteError;

#[derive(Debug, thiserror::Error)]
#[error("{host}: {cause}")]
pub struct HostError {
    pub host: String,
    pub stage: Stage,
    pub cause: Cause,
}

#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("another attache is deploying to this host ({holder}); wait for it to finish, or, if that attache is gone, free the host with `attache unlock {host}`")]
    Locked {
        holder: Box<super::ops::LockHolder>,
        host: String,
    },
    #[error("flock is missing, and attache needs it to keep two deploys apart; install util-linux on the host (apt install util-linux)")]
    NoFlock,
    #[error("the host could not store {image} ({says}); the partial file was removed and nothing was changed. Run the command again once the host can take it")]
    NotStored { image: String, says: String },
    #[error("the uploaded {image} has sha256 {got}, expected {want}; the upload was corrupted, nothing was changed. Run the command again")]
    Corrupt {
        image: String,
        got: String,
        want: String,
    },
    #[error("portablectl {verb} {image} failed:\n{output}")]
    Portablectl {
        verb: &'static str,
        image: String,
        output: String,
    },
    #[error("{image} is not healthy: {reason}")]
    Unhealthy { image: String, reason: String },
    #[error("the host's automatic rollback ran before attache could confirm the deploy (the checks took longer than --rollback-after); the host runs its previous services. Deploy again with a longer --rollback-after")]
    RevertedByHost,
    #[error("interrupted (Ctrl-C or SIGTERM) before {before}; the host runs what it ran before")]
    Interrupted { before: &'static str },
    #[error("a remote step failed ({doing}): {output}")]
    Step { doing: String, output: String },
    /// The request cannot be done on this host as it is (nothing changed).
    #[error("{0}")]
    Refused(String),
}

impl Cause {
    /// The image this cause blames: one that failed to activate or its
    /// health check.
    pub fn image(&self) -> Option<&str> {
        match self {
            Cause::Unhealthy { image, .. } | Cause::Portablectl { image, .. } => Some(image),
            _ => None,
        }
    }

    pub fn at(self, host: &str, stage: Stage) -> HostError {
        HostError {
            host: host.to_owned(),
            stage,
            cause: self,
        }
    }
}

impl HostError {
    /// A host that could not be reached or answered wrongly is the
    /// environment's fault; a refusal is the input's.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self.cause,
            Cause::Plan(
                PlanError::Collision(_)
                    | PlanError::TimerTooShort { .. }
                    | PlanError::UnknownProfile { .. }
            ) | Cause::Refused(_)
        )
    }
}
