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

/// A unit that runs a program for as long as it is up: a service that is
/// not a oneshot. Only such a unit can restart, run from an image or still
/// be setting its program up.
fn long_running(unit: &str, st: &UnitState) -> bool {
    unit.ends_with(".service") && st.kind != "oneshot"
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
        if long_running(u, a) {
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
    /// The host's uptime clock then, in hundredths of a second.
    pub at: u64,
    /// The host's monotonic clock then, in microseconds, if it told.
    pub monotonic: Option<u64>,
}

impl Started {
    pub fn parse(out: &str) -> Option<Started> {
        let at = ops::parse_uptime(out)?;
        Some(Started {
            at,
            // The monotonic clock never runs ahead of the uptime clock
            // (which also counts suspends), beyond the moment between the
            // two reads. When it does, `/proc/timer_list` is the kernel's
            // and the uptime a time namespace's, as systemd's timestamps
            // may be too: neither function below may go by it then.
            monotonic: ops::parse_monotonic(out).filter(|us| us / 10_000 <= at + 100),
            units: ops::parse_show(out),
        })
    }

    /// How long before the sample each unit became active, when the host
    /// told its monotonic clock and the unit has been active at all.
    fn up_for(&self) -> impl Iterator<Item = (&String, Duration)> {
        self.units.iter().filter_map(move |(name, u)| {
            let since = u.since.parse::<u64>().ok().filter(|&us| us > 0)?;
            Some((
                name,
                Duration::from_micros(self.monotonic?.saturating_sub(since)),
            ))
        })
    }

    /// A long-running service among `units` that is active but became so
    /// before this activation began (at most `window` before the sample:
    /// how long the activation took, as attache saw it). Its process is the
    /// one from before the deploy: portablectl ignores a restart that fails
    /// (and exits 0), and `RootImage` already names the new image once the
    /// unit files are reloaded, so nothing else would tell.
    pub fn not_restarted(&self, units: &[String], window: Duration) -> Option<String> {
        self.up_for()
            .filter(|(name, _)| units.contains(name))
            .filter(|(name, _)| {
                let st = &self.units[*name];
                st.active == "active" && long_running(name, st)
            })
            .find(|(_, ago)| *ago > window)
            .map(|(name, _)| name.clone())
    }

    /// When the settle time began, on the uptime clock: when the last of
    /// the units became active, which is before the sample by the time
    /// portablectl took to start the others and return (about 2 s on a
    /// slow host). The settle time is how long a unit must stay up without
    /// a restart, so that time counts. The sample's own time when the host
    /// did not tell its monotonic clock, no unit became active, the last
    /// one did so more than `window` before the sample (no unit started in
    /// this activation), or a unit's program had not started yet (systemd
    /// was still mounting its image: it has been running for no time).
    pub fn settle_from(&self, window: Duration) -> u64 {
        if self.units.values().any(|u| u.pending) {
            return self.at;
        }
        match self.up_for().map(|(_, ago)| ago).min() {
            Some(ago) if ago <= window => self.at.saturating_sub(ago.as_millis() as u64 / 10),
            _ => self.at,
        }
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
    started: Option<(Started, Duration)>,
) -> Result<(), HostError> {
    let units = units_to_check(&svc.units);
    let show = ops::show(&units);
    let mut before = None;
    let mut parts = Vec::new();
    if let (Some(settle), false) = (settle, units.is_empty()) {
        match started {
            Some((started, window)) => {
                if let Some(u) = started.not_restarted(&units, window) {
                    return Err(unhealthy(
                        s,
                        image,
                        format!("{u} did not restart: it still runs the process from before this deploy"),
                    ));
                }
                let from = started.settle_from(window);
                parts.push(ops::Part::from(ops::settle_until(from, settle)));
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
        parts.push(ops::Part::from(show.clone()));
    }
    let checks_at = parts.len();
    parts.extend(svc.checks.iter().map(|c| ops::Part::from(ops::check(c))));
    let outs = if parts.is_empty() {
        Vec::new()
    } else {
        s.batch(&parts, Stage::Health).await?
    };
    if !units.is_empty() {
        let mut after =
            ops::parse_show(s.part_ok(&parts[show_at], &outs[show_at], Stage::Health)?);
        let mut before = before.unwrap_or_else(|| after.clone());
        // A program that had not started by the last sample has not been
        // up at all: one more settle time from here, then it must run.
        if let (Some(settle), Some(_)) = (settle, pending(&units, &after)) {
            tokio::time::sleep(settle).await;
            let again = ops::parse_show(&s.step(&show, Stage::Health).await?.stdout);
            before = std::mem::replace(&mut after, again);
            if let Some(u) = pending(&units, &after) {
                let why = format!(
                    "{u} has not started its program {}s after it was started (systemd is still setting it up; a larger --settle gives it longer)",
                    2 * settle.as_secs()
                );
                return Err(unhealthy(s, image, why));
            }
        }
        judge(&units, &before, &after, image).map_err(|r| unhealthy(s, image, r))?;
    }
    for (check, first) in svc.checks.iter().zip(&outs[checks_at..]) {
        run_check(s, check, image, first).await?;
    }
    Ok(())
}

/// A long-running service among `units` whose program has not started.
fn pending(units: &[String], shown: &BTreeMap<String, UnitState>) -> Option<String> {
    units
        .iter()
        .find(|u| {
            shown
                .get(*u)
                .is_some_and(|st| st.pending && long_running(u, st))
        })
        .cloned()
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

    fn started(monotonic: Option<u64>, since: &[&str]) -> Started {
        Started {
            units: since
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let u = UnitState {
                        since: (*s).to_owned(),
                        ..UnitState::default()
                    };
                    (format!("u{i}.service"), u)
                })
                .collect(),
            at: 10_000,
            monotonic,
        }
    }

    #[test]
    fn settle_counts_from_the_last_unit_up() {
        let w = Duration::from_secs(8);
        // Sample at 100.00 s uptime and 50 s monotonic; units up at 49.2 s
        // and 48.5 s monotonic: the settle time began 0.8 s before it.
        let s = started(Some(50_000_000), &["49200000", "48500000"]);
        assert_eq!(s.settle_from(w), 10_000 - 80);
        // A unit that never became active (0) does not count.
        let s = started(Some(50_000_000), &["49200000", "0"]);
        assert_eq!(s.settle_from(w), 10_000 - 80);
        // Up long before this activation began (or clocks that disagree):
        // from the sample, as if the units had just started.
        let s = started(Some(50_000_000), &["10000000"]);
        assert_eq!(s.settle_from(w), 10_000);
        // No monotonic clock, or no unit up: the sample's own time.
        assert_eq!(started(None, &["49200000"]).settle_from(w), 10_000);
        assert_eq!(started(Some(50_000_000), &["0", ""]).settle_from(w), 10_000);
    }

    #[test]
    fn a_service_still_up_from_before_did_not_restart() {
        let w = Duration::from_secs(8);
        let mut s = started(Some(50_000_000), &["49200000", "10000000"]);
        for u in s.units.values_mut() {
            u.active = "active".into();
        }
        let all: Vec<String> = s.units.keys().cloned().collect();
        assert_eq!(s.not_restarted(&all, w), Some("u1.service".to_owned()));
        // Only the units checked, and only long-running services: a
        // oneshot that ran before stays done; a failed one is judged.
        assert_eq!(s.not_restarted(&all[..1], w), None);
        s.units.get_mut("u1.service").unwrap().kind = "oneshot".into();
        assert_eq!(s.not_restarted(&all, w), None);
        s.units.get_mut("u1.service").unwrap().kind = "simple".into();
        s.units.get_mut("u1.service").unwrap().active = "failed".into();
        assert_eq!(s.not_restarted(&all, w), None);
        // No monotonic clock: nothing to tell by.
        s.monotonic = None;
        s.units.get_mut("u1.service").unwrap().active = "active".into();
        assert_eq!(s.not_restarted(&all, w), None);
    }

    #[test]
    fn a_program_not_started_yet_has_been_up_for_no_time() {
        let w = Duration::from_secs(8);
        let mut s = started(Some(50_000_000), &["49200000"]);
        assert_eq!(s.settle_from(w), 10_000 - 80);
        s.units.get_mut("u0.service").unwrap().pending = true;
        assert_eq!(s.settle_from(w), 10_000);
        let units = vec!["u0.service".to_owned()];
        assert_eq!(pending(&units, &s.units).as_deref(), Some("u0.service"));
        s.units.get_mut("u0.service").unwrap().kind = "oneshot".into();
        assert_eq!(pending(&units, &s.units), None);
    }

    #[test]
    fn a_monotonic_clock_ahead_of_the_uptime_is_not_believed() {
        let out = |mono_ns: u64| format!("@uptime=100.00\n@mono={mono_ns}\n");
        // 100.5 s: the moment between the two reads.
        let s = Started::parse(&out(100_500_000_000)).unwrap();
        assert_eq!(s.monotonic, Some(100_500_000));
        // 150 s: another clock (a time namespace's uptime).
        assert_eq!(
            Started::parse(&out(150_000_000_000)).unwrap().monotonic,
            None
        );
    }

    #[test]
    fn a_sample_reads_both_clocks_with_builtins() {
        let script = ops::sample(&[]).text;
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(ops::parse_uptime(&out).is_some(), "{out}");
        // Root reads /proc/timer_list; others get no monotonic clock.
        let readable = std::fs::File::open("/proc/timer_list").is_ok();
        assert_eq!(ops::parse_monotonic(&out).is_some(), readable, "{out}");
    }

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
