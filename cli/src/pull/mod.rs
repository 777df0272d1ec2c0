//! Pull hosts (#16): hosts that fetch what `attache publish` wrote and
//! switch by themselves, through the same transaction a push deploy runs.
//!
//! - `agent`: `attache agent`, run by `attache-pull.service` on the host:
//!   fetch, verify, place, then `deploy::deploy_host` on this machine;
//! - `setup`: what `attache deploy` writes to a pull host over SSH, and
//!   `deploy --now`.
//!
//! The data here is what the host keeps: its config (written by deploy) and
//! its state (written by the agent, read by `status` and `deploy --now`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::inventory::Check;

pub mod agent;
pub mod setup;

pub const PULL_DIR: &str = "/var/lib/attache/pull";
pub const CONFIG: &str = "/var/lib/attache/pull/config.json";
pub const STATE: &str = "/var/lib/attache/pull/state.json";
/// Held by a running agent: one run at a time.
pub const AGENT_LOCK: &str = "/var/lib/attache/pull/agent.lock";
pub const ALLOWED_SIGNERS: &str = "/var/lib/attache/pull/allowed_signers";
pub const AGENT: &str = "/var/lib/attache/agent/attache";
pub const SERVICE_UNIT: &str = "attache-pull.service";
pub const TIMER_UNIT: &str = "attache-pull.timer";
/// The principal and namespace of `ssh-keygen -Y sign` in `attache publish`.
pub const SIGNER: &str = "attache-publish";

/// `/var/lib/attache/pull/config.json`: what the agent does, per host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub host: String,
    /// The publish directory's URL, without a trailing `/`.
    pub url: String,
    pub public_key: Option<String>,
    #[serde(default)]
    pub insecure_unsigned: bool,
    pub services: Vec<ServiceConfig>,
    /// Seconds a unit must stay up after activation (deploy's `--settle`).
    pub settle: u64,
    /// Images kept per service (deploy's `--keep`).
    pub keep: usize,
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Seconds after which the host's own revert fires if the agent dies
    /// mid-activation (deploy's `--rollback-after`).
    #[serde(default = "default_rollback_after")]
    pub rollback_after: u64,
}

fn default_profile() -> String {
    "default".into()
}

fn default_rollback_after() -> u64 {
    300
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub name: String,
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// `/var/lib/attache/pull/state.json`: what the agent saw and did last.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub checked_at: u64,
    /// Service -> the newest version in the verified `SHA256SUMS`.
    #[serde(default)]
    pub published: BTreeMap<String, String>,
    /// Service -> the newest version placed in `/var/lib/portables`.
    #[serde(default)]
    pub fetched: BTreeMap<String, String>,
    /// Service -> the version attached after the last run.
    #[serde(default)]
    pub attached: BTreeMap<String, String>,
    /// Service -> a version that failed its checks: not tried again until
    /// a newer one is published.
    #[serde(default)]
    pub failed: BTreeMap<String, String>,
    #[serde(default)]
    pub last: Option<Last>,
    /// Service -> the image attached after the last run, as a push deploy
    /// describes it: what `attache deploy` needs to stage the host's
    /// settings and secrets through the push transaction.
    #[serde(default)]
    pub images: BTreeMap<String, AttachedImage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedImage {
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub units: Vec<crate::build::BuiltUnit>,
    pub prefixes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Last {
    pub at: u64,
    pub outcome: PullOutcome,
    /// One sentence.
    pub why: String,
    /// Service -> the version this run went for.
    #[serde(default)]
    pub services: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullOutcome {
    /// At least one service switched, and every one passed its checks.
    Switched,
    /// Nothing newer: every service runs the newest it may.
    Unchanged,
    /// A new version failed its checks; the previous ones are back.
    RolledBack,
    /// The index, its signature or an image was not what it must be:
    /// nothing was placed or attached.
    Refused,
    /// The publish server could not be reached: nothing changed.
    Unreachable,
    /// Another attache held the host's lock: nothing changed, the next run
    /// tries again.
    Busy,
    /// Failed, and the host may not be where it was.
    Failed,
}

impl PullOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            PullOutcome::Switched => "switched",
            PullOutcome::Unchanged => "unchanged",
            PullOutcome::RolledBack => "rolled-back",
            PullOutcome::Refused => "refused",
            PullOutcome::Unreachable => "unreachable",
            PullOutcome::Busy => "busy",
            PullOutcome::Failed => "failed",
        }
    }

    /// What `attache deploy --now` exits with (README's table).
    pub fn exit_code(self) -> crate::error::ExitCode {
        use crate::error::ExitCode;
        match self {
            PullOutcome::Switched | PullOutcome::Unchanged => ExitCode::Ok,
            PullOutcome::Unreachable => ExitCode::Environment,
            PullOutcome::RolledBack
            | PullOutcome::Refused
            | PullOutcome::Failed
            | PullOutcome::Busy => ExitCode::DeployFailed,
        }
    }
}

impl std::fmt::Display for PullOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_state_read_as_the_contract_writes_them() {
        let c: Config = serde_json::from_str(
            r#"{"host": "p1", "url": "http://10.0.2.100", "public_key": null, "insecure_unsigned": true,
                "services": [{"name": "demo", "checks": [{"type": "http", "url": "http://127.0.0.1:8080/", "timeout": null, "retries": 10}]}],
                "settle": 3, "keep": 3}"#,
        )
        .unwrap();
        assert_eq!(c.services[0].checks.len(), 1);
        assert_eq!((c.profile.as_str(), c.rollback_after), ("default", 300));
        let back: Config = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let s: State = serde_json::from_str(
            r#"{"checked_at": 5, "published": {"demo": "2.0"}, "fetched": {"demo": "2.0"}, "attached": {"demo": "2.0"},
                "failed": {"demo": "3.0"}, "last": {"at": 5, "outcome": "rolled-back", "why": "x", "services": {"demo": "3.0"}}}"#,
        )
        .unwrap();
        assert_eq!(s.last.unwrap().outcome, PullOutcome::RolledBack);
    }
}
