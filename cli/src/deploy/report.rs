//! What a deploy tells: the events it emits while it runs (rendered by `ui`)
//! and the report it ends with, per host and per service (`--json`).

use serde::Serialize;

use super::plan::Action;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Connect,
    Lock,
    Preflight,
    Push,
    Activate,
    Health,
    Rollback,
    /// Disarming, checking that nothing moved, recording what `attache
    /// rollback` goes back to and pruning: one round-trip.
    Confirm,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connecting",
            Stage::Lock => "locking",
            Stage::Preflight => "preflight",
            Stage::Push => "pushing",
            Stage::Activate => "activating",
            Stage::Health => "health check",
            Stage::Rollback => "rolling back",
            Stage::Confirm => "confirming",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every service runs the new version and passed its checks.
    Healthy,
    /// The new version failed; the previous one is back (or none was there
    /// and the new one was detached).
    RolledBack,
    /// Failed, and the host may not be in its previous state.
    Failed,
    /// Not attempted (a canary failed, or a failure stopped the run).
    Skipped,
    /// Stopped by Ctrl-C or SIGTERM before any service changed.
    Interrupted,
    /// `--dry-run`: the plan only.
    Planned,
    /// Nothing to change, and it still passed its checks (services only).
    Unchanged,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Healthy => "healthy",
            Outcome::RolledBack => "rolled-back",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Interrupted => "interrupted",
            Outcome::Planned => "planned",
            Outcome::Unchanged => "unchanged",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    pub stage: Stage,
    pub ms: u128,
    pub ok: bool,
    /// Commands run on the host during the stage.
    pub round_trips: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceReport {
    pub name: String,
    pub image: String,
    pub sha256: String,
    pub upload: bool,
    pub action: Action,
    pub previous: Option<String>,
    /// What changes in the service's per-host settings (never a value).
    pub settings: Vec<String>,
    pub outcome: Outcome,
    #[serde(flatten)]
    pub transfer: Transfer,
}

/// How an image reached the host (all zero and `None` when it was there).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Transfer {
    /// Bytes sent for this image: its signature (for the next upgrade) and
    /// the delta, or the whole image (or both, when a delta failed).
    pub bytes_sent: u64,
    /// What the delta spared: the image's size less the bytes sent.
    pub bytes_saved: u64,
    /// The image on the host the delta was made against.
    pub delta_basis: Option<String>,
    /// Why the whole image was sent instead of a delta.
    pub full_upload_because: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub host: String,
    pub outcome: Outcome,
    pub stages: Vec<StageTime>,
    /// Commands run on the host, connecting included: each waits for the
    /// host once over the open connection.
    pub round_trips: u32,
    pub bytes_sent: u64,
    /// What delta upgrades spared, over all services.
    pub bytes_saved: u64,
    pub services: Vec<ServiceReport>,
    pub error: Option<String>,
    pub rollback_error: Option<String>,
    /// Another attache held the host's lock: nothing was done.
    #[serde(skip)]
    pub busy: bool,
    /// The image whose activation or health check made the deploy roll
    /// back, when one did (a pull host remembers that version as failed).
    #[serde(skip)]
    pub culprit: Option<String>,
}

impl HostReport {
    pub fn new(host: &str) -> Self {
        HostReport {
            host: host.to_owned(),
            outcome: Outcome::Failed,
            stages: Vec::new(),
            round_trips: 0,
            bytes_sent: 0,
            bytes_saved: 0,
            services: Vec::new(),
            error: None,
            rollback_error: None,
            busy: false,
            culprit: None,
        }
    }

    pub fn skipped(host: &str, why: &str) -> Self {
        HostReport {
            outcome: Outcome::Skipped,
            error: Some(why.to_owned()),
            ..HostReport::new(host)
        }
    }

    /// Sets every service that changed to `outcome`.
    pub fn set_changed(&mut self, outcome: Outcome) {
        for s in &mut self.services {
            if s.action != Action::Unchanged {
                s.outcome = outcome;
            }
        }
    }
}

/// What a running deploy says about a host, as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    Stage(Stage),
    Note(&'a str),
    PushStarted {
        bytes: u64,
    },
    PushProgress {
        sent: u64,
    },
    Done {
        outcome: Outcome,
        error: Option<&'a str>,
    },
}

/// Where events go: the terminal's renderer, or a test's recorder.
pub trait Events: Send + Sync {
    fn emit(&self, host: &str, event: Event<'_>);
}
