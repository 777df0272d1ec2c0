//! `attache status`: what is attached on hosts (image, version, sha256,
//! unit states), read from the units' portable drop-ins.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

use super::hosts::{self, ssh_options, Policy, Ran};
use crate::cli::StatusArgs;
use crate::deploy::{self, parse_show};
use crate::error::Error;
use crate::remote::{Destination, Elevation, Remote, SshOptions};
use crate::ui::Ui;

/// One attached image, as `attache status` shows it.
#[derive(Debug, Serialize)]
struct ServiceStatus {
    name: String,
    version: String,
    image: String,
    sha256: String,
    /// Unit -> "ACTIVE (SUB)", or "template".
    units: BTreeMap<String, String>,
}

pub fn run(args: &StatusArgs, ui: &Ui) -> Result<(), Error> {
    let hosts = hosts::resolve(&args.hosts, &args.flake, &args.nix.path, &args.ssh)?;
    let opts = ssh_options(&args.ssh);
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
                human += &format!("{name}\n");
                if services.is_empty() {
                    human += "  (no portable services attached)\n";
                }
                for s in &services {
                    human += &format!(
                        "  {:<12} {:<10} {}  sha256 {}\n",
                        s.name,
                        s.version,
                        s.image,
                        s.sha256.get(..12).unwrap_or(&s.sha256)
                    );
                    for (u, st) in &s.units {
                        human += &format!("      {u}: {st}\n");
                    }
                }
                json_hosts.push(json!({"host": name, "services": services}));
            }
            Ran::Done(Err(e)) => {
                human += &format!("{name}\n  error: {e}\n");
                json_hosts.push(json!({"host": name, "error": e.to_string()}));
                failed.push(e.to_string());
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
) -> Result<Vec<ServiceStatus>, deploy::DeployError> {
    let remote = Remote::connect(name, dest, opts, elev).await?;
    let listing = remote
        .run(deploy::LIST_ATTACHED, "reading attached images")
        .await?;
    // Group units by the image their drop-in names.
    let mut by_image: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in listing.stdout.lines() {
        if let Some((unit, img)) = line
            .split_once('\t')
            .and_then(|(u, first)| Some((u, deploy::dropin_image(first)?)))
        {
            by_image
                .entry(img.to_owned())
                .or_default()
                .push(unit.to_owned());
        }
    }
    let mut services = Vec::new();
    for (image, units) in by_image {
        let file = image.rsplit('/').next().unwrap_or(&image).to_owned();
        let stem = file.strip_suffix(".raw").unwrap_or(&file);
        let (svc, version) = stem.split_once('_').unwrap_or((stem, ""));
        let sha = deploy::remote_sha256(&remote, &image)
            .await?
            .unwrap_or_default();
        let real: Vec<String> = units
            .iter()
            .filter(|u| !u.contains("@."))
            .cloned()
            .collect();
        let states = parse_show(
            &remote
                .run(&deploy::show_script(&real), "reading unit states")
                .await?
                .stdout,
        );
        let units = units
            .iter()
            .map(|u| {
                let s = states
                    .get(u)
                    .map(|s| format!("{} ({})", s.active, s.sub))
                    .unwrap_or_else(|| "template".into());
                (u.clone(), s)
            })
            .collect();
        services.push(ServiceStatus {
            name: svc.to_owned(),
            version: version.to_owned(),
            image,
            sha256: sha,
            units,
        });
    }
    remote.close().await;
    Ok(services)
}
