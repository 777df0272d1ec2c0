//! Is a service healthy: its enabled units active and not restarting over a
//! settle time, running from the image we meant, and the inventory's checks
//! passing.

use std::collections::BTreeMap;
use std::time::Duration;

use super::error::{Cause, HostError};
use super::ops::{self, UnitState};
use super::report::Stage;
use super::session::HostSession;
use super::ServicePlan;
use crate::build::BuiltUnit;
use crate::inventory::Check;
use crate::names::basename;

/// The units whose state proves the service runs: those attach enables
/// (they have an `[Install]` section), never templates, which cannot run
/// by themselves.
pub fn units_to_check(units: &[BuiltUnit]) -> Vec<String> {
    units
        .iter()
        .filter(|u| u.install && !u.name.contains("@."))
        .map(|u| u.name.clone())
        .collect()
}

/// Judges two samples taken a settle time apart.
pub fn judge(
    units: &[String],
    before: &BTreeMap<String, UnitState>,
    after: &BTreeMap<String, UnitState>,
    image: &str,
) -> Result<(), String> {
    for u in units {
        let (Some(b), Some(a)) = (before.get(u), after.get(u)) else {
            return Err(format!("{u} is not known to systemd"));
        };
        let oneshot_done = a.kind == "oneshot" && a.result == "success";
        if a.active != "active" && !oneshot_done {
            return Err(format!(
                "{u} is {} ({}, result {})",
                a.active, a.sub, a.result
            ));
        }
        // README: sockets must listen (`running`: listening, and its
        // service was started on it).
        if u.ends_with(".socket") && !matches!(a.sub.as_str(), "listening" | "running") {
            return Err(format!("{u} is {} but not listening ({})", a.active, a.sub));
        }
        if u.ends_with(".service") && a.kind != "oneshot" {
            if b.restarts != a.restarts || b.since != a.since {
                return Err(format!(
                    "{u} restarted during the settle time (restarts {} -> {})",
                    b.restarts, a.restarts
                ));
            }
            if !a.root_image.is_empty() && a.root_image != image {
                return Err(format!("{u} runs {} instead of {image}", a.root_image));
            }
        }
    }
    Ok(())
}

fn unhealthy(s: &HostSession, image: &str, reason: String) -> HostError {
    Cause::Unhealthy {
        image: basename(image).to_owned(),
        reason,
    }
    .at(s.host(), Stage::Health)
}

/// The first sample of a settle time, taken by the activation's own
/// command (see [`ops::sample`]).
pub struct Started {
    pub units: BTreeMap<String, UnitState>,
    /// The host's clock then, in hundredths of a second.
    pub at: u64,
}

impl Started {
    pub fn parse(out: &str) -> Option<Started> {
        Some(Started {
            at: ops::parse_uptime(out)?,
            units: ops::parse_show(out),
        })
    }
}

/// Checks a service: its units (sampled twice, a `settle` time apart;
/// once when `settle` is `None`, for a service that did not change and so
/// has nothing to settle) and then the inventory's checks, whose first
/// attempts share the last sample's round-trip. With `started`, the first
/// sample is that one and the host waits out the settle time from its
/// clock then, in the same round-trip as the last sample.
pub async fn health(
    s: &HostSession,
    svc: &ServicePlan,
    image: &str,
    settle: Option<Duration>,
    started: Option<Started>,
) -> Result<(), HostError> {
    let units = units_to_check(&svc.units);
    let show = ops::show(&units);
    let mut before = None;
    let mut parts = Vec::new();
    if let (Some(settle), false) = (settle, units.is_empty()) {
        match started {
            Some(started) => {
                parts.push(ops::Part::from(ops::settle_until(started.at, settle)));
                before = Some(started.units);
            }
            None => {
                before = Some(ops::parse_show(&s.step(&show, Stage::Health).await?.stdout));
                tokio::time::sleep(settle).await;
            }
        }
    }
    let show_at = parts.len();
    if !units.is_empty() {
        parts.push(ops::Part::from(show));
    }
    let checks_at = parts.len();
    parts.extend(svc.checks.iter().map(|c| ops::Part::from(ops::check(c))));
    let outs = if parts.is_empty() {
        Vec::new()
    } else {
        s.batch(&parts, Stage::Health).await?
    };
    if !units.is_empty() {
        let after = ops::parse_show(s.part_ok(&parts[show_at], &outs[show_at], Stage::Health)?);
        let before = before.as_ref().unwrap_or(&after);
        judge(&units, before, &after, image).map_err(|r| unhealthy(s, image, r))?;
    }
    for (check, first) in svc.checks.iter().zip(&outs[checks_at..]) {
        run_check(s, check, image, first).await?;
    }
    Ok(())
}

/// Tries a check again (its first attempt was `first`) until it passes or
/// runs out of tries.
async fn run_check(
    s: &HostSession,
    check: &Check,
    image: &str,
    first: &ops::PartOutput,
) -> Result<(), HostError> {
    if first.success() {
        return Ok(());
    }
    let script = ops::check(check);
    let mut last = tail(&first.output);
    for _ in 1..ops::check_retries(check) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let out = s.run(&script, Stage::Health).await?;
        if out.success() {
            return Ok(());
        }
        last = out.tail();
    }
    let what = match check {
        Check::Http { url, .. } => format!("HTTP check {url} failed"),
        Check::Command { command, .. } => format!("check `{command}` failed"),
    };
    Err(unhealthy(
        s,
        image,
        if last.is_empty() {
            what
        } else {
            format!("{what}: {last}")
        },
    ))
}

/// The last lines of a part's output, as [`RemoteOutput::tail`] gives them.
pub fn tail(output: &str) -> String {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// After a rollback: the units the old image runs are up and run from it.
/// Units the old image does not have show up as inactive with no root
/// image; only those it runs are judged.
pub async fn verify_back(
    s: &HostSession,
    units: &[BuiltUnit],
    image: &str,
    settle: Duration,
) -> Result<(), HostError> {
    let units = units_to_check(units);
    if units.is_empty() {
        return Ok(());
    }
    tokio::time::sleep(settle.min(Duration::from_secs(3))).await;
    let shown = ops::parse_show(&s.step(&ops::show(&units), Stage::Rollback).await?.stdout);
    let theirs: Vec<String> = units
        .into_iter()
        .filter(|u| {
            shown
                .get(u)
                .is_some_and(|st| st.root_image == image || !u.ends_with(".service"))
        })
        .collect();
    judge(&theirs, &shown, &shown, image).map_err(|reason| {
        Cause::Unhealthy {
            image: basename(image).to_owned(),
            reason,
        }
        .at(s.host(), Stage::Rollback)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_must_listen() {
        let units = vec!["echo.socket".to_owned()];
        let state = |active: &str, sub: &str| {
            BTreeMap::from([(
                "echo.socket".to_owned(),
                UnitState {
                    active: active.into(),
                    sub: sub.into(),
                    ..UnitState::default()
                },
            )])
        };
        for ok in ["listening", "running"] {
            let s = state("active", ok);
            judge(&units, &s, &s, "/x.raw").unwrap();
        }
        let s = state("active", "start-post");
        assert_eq!(
            judge(&units, &s, &s, "/x.raw").unwrap_err(),
            "echo.socket is active but not listening (start-post)"
        );
    }
}
