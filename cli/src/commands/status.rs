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
    let hosts = hosts::resolve(
        &args.hosts,
        &args.fleet.flake,
        &args.nix.path,
        &args.fleet.ssh,
    )?;
    let opts = ssh_options(&args.fleet.ssh);
    // Reading is harmless: every host at once, a failure stops nothing.
    let results = hosts::runtime()?.block_on(hosts::on_hosts(
        hosts.clone(),
        Policy::all_at_once(hosts.len()),
        |_| true,
        |(name, dest, elev)| {
            let opts = opts.clone();
            async move { host_status(&name, &dest, &opts, elev).await }
        },
    ));
    let mut human = String::new();
    let mut json_hosts = Vec::new();
    let mut failed = Vec::new();
    for ((name, _, _), result) in hosts.iter().zip(results) {
        match result {
            Ran::Done(Ok(services)) => {
                human += &ui::host_status(name, Ok(&services));
                json_hosts.push(json!({"host": name, "services": services}));
            }
            Ran::Done(Err(e)) => {
                let e = e.to_string();
                human += &ui::host_status(name, Err(&e));
                json_hosts.push(json!({"host": name, "error": e}));
                failed.push(e);
            }
            // As before the runner: a host whose task died is left out.
            Ran::Skipped(_) => {}
        }
    }
    ui.result(&json!({ "hosts": json_hosts }), &human);
    if let Some(first) = failed.into_iter().next() {
        return Err(Error::Remote(first));
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
