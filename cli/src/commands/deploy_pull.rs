//! `attache deploy` of pull hosts: set each one up over SSH (the agent, its
//! config and key, the timer) instead of building and pushing images; with
//! `--now`, run its agent once and report the outcome it recorded.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use super::hosts::{self, elevation, Policy, Ran};
use crate::cli::DeployArgs;
use crate::deploy::{
    self, Event, Events, HostPlan, Interrupt, Outcome, ServicePlan, ServiceSettings, Settings,
};
use crate::error::{Error, ExitCode};
use crate::inventory::Host;
use crate::pull::{setup, Last, State};
use crate::remote::Remote;
use crate::ui::Ui;

#[derive(Debug, serde::Serialize)]
struct PullReport {
    host: String,
    setup: Option<setup::Changes>,
    now: Option<Last>,
    /// What changed in the host's settings and secrets, staged through the
    /// push transaction (for the images it has attached).
    settings: Vec<String>,
    error: Option<String>,
    #[serde(skip)]
    exit: u8,
}

/// What setting the pull hosts up ended with, for a deploy that also
/// pushes: its error, and a `hosts[]` entry per pull host for `--json`.
pub struct Pulled {
    pub result: Result<(), Error>,
    pub hosts: Vec<serde_json::Value>,
}

/// Sets up every pull host in `pull`; `alone` when no push host is in this
/// deploy, so the pull hosts' report is the result.
pub fn run(
    pull: Vec<Host>,
    args: &DeployArgs,
    ui: &Ui,
    rt: &tokio::runtime::Runtime,
    stop: &Interrupt,
    alone: bool,
) -> Pulled {
    match set_up_all(pull, args, ui, rt, stop, alone) {
        Ok((result, reports)) => Pulled {
            result,
            hosts: reports.iter().map(host_entry).collect(),
        },
        Err(e) => Pulled {
            result: Err(e),
            hosts: Vec::new(),
        },
    }
}

/// A pull host in a deploy's `hosts[]`, beside the push hosts' reports.
fn host_entry(r: &PullReport) -> serde_json::Value {
    let mut v = json!(r);
    v["pull"] = json!(true);
    v["ok"] = json!(r.exit == 0);
    v
}

fn set_up_all(
    pull: Vec<Host>,
    args: &DeployArgs,
    ui: &Ui,
    rt: &tokio::runtime::Runtime,
    stop: &Interrupt,
    alone: bool,
) -> Result<(Result<(), Error>, Vec<PullReport>), Error> {
    let agent = setup::agent_executable().map_err(Error::Usage)?;
    let transaction = Arc::new(super::deploy::transaction_settings(args));
    let ssh = transaction.ssh.clone();
    let (dry_run, now) = (args.dry_run, args.now);
    let (settle, keep, rollback_after) = (args.settle, args.keep.max(1), args.rollback_after);
    let sudo = args.fleet.ssh.sudo;
    let policy = Policy {
        jobs: args.jobs.max(1),
        canary: 0,
        keep_going: true,
    };
    let ran = rt.block_on(hosts::on_hosts(
        pull,
        policy,
        |r: &PullReport| r.error.is_none(),
        |h: Host| {
            let (agent, ssh) = (agent.clone(), ssh.clone());
            let (transaction, stop) = (transaction.clone(), stop.clone());
            async move {
                let mut r = PullReport {
                    host: h.name.clone(),
                    setup: None,
                    now: None,
                    settings: Vec::new(),
                    error: None,
                    exit: 0,
                };
                let Some(pull) = h.pull.clone() else {
                    return r;
                };
                let remote =
                    match Remote::connect(&h.name, &h.destination, &ssh, elevation(h.sudo || sudo))
                        .await
                    {
                        Ok(rm) => rm,
                        Err(e) => {
                            r.error = Some(e.to_string());
                            r.exit = ExitCode::DeployFailed as u8;
                            return r;
                        }
                    };
                let cfg = setup::config(&h, &pull, settle, keep, rollback_after);
                let files = setup::files(&cfg, &pull.interval);
                match setup::set_up(&remote, &agent, &files, dry_run).await {
                    Ok(ch) => r.setup = Some(ch),
                    Err(e) => {
                        r.error = Some(e);
                        r.exit = ExitCode::DeployFailed as u8;
                    }
                }
                let mut state = None;
                if now && !dry_run && r.error.is_none() {
                    match setup::pull_now(&remote).await {
                        Ok(st) => {
                            if let Some(last) = &st.last {
                                r.exit = last.outcome.exit_code() as u8;
                                r.now = Some(last.clone());
                            }
                            state = Some(st);
                        }
                        Err(e) => {
                            r.error = Some(e);
                            r.exit = ExitCode::DeployFailed as u8;
                        }
                    }
                } else if r.error.is_none() {
                    match setup::read_state(&remote).await {
                        Ok(st) => state = st,
                        Err(e) => {
                            r.error = Some(e);
                            r.exit = ExitCode::DeployFailed as u8;
                        }
                    }
                }
                remote.close().await;
                if let Some(st) = state.filter(|_| r.error.is_none()) {
                    stage_settings(&h, &st, transaction, sudo, stop, &mut r).await;
                }
                r
            }
        },
    ));
    let reports: Vec<PullReport> = ran
        .into_iter()
        .filter_map(|r| match r {
            Ran::Done(r) => Some(r),
            Ran::Skipped(_) => None,
        })
        .collect();
    let mut human = String::new();
    for r in &reports {
        let line = match (&r.error, &r.setup, &r.now) {
            (Some(e), _, _) => format!("{}: pull host not set up: {e}", r.host),
            (None, Some(ch), None) if dry_run => {
                format!("{}: pull host, would set up: {}", r.host, ch.describe())
            }
            (None, Some(ch), None) => format!("{}: pull host, {}", r.host, ch.describe()),
            (None, _, Some(last)) => {
                format!("{}: pull host, {}: {}", r.host, last.outcome, last.why)
            }
            (None, None, None) => format!("{}: pull host", r.host),
        };
        human += &line;
        human.push('\n');
        for change in &r.settings {
            human += &format!("{}: {change}\n", r.host);
        }
    }
    let worst = reports.iter().map(|r| r.exit).max().unwrap_or(0);
    if alone {
        ui.result(
            &json!({ "ok": worst == 0, "dry_run": dry_run, "pull_hosts": reports }),
            &human,
        );
    } else {
        for l in human.lines() {
            ui.status("Pull", l);
        }
    }
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| r.exit != 0)
        .map(|r| match (&r.now, &r.error) {
            (Some(last), _) => format!("{} ({})", r.host, last.outcome),
            (None, Some(_)) => format!("{} (not set up)", r.host),
            (None, None) => r.host.clone(),
        })
        .collect();
    let summary = format!(
        "{} of {} pull hosts did not end well: {}",
        failed.len(),
        reports.len(),
        failed.join(", ")
    );
    let result = match worst {
        0 => Ok(()),
        2 => Err(Error::Remote(summary)),
        _ => Err(Error::Deploy { summary }),
    };
    Ok((result, reports))
}

/// Stages the host's settings and secrets exactly as a push deploy does
/// (settings are push-only): the push transaction over SSH, with the images
/// the host has attached as the images to run, so nothing is uploaded and
/// only changed settings restart their units (checked, rolled back on
/// failure). A service the host has not attached yet gets them at the
/// first deploy after it has.
async fn stage_settings(
    h: &Host,
    state: &State,
    transaction: Arc<Settings>,
    sudo: bool,
    stop: Interrupt,
    r: &mut PullReport,
) {
    let mut services = Vec::new();
    for s in &h.services {
        let Some(img) = state.images.get(&s.name) else {
            if h.settings.contains_key(&s.name) || h.secrets.contains_key(&s.name) {
                r.settings.push(format!(
                    "the settings of {} wait until the host has attached it; deploy again then",
                    s.name
                ));
            }
            continue;
        };
        let units: Vec<String> = img.units.iter().map(|u| u.name.clone()).collect();
        let mut settings = match ServiceSettings::load(
            &s.name,
            &units,
            h.settings.get(&s.name),
            h.secrets.get(&s.name),
            h.unencrypted_secrets,
        ) {
            Ok(settings) => settings,
            Err(e) => {
                r.error = Some(e.to_string());
                r.exit = ExitCode::BadInput as u8;
                return;
            }
        };
        // The agent may switch between reading its state and the lock.
        settings.image_as_is = true;
        services.push(ServicePlan {
            name: s.name.clone(),
            version: img.version.clone(),
            local: PathBuf::new(),
            sha256: img.sha256.clone(),
            size: img.size,
            units: img.units.clone(),
            prefixes: img.prefixes.clone(),
            checks: h.checks.get(&s.name).cloned().unwrap_or_default(),
            manifest: None,
            settings,
        });
    }
    if services.is_empty() {
        return;
    }
    let plan = HostPlan {
        name: h.name.clone(),
        destination: h.destination.clone(),
        elevation: elevation(h.sudo || sudo),
        profile: h.profile.clone(),
        services,
        local: false,
    };
    let report = deploy::deploy_host(plan, transaction, Quiet, stop, None).await;
    for sr in &report.services {
        for what in &sr.settings {
            r.settings.push(format!("{}: {what}", sr.name));
        }
    }
    if !matches!(report.outcome, Outcome::Healthy | Outcome::Planned) {
        r.error = Some(format!(
            "staging settings and secrets ended {}: {}",
            report.outcome,
            report.error.unwrap_or_default()
        ));
        r.exit = ExitCode::DeployFailed as u8;
    }
}

/// The push transaction's stages are not shown for a pull host's settings.
struct Quiet;

impl Events for Quiet {
    fn emit(&self, _host: &str, _event: Event<'_>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_host_in_hosts_says_it_is_one() {
        let r = PullReport {
            host: "p1".into(),
            setup: Some(setup::Changes {
                agent: true,
                ..Default::default()
            }),
            now: None,
            settings: Vec::new(),
            error: None,
            exit: 0,
        };
        let v = host_entry(&r);
        assert_eq!(v["host"], "p1");
        assert_eq!(v["pull"], true);
        assert_eq!(v["ok"], true);
        assert_eq!(v["setup"]["agent"], true);
        assert!(v.get("exit").is_none(), "{v}");
    }
}
