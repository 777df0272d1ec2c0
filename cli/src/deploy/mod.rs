//! `attache deploy`: per host, preflight -> push -> activate -> health ->
//! (rollback) -> prune, for many hosts at once.
//!
//! The truth about what is attached comes from the units' drop-ins
//! (`system.attached/UNIT.d/20-portable.conf`), never from `portablectl
//! list`, which on systemd 252 reports every image of a prefix as attached.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::build::BuiltUnit;
use crate::inventory::Check;
use crate::remote::{q, Destination, Elevation, Remote, RemoteError, SshOptions};
use crate::ui::DeployView;

pub const PORTABLES: &str = "/var/lib/portables";

mod scripts;

use scripts::{
    activation_script, check_script, judge, lock_script, parse_attached, preflight_script,
    prune_candidates, units_to_check,
};
pub use scripts::{dropin_image, parse_show, show_script, LIST_ATTACHED};

/// One image to run on a host.
#[derive(Debug, Clone)]
pub struct ServicePlan {
    /// Unit prefix: the image name.
    pub name: String,
    pub version: String,
    pub local: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub units: Vec<BuiltUnit>,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone)]
pub struct HostPlan {
    pub name: String,
    pub destination: Destination,
    pub elevation: Elevation,
    pub profile: String,
    pub services: Vec<ServicePlan>,
}

/// Knobs shared by every host of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ssh: SshOptions,
    pub rollback: bool,
    pub dry_run: bool,
    pub keep: usize,
    /// How long a unit must stay up after activation to count as healthy.
    pub settle: Duration,
    /// When the host reverts by itself if attache never confirms the
    /// activation (the connection was lost).
    pub rollback_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Connect,
    Lock,
    Preflight,
    Push,
    Activate,
    Health,
    Rollback,
    Prune,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connecting",
            Stage::Lock => "locking",
            Stage::Preflight => "preflight",
            Stage::Push => "pushing",
            Stage::Activate => "activating",
            Stage::Health => "health check",
            Stage::Rollback => "rolling back",
            Stage::Prune => "pruning",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every service runs the new version and passed its checks.
    Healthy,
    /// The new version failed; the previous one is back (or none was there
    /// and the new one was detached).
    RolledBack,
    /// Failed, and the host may not be in its previous state.
    Failed,
    /// Not attempted (a canary failed, or a failure stopped the run).
    Skipped,
    /// `--dry-run`: the plan only.
    Planned,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Healthy => "healthy",
            Outcome::RolledBack => "rolled-back",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Planned => "planned",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    pub stage: Stage,
    pub ms: u128,
    pub ok: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Attach,
    Reattach,
    Unchanged,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceReport {
    pub name: String,
    pub image: String,
    pub sha256: String,
    pub upload: bool,
    pub action: Action,
    pub previous: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub host: String,
    pub outcome: Outcome,
    pub stages: Vec<StageTime>,
    pub bytes_sent: u64,
    pub services: Vec<ServiceReport>,
    pub error: Option<String>,
    pub rollback_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("{host}: another attache is deploying to this host ({holder}); wait for it to finish")]
    Locked { host: String, holder: String },
    #[error("{host}: portablectl is missing; install systemd-container on the host (apt install systemd-container)")]
    NoPortablectl { host: String },
    #[error("{host}: systemd {version} is too old; attache needs systemd 248 or newer (portablectl reattach)")]
    OldSystemd { host: String, version: u32 },
    #[error("{host}: not enough space in {PORTABLES}: {free_mb} MB free, {need_mb} MB needed; free some space (old images: attache prunes to --keep)")]
    NoSpace {
        host: String,
        free_mb: u64,
        need_mb: u64,
    },
    #[error("{host}: the uploaded {image} has sha256 {got}, expected {want}; the upload was corrupted, nothing was changed. Run the command again")]
    Corrupt {
        host: String,
        image: String,
        got: String,
        want: String,
    },
    #[error("{host}: portablectl {verb} {image} failed:\n{output}")]
    Activate {
        host: String,
        verb: &'static str,
        image: String,
        output: String,
    },
    #[error("{host}: {image} is not healthy: {reason}")]
    Unhealthy {
        host: String,
        image: String,
        reason: String,
    },
    #[error("{host}: a remote step failed ({doing}): {output}")]
    Step {
        host: String,
        doing: String,
        output: String,
    },
}

/// Runs the whole pipeline on one host. Never panics; always returns a
/// report saying where the host ended.
pub async fn deploy_host(plan: HostPlan, settings: Arc<Settings>, view: DeployView) -> HostReport {
    let mut r = HostReport {
        host: plan.name.clone(),
        outcome: Outcome::Failed,
        stages: Vec::new(),
        bytes_sent: 0,
        services: Vec::new(),
        error: None,
        rollback_error: None,
    };
    match run_host(&plan, &settings, &view, &mut r).await {
        Ok(outcome) => r.outcome = outcome,
        Err(e) => {
            r.error = Some(e.to_string());
        }
    }
    view.done(&plan.name, r.outcome, r.error.as_deref());
    r
}

struct Timer<'a> {
    stage: Stage,
    start: Instant,
    report: &'a mut HostReport,
}

impl Timer<'_> {
    fn end(self, ok: bool) {
        self.report.stages.push(StageTime {
            stage: self.stage,
            ms: self.start.elapsed().as_millis(),
            ok,
        });
    }
}

fn timer<'a>(r: &'a mut HostReport, view: &DeployView, host: &str, stage: Stage) -> Timer<'a> {
    view.stage(host, stage);
    Timer {
        stage,
        start: Instant::now(),
        report: r,
    }
}

async fn run_host(
    plan: &HostPlan,
    settings: &Settings,
    view: &DeployView,
    r: &mut HostReport,
) -> Result<Outcome, DeployError> {
    let host = plan.name.as_str();
    let t = timer(r, view, host, Stage::Connect);
    let remote = Remote::connect(host, &plan.destination, &settings.ssh, plan.elevation).await;
    t.end(remote.is_ok());
    let remote = remote?;

    let t = timer(r, view, host, Stage::Lock);
    let holder = format!(
        "{}@{} pid {} since {}",
        std::env::var("USER").unwrap_or_else(|_| "?".into()),
        hostname(),
        std::process::id(),
        unix_now()
    );
    let mut lock = remote.spawn_held(&lock_script(&holder)).await?;
    let first = read_first_line(&mut lock).await;
    t.end(first.starts_with("LOCKED"));
    if !first.starts_with("LOCKED") {
        let rest = lock
            .wait_with_output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        return Err(DeployError::Locked {
            host: host.to_owned(),
            holder: if rest.is_empty() {
                "holder unknown".into()
            } else {
                rest
            },
        });
    }

    let result = run_locked(&remote, plan, settings, view, r).await;
    // Closing stdin ends `cat` and with it the lock.
    drop(lock.stdin().take());
    let _ = lock.wait().await;
    remote.close().await;
    result
}

async fn read_first_line(child: &mut openssh::Child<Arc<openssh::Session>>) -> String {
    use tokio::io::AsyncReadExt;
    let Some(out) = child.stdout().as_mut() else {
        return String::new();
    };
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        match out.read(&mut byte).await {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

async fn step(
    remote: &Remote,
    script: &str,
    doing: &str,
) -> Result<crate::remote::RemoteOutput, DeployError> {
    let out = remote.run(script, doing).await?;
    if !out.success() {
        return Err(DeployError::Step {
            host: remote.name.clone(),
            doing: doing.to_owned(),
            output: out.tail(),
        });
    }
    Ok(out)
}

async fn run_locked(
    remote: &Remote,
    plan: &HostPlan,
    settings: &Settings,
    view: &DeployView,
    r: &mut HostReport,
) -> Result<Outcome, DeployError> {
    let host = plan.name.as_str();
    let t = timer(r, view, host, Stage::Preflight);
    let pre = step(remote, &preflight_script(), "preflight").await;
    t.end(pre.is_ok());
    let pre = pre?;
    let facts: BTreeMap<&str, &str> = pre
        .stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .collect();
    if facts.get("portablectl").is_none_or(|p| p.is_empty()) {
        return Err(DeployError::NoPortablectl {
            host: host.to_owned(),
        });
    }
    let version: u32 = facts
        .get("systemd")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version < 248 {
        return Err(DeployError::OldSystemd {
            host: host.to_owned(),
            version,
        });
    }
    let free_kb: u64 = facts
        .get("free_kb")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    let listing = step(remote, LIST_ATTACHED, "reading attached images").await?;

    // Plan each service: which file, upload or not, attach or reattach.
    struct Todo<'a> {
        svc: &'a ServicePlan,
        target: String,
        upload: bool,
        action: Action,
        previous: Option<String>,
    }
    let mut todos = Vec::new();
    let mut need_kb = 0u64;
    for svc in &plan.services {
        let attached = parse_attached(&listing.stdout, &svc.name);
        let base = format!("{}_{}", svc.name, svc.version);
        let mut target = format!("{PORTABLES}/{base}.raw");
        let mut remote_sha = remote_sha256(remote, &target).await?;
        // Same name, other content, and attached: portabled cannot
        // reattach the same name, and overwriting an attached image is
        // picked up silently at the next restart. Give the new content
        // its own name instead.
        if remote_sha.as_deref().is_some_and(|s| s != svc.sha256)
            && attached.image.as_deref() == Some(target.as_str())
        {
            target = format!("{PORTABLES}/{base}-{}.raw", &svc.sha256[..8]);
            remote_sha = remote_sha256(remote, &target).await?;
            view.note(
                host,
                &format!(
                    "{base}.raw is attached with other content; deploying it as {} (bump the version next time)",
                    target.rsplit('/').next().unwrap_or_default()
                ),
            );
        }
        let upload = remote_sha.as_deref() != Some(svc.sha256.as_str());
        if upload {
            need_kb += svc.size / 1024 + 1;
        }
        let action = match attached.image.as_deref() {
            None => Action::Attach,
            Some(img) if img == target && !upload => Action::Unchanged,
            Some(_) => Action::Reattach,
        };
        r.services.push(ServiceReport {
            name: svc.name.clone(),
            image: target.clone(),
            sha256: svc.sha256.clone(),
            upload,
            action,
            previous: attached.image.clone(),
        });
        todos.push(Todo {
            svc,
            target,
            upload,
            action,
            previous: attached.image,
        });
    }
    // Keep 5% and 16 MiB in reserve: a full /var breaks more than us.
    let margin_kb = need_kb / 20 + 16 * 1024;
    if need_kb > 0 && free_kb < need_kb + margin_kb {
        return Err(DeployError::NoSpace {
            host: host.to_owned(),
            free_mb: free_kb / 1024,
            need_mb: (need_kb + margin_kb) / 1024,
        });
    }
    if settings.dry_run {
        return Ok(Outcome::Planned);
    }

    let t = timer(r, view, host, Stage::Push);
    let mut push_result = Ok(());
    let mut sent_total = 0;
    for todo in todos.iter().filter(|t| t.upload) {
        match push(remote, todo.svc, &todo.target, view).await {
            Ok(sent) => sent_total += sent,
            Err(e) => {
                push_result = Err(e);
                break;
            }
        }
    }
    t.report.bytes_sent = sent_total;
    t.end(push_result.is_ok());
    push_result?;

    for todo in &todos {
        if todo.action == Action::Unchanged {
            // Nothing to change, but the answer must still be true: check.
            let t = timer(r, view, host, Stage::Health);
            let h = health(remote, todo.svc, &todo.target, settings).await;
            t.end(h.is_ok());
            h?;
            continue;
        }
        let t = timer(r, view, host, Stage::Activate);
        let verb = match todo.action {
            Action::Attach => "attach",
            _ => "reattach",
        };
        // If we lose the host from here on, it goes back by itself.
        let deadman = if settings.rollback {
            Some(
                arm_deadman(
                    remote,
                    &todo.svc.name,
                    todo.previous.as_deref(),
                    &todo.target,
                    &plan.profile,
                    settings.rollback_after,
                )
                .await?,
            )
        } else {
            None
        };
        let activated = activate(remote, verb, &todo.target, &plan.profile, &todo.svc.name).await;
        t.end(activated.is_ok());
        let failure = match activated {
            Ok(()) => {
                let t = timer(r, view, host, Stage::Health);
                let h = health(remote, todo.svc, &todo.target, settings).await;
                t.end(h.is_ok());
                h.err()
            }
            Err(e) => Some(e),
        };
        if let Some(unit) = &deadman {
            disarm_deadman(remote, unit).await?;
        }
        if let Some(e) = failure {
            if !settings.rollback {
                return Err(e);
            }
            let t = timer(r, view, host, Stage::Rollback);
            let rb = rollback(
                remote,
                todo.previous.as_deref(),
                &todo.target,
                &plan.profile,
                todo.svc,
                settings,
            )
            .await;
            t.end(rb.is_ok());
            r.error = Some(e.to_string());
            return match rb {
                Ok(()) => Ok(Outcome::RolledBack),
                Err(rb_err) => {
                    r.rollback_error = Some(rb_err.to_string());
                    Ok(Outcome::Failed)
                }
            };
        }
        record_previous(remote, &todo.svc.name, todo.previous.as_deref()).await;
    }

    let t = timer(r, view, host, Stage::Prune);
    let mut pruned = Ok(());
    for todo in &todos {
        if let Err(e) = prune(remote, &todo.svc.name, &todo.target, settings.keep).await {
            pruned = Err(e);
        }
    }
    t.end(pruned.is_ok());
    if let Err(e) = pruned {
        view.note(host, &format!("pruning old images failed: {e}"));
    }
    Ok(Outcome::Healthy)
}

/// The image `service` is attached from on the host, if any.
pub async fn attached_image(remote: &Remote, service: &str) -> Result<Option<String>, DeployError> {
    let listing = step(remote, LIST_ATTACHED, "reading attached images").await?;
    Ok(parse_attached(&listing.stdout, service).image)
}

pub async fn remote_sha256(remote: &Remote, path: &str) -> Result<Option<String>, DeployError> {
    let out = remote
        .run(
            &format!("[ -f {p} ] && sha256sum {p} || true", p = q(path)),
            "hashing the image on the host",
        )
        .await?;
    Ok(out
        .stdout
        .split_whitespace()
        .next()
        .filter(|s| s.len() == 64)
        .map(str::to_owned))
}

/// Uploads under a temporary name that portabled never looks at (not
/// `.raw`), checks its sha256 on the host, then renames it into place.
async fn push(
    remote: &Remote,
    svc: &ServicePlan,
    target: &str,
    view: &DeployView,
) -> Result<u64, DeployError> {
    let file = target.rsplit('/').next().unwrap_or_default();
    let tmp = format!("{PORTABLES}/.{file}.attache-partial");
    // Leftovers of an interrupted upload (we hold the host's lock).
    step(
        remote,
        &format!("rm -f {PORTABLES}/.*.attache-partial"),
        "removing partial uploads",
    )
    .await?;
    view.push_started(&remote.name, svc.size);
    let host = remote.name.clone();
    let progress = {
        let view = view.clone();
        move |n: u64| view.push_progress(&host, n)
    };
    let sent = remote.upload(&svc.local, &tmp, &progress).await?;
    let got = remote_sha256(remote, &tmp).await?.unwrap_or_default();
    if got != svc.sha256 {
        let _ = remote
            .run(&format!("rm -f {}", q(&tmp)), "cleaning up")
            .await;
        return Err(DeployError::Corrupt {
            host: remote.name.clone(),
            image: file.to_owned(),
            got,
            want: svc.sha256.clone(),
        });
    }
    step(
        remote,
        &format!(
            "chmod 0644 {t} && mv -f {t} {f} && {{ sync -f {f} 2>/dev/null || true; }}",
            t = q(&tmp),
            f = q(target)
        ),
        "moving the image into place",
    )
    .await?;
    Ok(sent)
}

pub async fn activate(
    remote: &Remote,
    verb: &'static str,
    image: &str,
    profile: &str,
    name: &str,
) -> Result<(), DeployError> {
    let id = format!("{name}-{}", unix_now());
    let args: Vec<String> = [
        "portablectl",
        verb,
        "--enable",
        "--now",
        "--profile",
        profile,
        image,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let out = remote
        .run(&activation_script(&id, &args), "activating")
        .await?;
    if !out.success() {
        return Err(DeployError::Activate {
            host: remote.name.clone(),
            verb,
            image: image.to_owned(),
            output: strip_harmless(&out.tail()),
        });
    }
    Ok(())
}

/// portablectl reports that it cannot start template units directly; that
/// is expected and not worth showing as a failure.
fn strip_harmless(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains("is missing the instance name"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn health(
    remote: &Remote,
    svc: &ServicePlan,
    image: &str,
    settings: &Settings,
) -> Result<(), DeployError> {
    let units = units_to_check(&svc.units);
    let unhealthy = |reason: String| DeployError::Unhealthy {
        host: remote.name.clone(),
        image: image.rsplit('/').next().unwrap_or(image).to_owned(),
        reason,
    };
    if !units.is_empty() {
        let script = show_script(&units);
        let before = parse_show(&step(remote, &script, "reading unit states").await?.stdout);
        tokio::time::sleep(settings.settle).await;
        let after = parse_show(&step(remote, &script, "reading unit states").await?.stdout);
        judge(&units, &before, &after, image).map_err(unhealthy)?;
    }
    for check in &svc.checks {
        let (script, _timeout, retries) = check_script(check);
        let mut last = String::new();
        let mut ok = false;
        for attempt in 0..retries.max(1) {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let out = remote.run(&script, "running a health check").await?;
            if out.success() {
                ok = true;
                break;
            }
            last = out.tail();
        }
        if !ok {
            let what = match check {
                Check::Http { url, .. } => format!("HTTP check {url} failed"),
                Check::Command { command, .. } => format!("check `{command}` failed"),
            };
            return Err(unhealthy(if last.is_empty() {
                what
            } else {
                format!("{what}: {last}")
            }));
        }
    }
    Ok(())
}

/// Puts the previous image back, or detaches the new one when there was
/// none, and checks the result.
async fn rollback(
    remote: &Remote,
    previous: Option<&str>,
    failed: &str,
    profile: &str,
    svc: &ServicePlan,
    settings: &Settings,
) -> Result<(), DeployError> {
    match previous {
        Some(prev) if prev != failed => {
            activate(remote, "reattach", prev, profile, &svc.name).await?;
            let units: Vec<String> = units_to_check(&svc.units);
            if units.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(settings.settle.min(Duration::from_secs(3))).await;
            let shown = parse_show(
                &step(remote, &show_script(&units), "reading unit states")
                    .await?
                    .stdout,
            );
            // Units the old image does not have show up as inactive with no
            // root image; only judge those it runs.
            let theirs: Vec<String> = units
                .into_iter()
                .filter(|u| {
                    shown
                        .get(u)
                        .is_some_and(|s| s.root_image == prev || !u.ends_with(".service"))
                })
                .collect();
            judge(&theirs, &shown, &shown, prev).map_err(|reason| DeployError::Unhealthy {
                host: remote.name.clone(),
                image: prev.rsplit('/').next().unwrap_or(prev).to_owned(),
                reason,
            })
        }
        _ => detach(remote, &svc.name, failed).await,
    }
}

/// `portablectl detach --enable --now IMAGE`, as safely as an activation.
pub async fn detach(remote: &Remote, name: &str, image: &str) -> Result<(), DeployError> {
    let id = format!("{name}-detach-{}", unix_now());
    let args: Vec<String> = ["portablectl", "detach", "--enable", "--now", image]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let out = remote
        .run(&activation_script(&id, &args), "detaching")
        .await?;
    if out.success() {
        Ok(())
    } else {
        Err(DeployError::Activate {
            host: remote.name.clone(),
            verb: "detach",
            image: image.to_owned(),
            output: out.tail(),
        })
    }
}

/// Arms a timer on the host that puts the previous image back (or detaches
/// the new one) after `after`, unless [`disarm_deadman`] stops it first: a
/// deploy that loses its connection mid-activation cannot leave an
/// unchecked version running. Returns the timer's unit name.
async fn arm_deadman(
    remote: &Remote,
    name: &str,
    previous: Option<&str>,
    new: &str,
    profile: &str,
    after: Duration,
) -> Result<String, DeployError> {
    let unit = format!("attache-deadman-{name}");
    let revert: Vec<&str> = match previous {
        Some(prev) if prev != new => vec![
            "portablectl",
            "reattach",
            "--enable",
            "--now",
            "--profile",
            profile,
            prev,
        ],
        _ => vec!["portablectl", "detach", "--enable", "--now", new],
    };
    let revert = revert.iter().map(|a| q(a)).collect::<Vec<_>>().join(" ");
    let script = format!(
        "systemctl stop {u}.timer {u}.service 2>/dev/null; systemctl reset-failed {u}.timer {u}.service 2>/dev/null; \
         systemd-run --quiet --unit={u} --on-active={secs} --timer-property=AccuracySec=1s /bin/sh -c {revert}",
        u = q(&unit),
        secs = after.as_secs().max(1),
        revert = q(&revert)
    );
    step(remote, &script, "arming the automatic rollback").await?;
    Ok(unit)
}

async fn disarm_deadman(remote: &Remote, unit: &str) -> Result<(), DeployError> {
    step(
        remote,
        &format!("systemctl stop {}.timer", q(unit)),
        "disarming the automatic rollback",
    )
    .await
    .map(|_| ())
}

fn previous_file(name: &str) -> String {
    format!("/var/lib/attache/{name}.previous")
}

/// The image recorded as attached before the last deploy of `name`, if any.
pub async fn read_previous(remote: &Remote, name: &str) -> Result<Option<String>, DeployError> {
    let out = remote
        .run(
            &format!("cat {} 2>/dev/null || true", q(&previous_file(name))),
            "reading the previous image",
        )
        .await?;
    let p = out.stdout.trim();
    Ok((!p.is_empty()).then(|| p.to_owned()))
}

/// Remembers the image that was attached before, for `attache rollback`.
pub async fn record_previous(remote: &Remote, name: &str, previous: Option<&str>) {
    let file = previous_file(name);
    let script = match previous {
        Some(p) => format!("mkdir -p /var/lib/attache && echo {} > {}", q(p), q(&file)),
        None => format!("rm -f {}", q(&file)),
    };
    let _ = remote.run(&script, "recording the previous image").await;
}

async fn prune(
    remote: &Remote,
    name: &str,
    attached: &str,
    keep: usize,
) -> Result<(), DeployError> {
    let previous = read_previous(remote, name).await?;
    let listing = step(
        remote,
        &format!(
            "for f in {PORTABLES}/{}_*.raw; do [ -f \"$f\" ] && stat -c '%Y %n' \"$f\"; done; true",
            q(name)
        ),
        "listing images",
    )
    .await?;
    let doomed: Vec<String> = prune_candidates(&listing.stdout, keep.max(1), Some(attached), name)
        .into_iter()
        .filter(|p| Some(p) != previous.as_ref() || keep < 2)
        .collect();
    if doomed.is_empty() {
        return Ok(());
    }
    let list = doomed.iter().map(|p| q(p)).collect::<Vec<_>>().join(" ");
    step(remote, &format!("rm -f {list}"), "removing old images").await?;
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}
