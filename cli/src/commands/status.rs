//! `attache status`: what is attached on hosts (image, version, sha256,
//! unit states), read from the units' portable drop-ins.

use serde_json::json;

use super::hosts::{self, ssh_options, Policy, Ran};
use crate::cli::StatusArgs;
use crate::deploy::{self, HostSession};
use crate::error::Error;
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
    let results: Vec<(&str, Result<Vec<deploy::ServiceStatus>, String>)> = hosts
        .iter()
        .zip(results)
        .map(|((name, _, _), r)| {
            let r = match r {
                Ran::Done(r) => r.map_err(|e| e.to_string()),
                Ran::Skipped(why) => Err(format!("{name}: {why}")),
            };
            (name.as_str(), r)
        })
        .collect();
    let view: Vec<(&str, Result<&[deploy::ServiceStatus], &str>)> = results
        .iter()
        .map(|(n, r)| (*n, r.as_deref().map_err(String::as_str)))
        .collect();
    let human = if args.wide {
        view.iter().map(|(n, r)| ui::host_status(n, *r)).collect()
    } else {
        ui::fleet_status(&view)
    };
    let json_hosts: Vec<serde_json::Value> = results
        .iter()
        .map(|(name, r)| match r {
            Ok(services) => json!({"host": name, "services": services}),
            Err(e) => json!({"host": name, "error": e}),
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

async fn host_status(
    name: &str,
    dest: &Destination,
    opts: &SshOptions,
    elev: Elevation,
) -> Result<Vec<deploy::ServiceStatus>, deploy::HostError> {
    let s = HostSession::connect(name, dest, opts, elev).await?;
    let r = deploy::host_status(&s).await;
    s.close().await;
    r
}
