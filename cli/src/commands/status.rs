//! `attache status`: what is attached on hosts (image, version, sha256,
//! unit states), read from the units' portable drop-ins.

use serde_json::json;

use super::hosts::{self, ssh_options, Policy, Ran};
use crate::cli::StatusArgs;
use crate::deploy::{self, HostSession};
use crate::error::Error;
use crate::pull::{self, setup};
use crate::remote::{Destination, Elevation, SshOptions};
use crate::ui::{self, Ui};

pub fn run(args: &StatusArgs, ui: &Ui) -> Result<(), Error> {
    let hosts = hosts::resolve(&args.hosts, &args.fleet.flake, &args.nix, &args.fleet.ssh)?;
    let opts = ssh_options(&args.fleet.ssh);
    // Reading is harmless: a failure stops nothing.
    let results = hosts::runtime()?.block_on(hosts::on_hosts(
        hosts.clone(),
        Policy::all_at_once(args.jobs.max(1)),
        |_| true,
        |(name, dest, elev)| {
            let opts = opts.clone();
            async move { host_status(&name, &dest, &opts, elev).await }
        },
    ));
    let mut pulls: Vec<(&str, pull::State)> = Vec::new();
    let results: Vec<(&str, Result<Vec<deploy::ServiceStatus>, String>)> = hosts
        .iter()
        .zip(results)
        .map(|((name, _, _), r)| {
            let r = match r {
                Ran::Done(r) => r
                    .map(|(services, state)| {
                        if let Some(st) = state {
                            pulls.push((name.as_str(), st));
                        }
                        services
                    })
                    .map_err(|e| e.to_string()),
                Ran::Skipped(why) => Err(format!("{name}: {why}")),
            };
            (name.as_str(), r)
        })
        .collect();
    let view: Vec<(&str, Result<&[deploy::ServiceStatus], &str>)> = results
        .iter()
        .map(|(n, r)| (*n, r.as_deref().map_err(String::as_str)))
        .collect();
    let mut human: String = if args.wide {
        view.iter().map(|(n, r)| ui::host_status(n, *r)).collect()
    } else {
        ui::fleet_status(&view)
    };
    human += &pull_table(&pulls);
    let json_hosts: Vec<serde_json::Value> = results
        .iter()
        .map(|(name, r)| {
            let mut v = match r {
                Ok(services) => json!({"host": name, "services": services}),
                Err(e) => json!({"host": name, "error": e}),
            };
            if let Some((_, st)) = pulls.iter().find(|(n, _)| n == name) {
                v["pull"] = json!(st);
            }
            v
        })
        .collect();
    let failed: Vec<&String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    ui.result(&json!({ "hosts": json_hosts }), &human);
    if let Some(first) = failed.first() {
        let more = match failed.len() {
            1 => String::new(),
            n => format!(" ({} more hosts could not be read)", n - 1),
        };
        return Err(Error::Remote(format!("{first}{more}")));
    }
    Ok(())
}

/// What a host attaches, and its pull state when it is a pull host.
async fn host_status(
    name: &str,
    dest: &Destination,
    opts: &SshOptions,
    elev: Elevation,
) -> Result<(Vec<deploy::ServiceStatus>, Option<pull::State>), String> {
    let s = HostSession::connect(name, dest, opts, elev)
        .await
        .map_err(|e| e.to_string())?;
    let r = deploy::host_status(&s).await.map_err(|e| e.to_string());
    let state = match &r {
        Ok(_) => setup::read_state(&s.remote).await,
        Err(_) => Ok(None),
    };
    s.close().await;
    Ok((r?, state.map_err(|e| format!("{name}: {e}"))?))
}

/// Per pull host and service: published, fetched and attached versions,
/// then the last outcome, when and why.
fn pull_table(pulls: &[(&str, pull::State)]) -> String {
    if pulls.is_empty() {
        return String::new();
    }
    let v = |m: &std::collections::BTreeMap<String, String>, k: &str| {
        m.get(k).cloned().unwrap_or_else(|| "-".into())
    };
    let mut rows = vec![[
        "PULL HOST".to_owned(),
        "SERVICE".into(),
        "PUBLISHED".into(),
        "FETCHED".into(),
        "ATTACHED".into(),
        "FAILED".into(),
    ]];
    let mut lasts = String::new();
    for (host, st) in pulls {
        let mut names: Vec<&String> = st.published.keys().chain(st.attached.keys()).collect();
        names.sort();
        names.dedup();
        for svc in names {
            rows.push([
                (*host).to_owned(),
                svc.clone(),
                v(&st.published, svc),
                v(&st.fetched, svc),
                v(&st.attached, svc),
                v(&st.failed, svc),
            ]);
        }
        if let Some(last) = &st.last {
            lasts += &format!(
                "{host}: last pull {} at {}: {}\n",
                last.outcome,
                super::logs::utc(last.at),
                last.why
            );
        }
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::from("\n");
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out + &lasts
}
