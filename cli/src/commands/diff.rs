//! `attache diff`: two images, two installables, or what a deploy would
//! push against what each host runs (read over SSH, without the host's
//! lock: nothing changes). Also `deploy --dry-run`'s per-host summary.

use serde::Serialize;
use serde_json::json;

use super::deploy::{build_all, image_dir, inventory_error};
use super::hosts::{self, elevation, ssh_options, Policy, Ran};
use crate::build::{self, PackChoice, Source};
use crate::cli::DiffArgs;
use crate::deploy::{self, HostSession};
use crate::diff::{self as closure, ClosureDiff};
use crate::error::Error;
use crate::image::{self, Manifest};
use crate::inventory;
use crate::nix::Installable;
use crate::remote::{Destination, Elevation, SshOptions};
use crate::ui::{self, Ui};

pub fn run(args: &DiffArgs, ui: &Ui) -> Result<(), Error> {
    match args.args.as_slice() {
        [a, b] if a.ends_with(".raw") && b.ends_with(".raw") => {
            let d = closure::diff(Some(&image_manifest(a)?), Some(&image_manifest(b)?));
            ui.result(&json!(d), &render_one(&d));
            Ok(())
        }
        [a, b] if a.contains('#') && b.contains('#') => {
            let (old, new) = (built_manifest(a, args, ui)?, built_manifest(b, args, ui)?);
            let d = closure::diff(Some(&old), Some(&new));
            ui.result(&json!(d), &render_one(&d));
            Ok(())
        }
        [target, rest @ ..] => on_hosts(args, target, rest.first().map(String::as_str), ui),
        [] => Err(Error::Usage(
            "name two images, two installables, or a host".into(),
        )),
    }
}

/// Nothing at all for identical closures, like `nix store diff-closures`.
fn render_one(d: &ClosureDiff) -> String {
    if d.is_empty() {
        return String::new();
    }
    format!("{}\n{}", ui::diff_heading(d), ui::closure_diff(d))
}

fn image_manifest(path: &str) -> Result<Manifest, Error> {
    image::read_manifest(std::path::Path::new(path))?.ok_or_else(|| {
        Error::Usage(format!(
            "{path} has no manifest: it was packed by an attache from before manifests (or another tool); rebuild it with `attache build`, then diff again"
        ))
    })
}

fn built_manifest(installable: &str, args: &DiffArgs, ui: &Ui) -> Result<Manifest, Error> {
    let src = args.nix.source(Installable::Flake(installable.to_owned()));
    let built = build::build_image(&src, &PackChoice::default(), &image_dir(), false, ui)?;
    built.manifest.ok_or_else(|| {
        Error::Usage(format!(
            "{} has no manifest; rebuild it with this attache",
            built.path.display()
        ))
    })
}

/// What should run on one host: each service's image manifest.
#[derive(Debug, Clone)]
pub struct HostWant {
    pub name: String,
    pub destination: Destination,
    pub elevation: Elevation,
    pub services: Vec<(String, Option<Manifest>)>,
}

/// One service of one host: the diff from what it runs to what a deploy
/// would put there, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceDiff {
    pub service: String,
    /// The image the host has attached.
    pub attached: Option<String>,
    pub diff: Option<ClosureDiff>,
    /// Why `diff` is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostDiff {
    pub host: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceDiff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn service_diff(
    service: &str,
    wanted: Option<&Manifest>,
    on_host: deploy::AttachedManifest,
) -> ServiceDiff {
    let mut sd = ServiceDiff {
        service: service.to_owned(),
        attached: on_host.image.clone(),
        diff: None,
        note: None,
    };
    let Some(wanted) = wanted else {
        sd.note = Some("the image to deploy has no manifest; rebuild it with this attache".into());
        return sd;
    };
    let old = match (&on_host.image, &on_host.manifest) {
        (None, _) => None,
        (Some(_), Some(text)) => match Manifest::from_bytes(text.as_bytes()) {
            Ok(m) => Some(m),
            Err(e) => {
                sd.note = Some(format!("the host's manifest cannot be read: {e}"));
                return sd;
            }
        },
        (Some(image), None) => {
            sd.note = Some(format!(
                "the host keeps no manifest of {}: it was placed by an attache from before manifests. The next `attache deploy` records it; until then compare images with `attache diff OLD.raw NEW.raw`",
                crate::names::basename(image)
            ));
            return sd;
        }
    };
    sd.diff = Some(closure::diff(old.as_ref(), Some(wanted)));
    sd
}

/// Reads every host's attached manifests, `jobs` hosts at a time, and
/// compares them with what each should run.
pub async fn fleet_diff(wants: Vec<HostWant>, ssh: SshOptions, jobs: usize) -> Vec<HostDiff> {
    let names: Vec<String> = wants.iter().map(|w| w.name.clone()).collect();
    let ran = hosts::on_hosts(
        wants,
        Policy::all_at_once(jobs),
        |_| true,
        |w: HostWant| {
            let ssh = ssh.clone();
            async move {
                let services: Vec<String> = w.services.iter().map(|(s, _)| s.clone()).collect();
                let read = async {
                    let s =
                        HostSession::connect(&w.name, &w.destination, &ssh, w.elevation).await?;
                    let r = deploy::attached_manifests(&s, &services).await;
                    s.close().await;
                    r
                };
                match read.await {
                    Ok(found) => HostDiff {
                        host: w.name.clone(),
                        services: w
                            .services
                            .iter()
                            .zip(found)
                            .map(|((name, m), f)| service_diff(name, m.as_ref(), f))
                            .collect(),
                        error: None,
                    },
                    Err(e) => HostDiff {
                        host: w.name.clone(),
                        services: Vec::new(),
                        error: Some(e.to_string()),
                    },
                }
            }
        },
    )
    .await;
    ran.into_iter()
        .zip(names)
        .map(|(r, host)| match r {
            Ran::Done(d) => d,
            Ran::Skipped(why) => HostDiff {
                host,
                services: Vec::new(),
                error: Some(why.to_owned()),
            },
        })
        .collect()
}

/// One host's block, without its name: hosts whose blocks are equal are
/// shown once, under all their names.
fn host_block(d: &HostDiff) -> String {
    if let Some(e) = &d.error {
        return format!("  error: {e}\n");
    }
    let mut h = String::new();
    for s in &d.services {
        match (&s.diff, &s.note) {
            (Some(diff), _) => {
                h += &format!("  {}: {}\n", s.service, ui::diff_heading(diff));
                for line in ui::closure_diff(diff).lines() {
                    h += &format!("  {line}\n");
                }
            }
            (None, Some(note)) => h += &format!("  {}: {note}\n", s.service),
            (None, None) => {}
        }
    }
    h
}

/// The human form of a fleet diff, hosts that agree grouped.
pub fn render(diffs: &[HostDiff]) -> String {
    let mut groups: Vec<(Vec<&str>, String)> = Vec::new();
    for d in diffs {
        let block = host_block(d);
        match groups.iter_mut().find(|(_, b)| *b == block) {
            Some((hosts, _)) => hosts.push(&d.host),
            None => groups.push((vec![&d.host], block)),
        }
    }
    groups
        .into_iter()
        .map(|(hosts, block)| format!("{}\n{block}", hosts.join(", ")))
        .collect()
}

fn on_hosts(args: &DiffArgs, target: &str, service: Option<&str>, ui: &Ui) -> Result<(), Error> {
    let flake = &args.fleet.flake;
    let nix = args.nix.nix();
    nix.version()?;
    ui.status("Reading", format!("{flake}#attache.hosts"));
    let hosts = inventory::load(&nix, flake).map_err(|e| inventory_error(e, flake))?;
    let mut hosts = inventory::select(hosts, &[target.to_owned()], None)
        .map_err(|e| Error::Usage(e.to_string()))?;
    inventory::share_builds(&nix, flake, &mut hosts);
    for h in &mut hosts {
        h.services.retain(|s| service.is_none_or(|n| s.name == n));
    }
    if let Some(n) = service {
        if hosts.iter().all(|h| h.services.is_empty()) {
            return Err(Error::Usage(format!(
                "no host in {target} runs a service named {n}: name one of the inventory's services"
            )));
        }
    }
    let wanted: Vec<Source> = hosts
        .iter()
        .flat_map(|h| h.services.iter())
        .map(|s| args.nix.source(s.installable.clone()))
        .collect();
    let rt = hosts::runtime()?;
    let stop = {
        let _in_runtime = rt.enter();
        deploy::Interrupt::listen().map_err(|e| Error::io("listening for Ctrl-C", e))?
    };
    let built = build_all(&wanted, &PackChoice::default(), ui, &stop)?;
    let wants: Vec<HostWant> = hosts
        .into_iter()
        .map(|h| HostWant {
            elevation: elevation(h.sudo || args.fleet.ssh.sudo),
            services: h
                .services
                .iter()
                .map(|s| {
                    let b = &built[&s.installable.to_string()];
                    (b.name.clone(), b.manifest.clone())
                })
                .collect(),
            name: h.name,
            destination: h.destination,
        })
        .collect();
    let diffs = rt.block_on(fleet_diff(wants, ssh_options(&args.fleet.ssh), 8));
    ui.result(&json!({ "hosts": diffs }), &render(&diffs));
    match diffs.iter().find_map(|d| d.error.clone()) {
        Some(e) => Err(Error::Remote(e)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(host: &str, note: Option<&str>) -> HostDiff {
        HostDiff {
            host: host.into(),
            services: vec![ServiceDiff {
                service: "shop".into(),
                attached: None,
                diff: None,
                note: note.map(str::to_owned),
            }],
            error: None,
        }
    }

    #[test]
    fn hosts_that_agree_are_grouped() {
        let text = render(&[
            diff("h1", Some("x")),
            diff("h2", Some("y")),
            diff("h3", Some("x")),
        ]);
        assert_eq!(text, "h1, h3\n  shop: x\nh2\n  shop: y\n");
    }

    #[test]
    fn a_host_without_a_manifest_is_told_what_to_do() {
        let sd = service_diff(
            "shop",
            Some(&Manifest {
                attache_manifest: 1,
                name: "shop".into(),
                version: "2.0".into(),
                os_release: Default::default(),
                units: Vec::new(),
                symlinks: Vec::new(),
                store_paths: Vec::new(),
            }),
            deploy::AttachedManifest {
                service: "shop".into(),
                image: Some("/var/lib/portables/shop_1.0.raw".into()),
                manifest: None,
            },
        );
        assert_eq!(sd.diff, None);
        let note = sd.note.unwrap();
        assert!(note.contains("no manifest of shop_1.0.raw"), "{note}");
        assert!(note.contains("attache deploy"), "{note}");
    }
}
