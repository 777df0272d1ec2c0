//! `attache deploy` of pull hosts: set each one up over SSH (the agent, its
//! config and key, the timer) instead of building and pushing images; with
//! `--now`, run its agent once and report the outcome it recorded.

use serde_json::json;

use super::hosts::{self, elevation, ssh_options, Policy, Ran};
use crate::cli::DeployArgs;
use crate::error::{Error, ExitCode};
use crate::inventory::Host;
use crate::pull::{setup, Last};
use crate::remote::Remote;
use crate::ui::Ui;

#[derive(Debug, serde::Serialize)]
struct PullReport {
    host: String,
    setup: Option<setup::Changes>,
    now: Option<Last>,
    error: Option<String>,
    #[serde(skip)]
    exit: u8,
}

/// Sets up every pull host in `pull`; `alone` when no push host is in this
/// deploy, so the pull hosts' report is the result.
pub fn run(
    pull: Vec<Host>,
    args: &DeployArgs,
    ui: &Ui,
    rt: &tokio::runtime::Runtime,
    alone: bool,
) -> Result<(), Error> {
    for h in &pull {
        if !h.settings.is_empty() || !h.secrets.is_empty() {
            return Err(Error::Usage(format!(
                "{}: a pull host's settings and secrets are not staged by this attache yet; remove settings/secrets from its inventory entry or make it a push host",
                h.name
            )));
        }
    }
    let agent = setup::agent_executable().map_err(Error::Usage)?;
    let ssh = ssh_options(&args.fleet.ssh);
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
            async move {
                let mut r = PullReport {
                    host: h.name.clone(),
                    setup: None,
                    now: None,
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
                if now && !dry_run && r.error.is_none() {
                    match setup::pull_now(&remote).await {
                        Ok(state) => {
                            if let Some(last) = state.last {
                                r.exit = last.outcome.exit_code() as u8;
                                r.now = Some(last);
                            }
                        }
                        Err(e) => {
                            r.error = Some(e);
                            r.exit = ExitCode::DeployFailed as u8;
                        }
                    }
                }
                remote.close().await;
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
    match worst {
        0 => Ok(()),
        2 => Err(Error::Remote(summary)),
        _ => Err(Error::Deploy { summary }),
    }
}
