//! `attache deploy`: build what the hosts run (each installable once), plan
//! each host, run the plans on many hosts at once, and report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::diff;
use super::hosts::{self, elevation, ssh_options, Policy, Ran};
use crate::build::{self, Built, PackChoice, Source};
use crate::cache;
use crate::cli::DeployArgs;
use crate::deploy::{
    self, HostPlan, HostReport, Interrupt, Outcome, ServicePlan, ServiceSettings, Settings,
};
use crate::error::Error;
use crate::image::Manifest;
use crate::inventory::{self, Host};
use crate::nix::NixError;
use crate::remote::Destination;
use crate::ui::{self, DeployView, Ui};

/// Where deploy keeps the images it builds.
pub(super) fn image_dir() -> PathBuf {
    cache::dir()
        .unwrap_or_else(|| std::env::temp_dir().join("attache"))
        .join("images")
}

/// Builds each distinct installable once, even when many hosts run it.
/// A Ctrl-C during the build lets the step at hand end (nix, which the
/// terminal interrupts too, at once; packing cleans up its temporary file
/// when it fails and renames it into place when it is done) and stops there.
pub(super) fn build_all(
    wanted: &[Source],
    pack: &PackChoice,
    ui: &Ui,
    stop: &Interrupt,
) -> Result<BTreeMap<String, Built>, Error> {
    let dir = image_dir();
    let mut built = BTreeMap::new();
    for src in wanted {
        let key = src.installable.to_string();
        if built.contains_key(&key) {
            continue;
        }
        let b = build::build_image(src, pack, &dir, false, ui);
        if stop.asked() {
            return Err(Error::Interrupted(format!(
                "interrupted during the build of {key}; no host was changed"
            )));
        }
        built.insert(key, b?);
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
        manifest: b.manifest.as_ref().map(|m| m.to_bytes()),
        settings: Default::default(),
    }
}

pub fn run(args: &DeployArgs, ui: &Ui) -> Result<(), Error> {
    let pack = args.pack.choice();
    // Before the inventory is evaluated, not only before each build.
    pack.check()?;
    let rt = hosts::runtime()?;
    let stop = {
        let _in_runtime = rt.enter();
        Interrupt::listen().map_err(|e| Error::io("listening for Ctrl-C", e))?
    };
    let settings = Arc::new(transaction_settings(args));
    let early = Early::new(&rt, &settings, args);
    let mut pulled = None;
    let plans = plan_hosts(args, &pack, ui, &stop, &early, &mut pulled).and_then(|plans| {
        for p in &plans {
            deploy::check_timer(p, &settings)
                .map_err(|e| Error::Usage(format!("{}: {e}", p.name)))?;
        }
        Ok(plans)
    });
    let plans = match plans {
        Ok(plans) => plans,
        Err(e) => {
            // The hosts opened while building: no lock nor connection stays.
            rt.block_on(early.close());
            return Err(e);
        }
    };
    if plans.is_empty() {
        // Only pull hosts (set up above), or their setup failed.
        return match pulled {
            Some((p, true)) => p.result,
            // The push hosts were not deployed: a pull host's setup failed.
            Some((p, false)) => {
                let json = json!({ "ok": false, "dry_run": args.dry_run, "hosts": p.hosts });
                ui.result(&json, "");
                p.result
            }
            None => Err(Error::Usage("no hosts selected".into())),
        };
    }
    let (pulled_error, pulled_hosts) = match pulled {
        Some((p, _)) => (p.result.err(), p.hosts),
        None => (None, Vec::new()),
    };
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let names: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
    let wants: Vec<diff::HostWant> = plans.iter().map(host_want).collect();
    let view = DeployView::new(ui, &names);
    let policy = Policy {
        jobs: args.jobs.max(1),
        canary: args.canary.unwrap_or(0),
        keep_going: args.keep_going,
    };
    let ran = rt.block_on(async {
        let warn = {
            let (ui, stop) = (ui.clone(), stop.clone());
            tokio::spawn(async move {
                stop.after(1).await;
                ui.warn("stopping: no host starts a new step, uploads stop, and hosts being activated finish their checks and confirm or roll back; press Ctrl-C again to leave at once");
            })
        };
        let ran = tokio::select! {
            ran = hosts::on_hosts(
                plans,
                policy,
                |r: &HostReport| good(r.outcome),
                |plan| {
                    let opened = early.take(&plan.name);
                    deploy::deploy_host(plan, settings.clone(), view.clone(), stop.clone(), opened)
                },
            ) => Some(ran),
            () = stop.after(2) => None,
        };
        warn.abort();
        if ran.is_some() {
            // Hosts skipped after a failure.
            early.close().await;
        }
        ran
    });

    let Some(ran) = ran else {
        view.clear();
        // Dropping the runtime drops every host's session: its lock ends,
        // then its connection and control socket.
        drop(rt);
        let reverts: Vec<serde_json::Value> = stop
            .pending_reverts()
            .into_iter()
            .map(|(host, at)| {
                let at = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                json!({ "host": host, "reverts_at": at })
            })
            .collect();
        ui.result(
            &json!({ "ok": false, "interrupted": true, "pending_reverts": reverts }),
            "",
        );
        return Err(left_at_once(&stop));
    };
    let reports: Vec<HostReport> = ran
        .into_iter()
        .zip(&names)
        .map(|(r, host)| match r {
            Ran::Done(report) => report,
            Ran::Skipped(why) => HostReport::skipped(host, why),
        })
        .collect();
    view.clear();
    let diffs = if args.dry_run {
        let reached: Vec<diff::HostWant> = wants
            .into_iter()
            .zip(&reports)
            .filter(|(_, r)| r.outcome == Outcome::Planned)
            .map(|(w, _)| w)
            .collect();
        let jobs = args.jobs.max(1);
        Some(rt.block_on(diff::fleet_diff(reached, settings.ssh.clone(), jobs)))
    } else {
        None
    };
    let result = report(
        ui,
        &reports,
        &pulled_hosts,
        pulled_error.is_none(),
        args.dry_run,
        diffs.as_deref(),
    );
    let result = result.and(pulled_error.map_or(Ok(()), Err));
    if result.is_err() {
        for hint in logs_hints(&reports, started, args) {
            ui.status("Logs", hint);
        }
    }
    result
}

/// What every host's transaction is told by the deploy's flags: push hosts
/// here, pull hosts' settings stage in `deploy_pull`.
pub(super) fn transaction_settings(args: &DeployArgs) -> Settings {
    Settings {
        ssh: ssh_options(&args.fleet.ssh),
        rollback: !args.no_rollback,
        dry_run: args.dry_run,
        keep: args.keep.max(1),
        settle: Duration::from_secs(args.settle),
        rollback_after: Duration::from_secs(args.rollback_after),
    }
}

/// Builds what the hosts run and plans each host; the hosts that start
/// first are opened (`early`) while the images build. Pull hosts are set
/// up, not planned: their outcome goes to `pulled`.
fn plan_hosts(
    args: &DeployArgs,
    pack: &PackChoice,
    ui: &Ui,
    stop: &Interrupt,
    early: &Early,
    pulled: &mut Option<(super::deploy_pull::Pulled, bool)>,
) -> Result<Vec<HostPlan>, Error> {
    if let Some(to) = &args.to {
        let dest = Destination::parse(to).map_err(|e| Error::Usage(e.to_string()))?;
        let elevation = elevation(args.fleet.ssh.sudo);
        let wanted = args.form.sources(&args.targets, &args.nix)?;
        early.open([(to.as_str(), &dest, elevation)]);
        let built = build_all(&wanted, pack, ui, stop)?;
        return Ok(vec![HostPlan {
            name: to.clone(),
            destination: dest,
            elevation,
            profile: args.profile.clone().unwrap_or_else(|| "default".into()),
            services: wanted
                .iter()
                .map(|w| plan_service(&built[&w.installable.to_string()], Vec::new()))
                .collect(),
            local: false,
        }]);
    }
    let flags = args.form.installable_flags();
    if !flags.is_empty() {
        return Err(Error::Usage(format!(
            "{} only with --to USER@HOST (deploying ad hoc): the inventory says what each of its hosts runs",
            flags.join(", ")
        )));
    }
    let nix = args.nix.nix();
    nix.version()?;
    ui.status("Reading", format!("{}#attache.hosts", args.fleet.flake));
    let hosts = inventory::load(&nix, &args.fleet.flake)
        .map_err(|e| inventory_error(e, &args.fleet.flake))?;
    let hosts = inventory::select(hosts, &args.targets, args.on.as_deref())
        .map_err(|e| Error::Usage(e.to_string()))?;
    // Pull hosts are set up, not pushed to: nothing is built for them.
    let (pull, mut hosts): (Vec<Host>, Vec<Host>) =
        hosts.into_iter().partition(|h| h.pull.is_some());
    if !pull.is_empty() {
        let alone = hosts.is_empty();
        let result = super::deploy_pull::run(pull, args, ui, early.rt, stop, alone);
        let failed = result.result.is_err() && !args.keep_going;
        *pulled = Some((result, alone));
        if hosts.is_empty() || failed {
            return Ok(Vec::new());
        }
    }
    early.open(hosts.iter().map(|h| {
        let elevation = elevation(h.sudo || args.fleet.ssh.sudo);
        (h.name.as_str(), &h.destination, elevation)
    }));
    inventory::share_builds(&nix, &args.fleet.flake, &mut hosts);
    let wanted: Vec<Source> = hosts
        .iter()
        .flat_map(|h| h.services.iter())
        .map(|s| args.nix.source(s.installable.clone()))
        .collect();
    let built = build_all(&wanted, pack, ui, stop)?;
    hosts
        .into_iter()
        .map(|h| host_plan(h, &built, args))
        .collect()
}

/// The hosts opened (connected, locked, read) while the images build: the
/// first ones to deploy, as many as start at once.
struct Early<'r> {
    rt: &'r tokio::runtime::Runtime,
    settings: Arc<Settings>,
    first: usize,
    opened: std::sync::Mutex<BTreeMap<String, deploy::Opening>>,
}

impl<'r> Early<'r> {
    fn new(rt: &'r tokio::runtime::Runtime, settings: &Arc<Settings>, args: &DeployArgs) -> Self {
        Early {
            rt,
            settings: settings.clone(),
            first: args.canary.filter(|&c| c > 0).unwrap_or(args.jobs).max(1),
            opened: Default::default(),
        }
    }

    fn open<'h>(
        &self,
        hosts: impl IntoIterator<Item = (&'h str, &'h Destination, crate::remote::Elevation)>,
    ) {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        for (name, dest, elevation) in hosts.into_iter().take(self.first) {
            let o = deploy::Opening::start(
                self.rt.handle(),
                name,
                dest,
                elevation,
                self.settings.clone(),
            );
            opened.insert(name.to_owned(), o);
        }
    }

    fn take(&self, host: &str) -> Option<deploy::Opening> {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        opened.remove(host)
    }

    /// Releases the locks and closes the connections of hosts that will
    /// not be deployed.
    async fn close(&self) {
        let all = std::mem::take(&mut *self.opened.lock().unwrap_or_else(|e| e.into_inner()));
        let mut closing = tokio::task::JoinSet::new();
        for o in all.into_values() {
            closing.spawn(o.close());
        }
        while closing.join_next().await.is_some() {}
    }
}

/// For each host where a changed service failed, the `attache logs`
/// command that shows what its units said since the deploy began.
fn logs_hints(reports: &[HostReport], started: u64, args: &DeployArgs) -> Vec<String> {
    let since = super::logs::utc(started);
    let mut extra = String::new();
    if args.to.is_none() && args.fleet.flake != "." {
        extra += &format!(" --flake {}", deploy::quote(&args.fleet.flake));
    }
    if let Some(c) = &args.fleet.ssh.ssh_config {
        extra += &format!(" --ssh-config {}", deploy::quote(&c.display().to_string()));
    }
    reports
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::RolledBack | Outcome::Failed))
        .flat_map(|r| {
            r.services
                .iter()
                .filter(|s| s.action != deploy::Action::Unchanged)
                .map(|s| {
                    format!(
                        "attache logs {} {} --since {}{extra}",
                        deploy::quote(&r.host),
                        s.name,
                        deploy::quote(&since)
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What `--dry-run`'s diff compares each host's services with.
fn host_want(p: &HostPlan) -> diff::HostWant {
    diff::HostWant {
        name: p.name.clone(),
        destination: p.destination.clone(),
        elevation: p.elevation,
        services: p
            .services
            .iter()
            .map(|s| {
                let m = s
                    .manifest
                    .as_deref()
                    .and_then(|b| Manifest::from_bytes(b).ok());
                (s.name.clone(), m)
            })
            .collect(),
    }
}

/// What a second Ctrl-C leaves: hosts whose automatic rollback is armed
/// revert by themselves, and when.
fn left_at_once(stop: &Interrupt) -> Error {
    let pending = stop.pending_reverts();
    let mut msg = "interrupted twice: attache left at once".to_owned();
    if pending.is_empty() {
        msg += "; no host was mid-activation, so each runs what it ran before (a partial upload is removed by the next deploy)";
    }
    for (host, at) in pending {
        msg += &format!(
            "; {host} was left mid-activation: its automatic rollback puts back its previous services at {}, unless you deploy it again before",
            deploy::clock(at)
        );
    }
    Error::Interrupted(msg)
}

pub(super) fn inventory_error(e: inventory::InventoryError, flake: &str) -> Error {
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

/// A host's plan: its services' images, checks, settings and secrets (read
/// here, before any host is contacted).
fn host_plan(
    h: Host,
    built: &BTreeMap<String, Built>,
    args: &DeployArgs,
) -> Result<HostPlan, Error> {
    for (what, svc) in h
        .settings
        .keys()
        .map(|k| ("settings", k))
        .chain(h.secrets.keys().map(|k| ("secrets", k)))
    {
        if !h.services.iter().any(|s| &s.name == svc) {
            return Err(Error::Usage(format!(
                "{}: {what}.{svc} names no service of this host (its services: {}); fix the name in the inventory",
                h.name,
                h.services
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let services = h
        .services
        .iter()
        .map(|s| {
            let b = &built[&s.installable.to_string()];
            let mut p = plan_service(b, h.checks.get(&s.name).cloned().unwrap_or_default());
            let units: Vec<String> = b.units.iter().map(|u| u.name.clone()).collect();
            p.settings = ServiceSettings::load(
                &s.name,
                &units,
                h.settings.get(&s.name),
                h.secrets.get(&s.name),
                h.unencrypted_secrets,
            )
            .map_err(|e| Error::Usage(format!("{}: {e}", h.name)))?;
            Ok(p)
        })
        .collect::<Result<_, Error>>()?;
    Ok(HostPlan {
        name: h.name,
        destination: h.destination,
        elevation: elevation(h.sudo || args.fleet.ssh.sudo),
        profile: args.profile.clone().unwrap_or(h.profile),
        services,
        local: false,
    })
}

fn good(o: Outcome) -> bool {
    matches!(o, Outcome::Healthy | Outcome::Planned)
}

/// The summary table is the result (stdout); why hosts failed goes to
/// stderr, where the closing error line can point at it, so that
/// `attache deploy > report.txt` still shows the user why.
/// `pulled`: the pull hosts' `hosts[]` entries (set up before, their
/// error returned apart), `pulled_ok` when each ended well.
fn report(
    ui: &Ui,
    reports: &[HostReport],
    pulled: &[serde_json::Value],
    pulled_ok: bool,
    dry_run: bool,
    diffs: Option<&[diff::HostDiff]>,
) -> Result<(), Error> {
    let ok = reports.iter().all(|r| good(r.outcome));
    let mut hosts: Vec<serde_json::Value> = reports.iter().map(|r| json!(r)).collect();
    hosts.extend(pulled.iter().cloned());
    let mut json = json!({ "ok": ok && pulled_ok, "dry_run": dry_run, "hosts": hosts });
    let mut human = ui::deploy_summary(reports, dry_run);
    if let Some(d) = diffs {
        json["diff"] = json!(d);
        human += "
What would change:
";
        human += &diff::render(d);
    }
    ui.result(&json, &human);
    if ok {
        return Ok(());
    }
    let errors = ui::deploy_errors(reports);
    for line in &errors {
        ui.error(line);
    }
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !good(r.outcome))
        .map(|r| match (r.outcome, &r.error) {
            (Outcome::Skipped, Some(why)) => format!("{} (skipped: {why})", r.host),
            _ => format!("{} ({})", r.host, r.outcome),
        })
        .collect();
    let details = if errors.is_empty() {
        ""
    } else {
        " (details above)"
    };
    Err(Error::Deploy {
        summary: format!(
            "{} of {} hosts did not end healthy on the new version: {}{details}",
            failed.len(),
            reports.len(),
            failed.join(", "),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ui::capture::{self, settings};
    use crate::ui::Verbosity;

    #[test]
    fn report_names_the_hosts_that_failed() {
        let (ui, out, err) = capture::ui(settings(Verbosity::Normal));
        let mut ok = HostReport::new("web1");
        ok.outcome = Outcome::Healthy;
        let mut bad = HostReport::new("db");
        bad.outcome = Outcome::RolledBack;
        bad.error = Some("demo.service did not start".into());
        let reports = [ok, bad, HostReport::skipped("late", "a canary host failed")];
        let e = report(&ui, &reports, &[], true, false, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "2 of 3 hosts did not end healthy on the new version: db (rolled-back), late (skipped: a canary host failed) (details above)"
        );
        assert_eq!(
            out.text(),
            ui::deploy_summary(&reports, false).trim_end().to_owned() + "\n"
        );
        assert!(!out.text().contains("did not start"), "{}", out.text());
        // main writes the closing sentence after these: "above" is true.
        assert_eq!(err.text(), "error: db: demo.service did not start\n");

        report(&ui, &reports[..1], &[], true, false, None).unwrap();
    }

    /// The case: an unreachable host, stdout sent to a file, and
    /// --json; the reason is on stderr either way, and the JSON unchanged.
    #[test]
    fn why_a_host_failed_is_on_stderr_even_with_json() {
        let (ui, out, err) = capture::ui(crate::ui::Settings {
            json: true,
            ..settings(Verbosity::Quiet)
        });
        let mut r = HostReport::new("nxdomain");
        r.error = Some("nxdomain: ssh: Could not resolve hostname nxdomain".into());
        let e = report(&ui, &[r], &[], true, false, None).unwrap_err();
        assert_eq!(
            err.text(),
            "error: nxdomain: ssh: Could not resolve hostname nxdomain\n"
        );
        assert!(e.to_string().ends_with("nxdomain (failed) (details above)"));
        let json: serde_json::Value = serde_json::from_str(&out.text()).unwrap();
        assert_eq!(
            json["hosts"][0]["error"],
            "nxdomain: ssh: Could not resolve hostname nxdomain"
        );
    }

    /// Push and pull hosts in one deploy: `hosts[]` lists both, and `ok`
    /// says whether all ended well.
    #[test]
    fn json_lists_the_pull_hosts_beside_the_push_hosts() {
        let (ui, out, _) = capture::ui(crate::ui::Settings {
            json: true,
            ..settings(Verbosity::Quiet)
        });
        let mut push = HostReport::new("web1");
        push.outcome = Outcome::Healthy;
        let pulled = [json!({"host": "p1", "pull": true, "ok": false, "error": "x"})];
        report(&ui, &[push], &pulled, false, false, None).unwrap();
        let json: serde_json::Value = serde_json::from_str(&out.text()).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["hosts"][0]["host"], "web1");
        assert_eq!(json["hosts"][1]["host"], "p1");
        assert_eq!(json["hosts"][1]["pull"], true);
    }

    /// A failed service's logs, from the deploy's start, on the host the
    /// report names, with the flags that reach it.
    #[test]
    fn a_failed_deploy_names_its_logs_command() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "attache",
            "deploy",
            "--flake",
            "path:/x y",
            "--ssh-config",
            "/c",
        ])
        .unwrap();
        let crate::cli::Command::Deploy(args) = cli.command else {
            panic!("not deploy")
        };
        let mut bad = HostReport::new("web1");
        bad.outcome = Outcome::RolledBack;
        bad.services.push(deploy::ServiceReport {
            name: "shop".into(),
            image: "/var/lib/portables/shop_2.0.raw".into(),
            sha256: String::new(),
            upload: true,
            action: deploy::Action::Reattach,
            previous: None,
            outcome: Outcome::RolledBack,
            settings: Vec::new(),
            transfer: Default::default(),
        });
        let mut ok = HostReport::new("web2");
        ok.outcome = Outcome::Healthy;
        assert_eq!(
            logs_hints(&[bad, ok], 1_764_608_523, &args),
            ["attache logs 'web1' shop --since '2025-12-01 17:02:03 UTC' --flake 'path:/x y' --ssh-config '/c'"]
        );
    }

    /// With nothing but skipped hosts, nothing is above to point at.
    #[test]
    fn no_details_above_when_there_are_none() {
        let (ui, _, err) = capture::ui(settings(Verbosity::Normal));
        let e = report(
            &ui,
            &[HostReport::skipped("late", "a canary host failed")],
            &[],
            true,
            false,
            None,
        )
        .unwrap_err();
        assert_eq!(err.text(), "");
        assert_eq!(
            e.to_string(),
            "1 of 1 hosts did not end healthy on the new version: late (skipped: a canary host failed)"
        );
    }

    /// A second Ctrl-C names each host left to its own timer, and when.
    #[test]
    fn leaving_at_once_says_when_hosts_revert() {
        let stop = Interrupt::never();
        let e = left_at_once(&stop).to_string();
        assert!(e.contains("no host was mid-activation"), "{e}");
        stop.armed("web1", Duration::from_secs(300));
        let e = left_at_once(&stop);
        assert_eq!(e.exit_code(), crate::error::ExitCode::DeployFailed);
        let e = e.to_string();
        assert!(
            e.starts_with("interrupted twice: attache left at once; web1 was left mid-activation: its automatic rollback puts back its previous services at "),
            "{e}"
        );
        assert!(e.contains(" UTC (in 29"), "{e}");
    }

    /// -f and friends name what to build; the inventory already does, so
    /// they are refused there before any nix runs.
    #[test]
    fn installable_flags_need_to() {
        use clap::Parser;
        let cli =
            crate::cli::Cli::try_parse_from(["attache", "deploy", "web1", "-f", "a.nix"]).unwrap();
        let crate::cli::Command::Deploy(args) = cli.command else {
            panic!("not deploy")
        };
        let (ui, _, _) = capture::ui(settings(Verbosity::Quiet));
        let e = run(&args, &ui).unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "{e:?}");
        assert!(
            e.to_string().starts_with("-f only with --to USER@HOST"),
            "{e}"
        );
    }
}
