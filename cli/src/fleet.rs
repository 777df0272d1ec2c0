//! The commands that act on hosts (`deploy`, `status`, `rollback`,
//! `detach`): turn arguments into plans, run them on many hosts with
//! bounded concurrency, and report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::build::{self, Built};
use crate::cli::{DeployArgs, HostServiceArgs, PackArgs, SourceArgs, SshArgs, StatusArgs};
use crate::deploy::{self, HostPlan, HostReport, HostSession, Outcome, ServicePlan, Settings};
use crate::error::Error;
use crate::inventory::{self, Host};
use crate::nix::{Installable, Nix, NixError};
use crate::remote::{Destination, Elevation, SshOptions};
use crate::ui::{DeployView, Ui};

fn ssh_options(a: &SshArgs) -> SshOptions {
    SshOptions {
        config_file: a.ssh_config.clone(),
        accept_new_host_keys: a.accept_new_host_keys,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))
}

/// Where deploy keeps the images it builds.
fn image_dir() -> PathBuf {
    build::cache_dir()
        .unwrap_or_else(|| std::env::temp_dir().join("attache"))
        .join("images")
}

fn source(inst: &Installable, nix: &Path, nix_args: &[String]) -> SourceArgs {
    let (installable, file, expr) = match inst {
        Installable::Flake(r) => (Some(r.clone()), None, None),
        Installable::File { file, attr } => (Some(attr.clone()), Some(file.clone()), None),
        Installable::Expr(e) => (None, None, Some(e.clone())),
    };
    SourceArgs {
        installable,
        file,
        expr,
        impure: false,
        name: None,
        image_version: None,
        nix: nix.to_owned(),
        nix_args: nix_args.to_vec(),
    }
}

fn elevation(sudo: bool) -> Elevation {
    if sudo {
        Elevation::Sudo
    } else {
        Elevation::None
    }
}

/// Builds each distinct installable once, even when many hosts run it.
fn build_all(
    wanted: &[Installable],
    pack: &PackArgs,
    nix: &Path,
    nix_args: &[String],
    ui: &Ui,
) -> Result<BTreeMap<String, Built>, Error> {
    let dir = image_dir();
    let mut built = BTreeMap::new();
    for inst in wanted {
        let key = inst.to_string();
        if built.contains_key(&key) {
            continue;
        }
        let b = build::build_image(&source(inst, nix, nix_args), pack, &dir, false, ui)?;
        built.insert(key, b);
    }
    Ok(built)
}

fn plan_service(b: &Built, checks: Vec<inventory::Check>) -> ServicePlan {
    ServicePlan {
        name: b.name.clone(),
        version: b.version.clone(),
        local: b.path.clone(),
        sha256: b.sha256.clone(),
        size: b.size,
        units: b.units.clone(),
        prefixes: b.prefixes.clone(),
        checks,
    }
}

pub fn deploy(args: &DeployArgs, ui: &Ui) -> Result<(), Error> {
    let nix_path = args.nix.clone();
    let plans: Vec<HostPlan> = if let Some(to) = &args.to {
        let dest = Destination::parse(to).map_err(|e| Error::Usage(e.to_string()))?;
        let wanted: Vec<Installable> = if args.targets.is_empty() {
            vec![Installable::Flake(".".into())]
        } else {
            args.targets
                .iter()
                .map(|t| Installable::Flake(t.clone()))
                .collect()
        };
        let built = build_all(&wanted, &args.pack, &nix_path, &args.nix_args, ui)?;
        vec![HostPlan {
            name: to.clone(),
            destination: dest,
            elevation: elevation(args.ssh.sudo),
            profile: args.profile.clone().unwrap_or_else(|| "default".into()),
            services: wanted
                .iter()
                .map(|w| plan_service(&built[&w.to_string()], Vec::new()))
                .collect(),
        }]
    } else {
        let nix = Nix::new(nix_path.clone(), args.nix_args.clone());
        nix.version()?;
        ui.status("Reading", format!("{}#attache.hosts", args.flake));
        let hosts =
            inventory::load(&nix, &args.flake).map_err(|e| inventory_error(e, &args.flake))?;
        let mut hosts = inventory::select(hosts, &args.targets, args.on.as_deref())
            .map_err(|e| Error::Usage(e.to_string()))?;
        inventory::share_builds(&nix, &args.flake, &mut hosts);
        let wanted: Vec<Installable> = hosts
            .iter()
            .flat_map(|h| h.services.iter().map(|s| s.installable.clone()))
            .collect();
        let built = build_all(&wanted, &args.pack, &nix_path, &args.nix_args, ui)?;
        hosts
            .into_iter()
            .map(|h| host_plan(h, &built, args))
            .collect()
    };
    if plans.is_empty() {
        return Err(Error::Usage("no hosts selected".into()));
    }
    let settings = Arc::new(Settings {
        ssh: ssh_options(&args.ssh),
        rollback: !args.no_rollback,
        dry_run: args.dry_run,
        keep: args.keep.max(1),
        settle: Duration::from_secs(args.settle),
        rollback_after: Duration::from_secs(args.rollback_after),
    });
    let names: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
    let view = DeployView::new(ui, &names);
    let rt = runtime()?;
    let reports = rt.block_on(run_fleet(
        plans,
        settings,
        view.clone(),
        args.jobs.max(1),
        args.canary,
        args.keep_going,
    ));
    view.clear();
    report(ui, &reports, args.dry_run)
}

fn inventory_error(e: inventory::InventoryError, flake: &str) -> Error {
    match e {
        inventory::InventoryError::Nix(NixError::MissingAttribute { nix_says, .. })
            if nix_says.contains("does not provide attribute") =>
        {
            Error::Usage(format!(
                "{flake} has no attache.hosts inventory: add one with attache.lib.hosts, or deploy ad hoc with --to USER@HOST INSTALLABLE"
            ))
        }
        inventory::InventoryError::Nix(n) => Error::Nix(n),
        other => Error::Usage(other.to_string()),
    }
}

fn host_plan(h: Host, built: &BTreeMap<String, Built>, args: &DeployArgs) -> HostPlan {
    let services = h
        .services
        .iter()
        .map(|s| {
            let b = &built[&s.installable.to_string()];
            plan_service(b, h.checks.get(&s.name).cloned().unwrap_or_default())
        })
        .collect();
    HostPlan {
        name: h.name,
        destination: h.destination,
        elevation: elevation(h.sudo || args.ssh.sudo),
        profile: args.profile.clone().unwrap_or(h.profile),
        services,
    }
}

/// Canary hosts first; then the rest, `jobs` at a time. Without
/// `keep_going`, a failure stops hosts that have not started yet.
async fn run_fleet(
    plans: Vec<HostPlan>,
    settings: Arc<Settings>,
    view: DeployView,
    jobs: usize,
    canary: Option<usize>,
    keep_going: bool,
) -> Vec<HostReport> {
    let split = canary.unwrap_or(0).min(plans.len());
    let mut rest = plans;
    let first: Vec<HostPlan> = rest.drain(..split).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut reports = run_batch(first, &settings, &view, jobs, keep_going, &stop).await;
    let canary_failed = reports.iter().any(|r| !good(r.outcome));
    if canary_failed {
        reports.extend(
            rest.into_iter()
                .map(|p| skipped(&p.name, "a canary host failed")),
        );
    } else {
        reports.extend(run_batch(rest, &settings, &view, jobs, keep_going, &stop).await);
    }
    reports
}

fn good(o: Outcome) -> bool {
    matches!(o, Outcome::Healthy | Outcome::Planned)
}

fn skipped(host: &str, why: &str) -> HostReport {
    HostReport::skipped(host, why)
}

async fn run_batch(
    plans: Vec<HostPlan>,
    settings: &Arc<Settings>,
    view: &DeployView,
    jobs: usize,
    keep_going: bool,
    stop: &Arc<AtomicBool>,
) -> Vec<HostReport> {
    let sem = Arc::new(tokio::sync::Semaphore::new(jobs));
    let mut set = tokio::task::JoinSet::new();
    let order: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
    for plan in plans {
        let sem = sem.clone();
        let settings = settings.clone();
        let view = view.clone();
        let stop = stop.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            if stop.load(Ordering::SeqCst) {
                return skipped(
                    &plan.name,
                    "stopped after another host failed (use --keep-going)",
                );
            }
            let r = deploy::deploy_host(plan, settings, view).await;
            if !good(r.outcome) && !keep_going {
                stop.store(true, Ordering::SeqCst);
            }
            r
        });
    }
    let mut by_host = BTreeMap::new();
    while let Some(res) = set.join_next().await {
        if let Ok(r) = res {
            by_host.insert(r.host.clone(), r);
        }
    }
    order
        .into_iter()
        .map(|h| {
            by_host
                .remove(&h)
                .unwrap_or_else(|| skipped(&h, "the host's task died"))
        })
        .collect()
}

fn report(ui: &Ui, reports: &[HostReport], dry_run: bool) -> Result<(), Error> {
    let ok = reports.iter().all(|r| good(r.outcome));
    let mut human = String::new();
    let width = reports
        .iter()
        .map(|r| r.host.len())
        .max()
        .unwrap_or(4)
        .max(4);
    human += &format!(
        "{:width$}  {:<11}  {:>10}  services\n",
        "host", "result", "sent"
    );
    for r in reports {
        let services = r
            .services
            .iter()
            .map(|s| {
                let file = s.image.rsplit('/').next().unwrap_or_default();
                let action = format!("{:?}", s.action).to_lowercase();
                let upload = if s.upload { "upload" } else { "no upload" };
                if dry_run {
                    format!("{file} ({upload}, {action})")
                } else {
                    format!("{file} ({action})")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        human += &format!(
            "{:width$}  {:<11}  {:>10}  {}\n",
            r.host,
            r.outcome.to_string(),
            r.bytes_sent,
            services
        );
    }
    for r in reports {
        if let Some(e) = &r.error {
            if r.outcome != Outcome::Skipped {
                // Errors from the host pipeline already name the host.
                if e.starts_with(&format!("{}:", r.host)) {
                    human += &format!("\n{e}\n");
                } else {
                    human += &format!("\n{}: {e}\n", r.host);
                }
            }
        }
        if let Some(e) = &r.rollback_error {
            human += &format!("{}: rollback failed too: {e}\n", r.host);
        }
    }
    let json = json!({ "ok": ok, "dry_run": dry_run, "hosts": reports });
    ui.result(&json, &human);
    if ok {
        return Ok(());
    }
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !good(r.outcome))
        .map(|r| format!("{} ({})", r.host, r.outcome))
        .collect();
    Err(Error::Deploy {
        summary: format!(
            "{} of {} hosts did not end healthy on the new version: {} (details above)",
            failed.len(),
            reports.len(),
            failed.join(", "),
        ),
    })
}

/// Hosts named on the command line: inventory names and @tags when the
/// flake has an inventory, else SSH destinations.
fn resolve_hosts(
    names: &[String],
    flake: &str,
    nix: &Path,
    ssh: &SshArgs,
) -> Result<Vec<(String, Destination, Elevation)>, Error> {
    // `user@host` is never an inventory name: no need to evaluate the flake.
    let all_ssh = !names.is_empty() && names.iter().all(|n| n.contains('@') && !n.starts_with('@'));
    let nix = Nix::new(nix.to_owned(), Vec::new());
    let inv = if all_ssh {
        None
    } else {
        inventory::load(&nix, flake).ok()
    };
    match inv {
        Some(hosts) if !hosts.is_empty() => {
            let known: Vec<&String> = hosts.iter().map(|h| &h.name).collect();
            let all_known = names
                .iter()
                .all(|n| n.starts_with('@') || known.contains(&n));
            if all_known {
                let sel = inventory::select(hosts, names, None)
                    .map_err(|e| Error::Usage(e.to_string()))?;
                return Ok(sel
                    .into_iter()
                    .map(|h| (h.name, h.destination, elevation(h.sudo || ssh.sudo)))
                    .collect());
            }
        }
        _ => {}
    }
    if names.is_empty() {
        return Err(Error::Usage(format!(
            "name a host: {flake} has no attache.hosts inventory to take them from"
        )));
    }
    names
        .iter()
        .map(|n| {
            let d = Destination::parse(n).map_err(|e| Error::Usage(e.to_string()))?;
            Ok((n.clone(), d, elevation(ssh.sudo)))
        })
        .collect()
}

pub fn status(args: &StatusArgs, ui: &Ui) -> Result<(), Error> {
    let hosts = resolve_hosts(&args.hosts, &args.flake, &args.nix, &args.ssh)?;
    let opts = ssh_options(&args.ssh);
    let rt = runtime()?;
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (name, dest, elev) in hosts.clone() {
            let opts = opts.clone();
            set.spawn(async move {
                let r = host_status(&name, &dest, &opts, elev).await;
                (name, r)
            });
        }
        let mut out = BTreeMap::new();
        while let Some(joined) = set.join_next().await {
            if let Ok((n, r)) = joined {
                out.insert(n, r);
            }
        }
        out
    });
    let mut human = String::new();
    let mut json_hosts = Vec::new();
    let mut failed = Vec::new();
    for (name, _, _) in &hosts {
        match results.get(name) {
            Some(Ok(services)) => {
                human += &format!("{name}\n");
                if services.is_empty() {
                    human += "  (no portable services attached)\n";
                }
                for s in services {
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
            Some(Err(e)) => {
                human += &format!("{name}\n  error: {e}\n");
                json_hosts.push(json!({"host": name, "error": e.to_string()}));
                failed.push(e.to_string());
            }
            None => {}
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

fn one_host(args: &HostServiceArgs) -> Result<(String, Destination, Elevation), Error> {
    resolve_hosts(
        std::slice::from_ref(&args.host),
        &args.flake,
        &args.nix,
        &args.ssh,
    )?
    .into_iter()
    .next()
    .ok_or_else(|| Error::Usage(format!("unknown host {}", args.host)))
}

pub fn rollback(args: &HostServiceArgs, ui: &Ui) -> Result<(), Error> {
    let (name, dest, elev) = one_host(args)?;
    let opts = ssh_options(&args.ssh);
    let rt = runtime()?;
    let r = rt.block_on(async {
        let mut s = HostSession::connect(&name, &dest, &opts, elev).await?;
        let r = deploy::rollback_service(&mut s, &args.service, &args.profile).await;
        s.close().await;
        r
    });
    let (left, prev) = r.map_err(host_error)?;
    ui.status(
        "Rolled back",
        format!("{name}: {} -> {prev}", left.unwrap_or_default()),
    );
    ui.result(
        &json!({"host": name, "service": args.service, "image": prev}),
        &format!("{name}: {} now runs {prev}", args.service),
    );
    Ok(())
}

pub fn detach(args: &HostServiceArgs, ui: &Ui) -> Result<(), Error> {
    let (name, dest, elev) = one_host(args)?;
    let opts = ssh_options(&args.ssh);
    let rt = runtime()?;
    let r = rt.block_on(async {
        let mut s = HostSession::connect(&name, &dest, &opts, elev).await?;
        let r = deploy::detach_service(&mut s, &args.service).await;
        s.close().await;
        r
    });
    let image = r.map_err(host_error)?;
    ui.result(
        &json!({"host": name, "service": args.service, "detached": image}),
        &format!("{name}: detached {image}"),
    );
    Ok(())
}

fn host_error(e: deploy::HostError) -> Error {
    if e.is_user_error() {
        Error::Usage(e.to_string())
    } else {
        Error::Remote(e.to_string())
    }
}
