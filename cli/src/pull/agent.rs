//! `attache agent`: one pull on a pull host, run by `attache-pull.service`.
//!
//! Fetch `SHA256SUMS` (and its signature) with systemd-pull, verify it with
//! `ssh-keygen -Y verify`, pick per service the newest version not known to
//! fail, download what is missing under a name portabled ignores, check its
//! sha256 against the verified index, rename it into place, then switch
//! through `deploy::deploy_host` on this machine: the push deploy's own
//! transaction (lock, plan, arm the revert, activate, health, confirm or
//! roll back, record, prune), with the host's settings left as they are.
//! Whatever happens is written to the state file, atomically, in one
//! sentence; nothing is placed or attached before the index is verified.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::{
    AttachedImage, Config, Last, PullOutcome, State, AGENT_LOCK, ALLOWED_SIGNERS, PULL_DIR, SIGNER,
    STATE,
};
use crate::deploy::{
    self, Event, Events, HostPlan, Interrupt, Outcome, ServicePlan, ServiceSettings, Settings,
};
use crate::error::Error;
use crate::names::{basename, ImageFile, PORTABLES};
use crate::publish::{index, version};
use crate::remote::{Destination, Elevation, SshOptions};

/// Runs one pull and records its outcome in the state file. Errors only
/// when the config cannot be read or the state cannot be written.
pub fn run(config: &Path) -> Result<Last, Error> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| Error::io(format!("reading {}", config.display()), e))?;
    let cfg: Config = serde_json::from_str(&text).map_err(|e| {
        Error::Usage(format!(
            "{} is not an attache pull config ({e}); run `attache deploy` for this host again",
            config.display()
        ))
    })?;
    // Two runs at once (the timer's and one started by hand) would clear
    // each other's downloads, and one could rename the other's half-written
    // download into place; the flock goes with this process.
    let _running = match lock_agent(Path::new(AGENT_LOCK)) {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            return Ok(Last {
                at: now(),
                outcome: PullOutcome::Busy,
                why: "another attache agent is running on this host: this run did nothing, that one writes the state".into(),
                services: BTreeMap::new(),
            })
        }
        Err(e) => return Err(Error::io(format!("locking {AGENT_LOCK}"), e)),
    };
    let state_path = Path::new(STATE);
    let mut state: State = std::fs::read(state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    state.checked_at = now();
    let last = match pull(&cfg, &mut state) {
        Ok(last) => last,
        Err((outcome, why)) => Last {
            at: now(),
            outcome,
            why,
            services: BTreeMap::new(),
        },
    };
    state.last = Some(last.clone());
    write_atomically(
        state_path,
        &serde_json::to_vec_pretty(&state).unwrap_or_default(),
    )
    .map_err(|e| Error::io(format!("writing {STATE}"), e))?;
    Ok(last)
}

type Refusal = (PullOutcome, String);

fn refused(why: String) -> Refusal {
    (PullOutcome::Refused, why)
}

/// One pull, up to the switch.
fn pull(cfg: &Config, state: &mut State) -> Result<Last, Refusal> {
    let incoming = Path::new(PULL_DIR).join("incoming");
    let io = |what: &str, e: std::io::Error| (PullOutcome::Failed, format!("{what}: {e}"));
    std::fs::create_dir_all(&incoming).map_err(|e| io("creating the download directory", e))?;
    clear_partial_downloads();
    let sums = incoming.join("SHA256SUMS");
    fetch(&format!("{}/SHA256SUMS", cfg.url), &sums)?;
    if !cfg.insecure_unsigned {
        let sig = incoming.join("SHA256SUMS.sig");
        fetch(&format!("{}/SHA256SUMS.sig", cfg.url), &sig).map_err(|(o, why)| {
            if why.contains("code 404") {
                refused(format!(
                    "{}/SHA256SUMS.sig is not published (404), and this host accepts only a SHA256SUMS signed by its publish key: nothing was fetched or switched",
                    cfg.url
                ))
            } else {
                (o, why)
            }
        })?;
        verify(&sums, &sig)?;
    }
    let text = std::fs::read_to_string(&sums)
        .map_err(|_| refused("SHA256SUMS is not text: nothing was fetched".into()))?;
    let entries = index::parse(&text)
        .map_err(|e| refused(format!("SHA256SUMS: {e}; nothing was fetched")))?;

    // Per service: the newest published version, and the newest one to try.
    let mut chosen = Vec::new();
    for svc in &cfg.services {
        let (newest, pick) = choose(&entries, &svc.name, state.failed.get(&svc.name));
        if let Some(n) = newest {
            state.published.insert(svc.name.clone(), n.version.clone());
        }
        if let Some(e) = pick {
            chosen.push((svc, ImageFile::new(&e.name, &e.version), e.sha256.clone()));
        }
    }
    if chosen.is_empty() {
        return Err(refused(format!(
            "SHA256SUMS at {} names no image of this host's services ({})",
            cfg.url,
            cfg.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    // Place every image the switch needs before anything switches.
    let mut plans = Vec::new();
    for (svc, file, sha256) in &chosen {
        let dest = PathBuf::from(file.host_path());
        place(cfg, file, sha256, &dest)?;
        state
            .fetched
            .insert(svc.name.clone(), file.version().to_owned());
        let b = crate::build::prebuilt(&dest).map_err(|e| {
            if the_hosts_fault(&e) {
                return (
                    PullOutcome::Failed,
                    format!("{e}; the next run tries again"),
                );
            }
            state
                .failed
                .insert(svc.name.clone(), file.version().to_owned());
            refused(format!(
                "{} cannot be attached: {e}; it will not be tried again until a newer version is published",
                file.file_name()
            ))
        })?;
        plans.push(ServicePlan {
            name: b.name,
            version: b.version,
            local: dest,
            sha256: b.sha256,
            size: b.size,
            units: b.units,
            prefixes: b.prefixes,
            checks: svc.checks.clone(),
            manifest: b.manifest.as_ref().map(|m| m.to_bytes()),
            settings: ServiceSettings {
                as_is: true,
                ..Default::default()
            },
        });
    }
    let trying: BTreeMap<String, String> = chosen
        .iter()
        .map(|(s, f, _)| (s.name.clone(), f.version().to_owned()))
        .collect();
    let described: BTreeMap<String, AttachedImage> = plans
        .iter()
        .map(|p| {
            let image = AttachedImage {
                version: p.version.clone(),
                sha256: p.sha256.clone(),
                size: p.size,
                units: p.units.clone(),
                prefixes: p.prefixes.clone(),
            };
            (p.name.clone(), image)
        })
        .collect();
    let report = switch(cfg, plans)?;
    Ok(record(&report, trying, &described, state))
}

/// What the switch's report means for the state: a version is remembered
/// as failed only when its own activation or checks failed, never when the
/// host was busy or something else broke.
fn record(
    report: &deploy::HostReport,
    trying: BTreeMap<String, String>,
    described: &BTreeMap<String, AttachedImage>,
    state: &mut State,
) -> Last {
    let at = now();
    if report.busy {
        return Last {
            at,
            outcome: PullOutcome::Busy,
            why: "another attache (a push deploy) held this host's lock: nothing changed, the next run tries again".into(),
            services: trying,
        };
    }
    let mut switched = Vec::new();
    let outcome = match report.outcome {
        Outcome::Healthy => {
            for sr in &report.services {
                let version = trying.get(&sr.name).cloned().unwrap_or_default();
                if sr.outcome != Outcome::Unchanged {
                    switched.push(format!("{} {version}", sr.name));
                    state.failed.remove(&sr.name);
                }
                state.attached.insert(sr.name.clone(), version);
                if let Some(image) = described.get(&sr.name) {
                    state.images.insert(sr.name.clone(), image.clone());
                }
            }
            if switched.is_empty() {
                PullOutcome::Unchanged
            } else {
                PullOutcome::Switched
            }
        }
        Outcome::RolledBack => {
            for sr in report
                .services
                .iter()
                .filter(|s| s.outcome == Outcome::RolledBack)
            {
                let blamed = report.culprit.as_deref() == Some(basename(&sr.image));
                if let (true, Some(v)) = (blamed, trying.get(&sr.name)) {
                    state.failed.insert(sr.name.clone(), v.clone());
                }
                match sr.previous.as_deref().and_then(ImageFile::parse) {
                    Some(prev) => state
                        .attached
                        .insert(sr.name.clone(), prev.version().to_owned()),
                    None => {
                        state.images.remove(&sr.name);
                        state.attached.remove(&sr.name)
                    }
                };
            }
            PullOutcome::RolledBack
        }
        _ => PullOutcome::Failed,
    };
    let why = match outcome {
        PullOutcome::Switched => format!(
            "{} attached and passed {} checks",
            switched.join(", "),
            if switched.len() == 1 { "its" } else { "their" }
        ),
        PullOutcome::Unchanged => "every service runs the newest version it may run".to_owned(),
        _ => report
            .error
            .clone()
            .map(|e| match &report.rollback_error {
                Some(rb) => format!("{e}; rolling back failed too: {rb}"),
                None => e,
            })
            .unwrap_or_else(|| format!("the switch ended {}", report.outcome)),
    };
    Last {
        at,
        outcome,
        why,
        services: trying,
    }
}

/// An image that cannot be read for the host's reasons (disk, permissions)
/// is not a bad version: it is tried again.
fn the_hosts_fault(e: &Error) -> bool {
    use crate::image::ImageError;
    use std::io::ErrorKind;
    let source = match e {
        Error::Io { source, .. } => source,
        Error::Image(ImageError::Read { source, .. }) => source,
        _ => return false,
    };
    !matches!(
        source.kind(),
        ErrorKind::InvalidData | ErrorKind::UnexpectedEof
    )
}

/// `service`'s newest published entry, and the one to run: the newest
/// whose version is not the one that failed its checks here.
fn choose<'e>(
    entries: &'e [index::Entry],
    service: &str,
    failed: Option<&String>,
) -> (Option<&'e index::Entry>, Option<&'e index::Entry>) {
    let mut mine: Vec<&index::Entry> = entries.iter().filter(|e| e.name == service).collect();
    mine.sort_by(|a, b| version::compare(&a.version, &b.version));
    let pick = mine
        .iter()
        .rev()
        .find(|e| Some(&e.version) != failed)
        .copied();
    (mine.last().copied(), pick)
}

/// The push deploy's transaction, on this machine.
fn switch(cfg: &Config, services: Vec<ServicePlan>) -> Result<deploy::HostReport, Refusal> {
    let plan = HostPlan {
        name: cfg.host.clone(),
        destination: Destination {
            host: "localhost".into(),
            user: None,
            port: None,
        },
        elevation: Elevation::None,
        profile: cfg.profile.clone(),
        services,
        local: true,
    };
    let settings = Arc::new(Settings {
        ssh: SshOptions::default(),
        rollback: true,
        dry_run: false,
        keep: cfg.keep.max(1),
        settle: Duration::from_secs(cfg.settle),
        rollback_after: Duration::from_secs(cfg.rollback_after),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            (
                PullOutcome::Failed,
                format!("starting the async runtime: {e}"),
            )
        })?;
    // SIGTERM (the service stopped) lets the step at hand finish and
    // confirm or roll back, as Ctrl-C does a push deploy.
    let stop = {
        let _in = rt.enter();
        Interrupt::listen()
            .map_err(|e| (PullOutcome::Failed, format!("listening for SIGTERM: {e}")))?
    };
    Ok(rt.block_on(deploy::deploy_host(plan, settings, Journal, stop, None)))
}

/// Stage changes go to stderr, which is the unit's journal.
struct Journal;

impl Events for Journal {
    #[allow(clippy::print_stderr)]
    fn emit(&self, _host: &str, event: Event<'_>) {
        match event {
            Event::Stage(s) => eprintln!("{s}"),
            Event::Note(n) => eprintln!("{n}"),
            Event::Done { outcome, error } => {
                eprintln!(
                    "{outcome}{}",
                    error.map(|e| format!(": {e}")).unwrap_or_default()
                )
            }
            _ => {}
        }
    }
}

/// Makes `dest` the image `sha256` names: kept when it is there already,
/// else downloaded under a name portabled ignores, checked, and renamed.
fn place(cfg: &Config, file: &ImageFile, sha256: &str, dest: &Path) -> Result<(), Refusal> {
    if dest.exists() {
        let have = sha256_of(dest).map_err(|e| {
            (
                PullOutcome::Failed,
                format!("reading {}: {e}", dest.display()),
            )
        })?;
        if have == sha256 {
            return Ok(());
        }
        return Err(refused(format!(
            "{} on this host has other content (sha256 {have}) than the signed SHA256SUMS says ({sha256}); it is left as it is and nothing was switched",
            dest.display()
        )));
    }
    let tmp = PathBuf::from(format!("{PORTABLES}/.{}.attache-pull", file.file_name()));
    let _ = std::fs::remove_file(&tmp);
    let fetched = fetch(&format!("{}/{}", cfg.url, file.file_name()), &tmp);
    let checked = fetched.and_then(|()| {
        let got = sha256_of(&tmp).map_err(|e| {
            (
                PullOutcome::Failed,
                format!("reading {}: {e}", tmp.display()),
            )
        })?;
        if got != sha256 {
            return Err(refused(format!(
                "{} arrived with sha256 {got}, but the signed SHA256SUMS says {sha256}: it was removed and nothing was switched",
                file.file_name()
            )));
        }
        std::fs::rename(&tmp, dest).map_err(|e| {
            (
                PullOutcome::Failed,
                format!("moving {} into place: {e}", file.file_name()),
            )
        })
    });
    if checked.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    checked
}

/// Downloads an earlier run left when it was killed (the service stopped
/// mid-download); portabled ignores them, but they take room.
fn clear_partial_downloads() {
    let Ok(dir) = std::fs::read_dir(PORTABLES) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".attache-pull") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// systemd's own downloader (the one sysupdate runs). It leaves a 404's
/// body behind under the target name, so a failure removes the target.
fn fetch(url: &str, dest: &Path) -> Result<(), Refusal> {
    let _ = std::fs::remove_file(dest);
    let pull = ["/usr/lib/systemd/systemd-pull", "/lib/systemd/systemd-pull"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            (
                PullOutcome::Failed,
                "systemd-pull is missing (/usr/lib/systemd/systemd-pull): install systemd-container"
                    .to_owned(),
            )
        })?;
    let out = Command::new(pull)
        .args(["raw", "--direct", "--verify=no"])
        .arg(url)
        .arg(dest)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| (PullOutcome::Failed, format!("running {pull}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let _ = std::fs::remove_file(dest);
    let says = String::from_utf8_lossy(&out.stderr);
    let said = says
        .lines()
        .map(str::trim)
        .find(|l| l.contains("failed") || l.contains("Failed"))
        .unwrap_or("no answer")
        .to_owned();
    Err((
        PullOutcome::Unreachable,
        format!("could not fetch {url} ({said}); nothing changed, the next run tries again"),
    ))
}

/// `ssh-keygen -Y verify` against the one key deploy gave the host.
fn verify(sums: &Path, sig: &Path) -> Result<(), Refusal> {
    let index = std::fs::File::open(sums)
        .map_err(|e| (PullOutcome::Failed, format!("reading SHA256SUMS: {e}")))?;
    let out = Command::new("ssh-keygen")
        .args([
            "-Y",
            "verify",
            "-f",
            ALLOWED_SIGNERS,
            "-I",
            SIGNER,
            "-n",
            SIGNER,
            "-s",
        ])
        .arg(sig)
        .stdin(index)
        .output()
        .map_err(|e| (PullOutcome::Failed, format!("running ssh-keygen: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    // ssh-keygen says "Could not verify signature." on stdout, and why (if
    // it says) on stderr.
    let last = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(str::to_owned)
    };
    let said = last(&out.stderr)
        .or_else(|| last(&out.stdout))
        .unwrap_or_else(|| "no reason given".into());
    Err(refused(format!(
        "SHA256SUMS is not signed by this host's publish key ({said}): nothing was fetched or switched"
    )))
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let f = std::fs::File::open(path)?;
    crate::image::hash_file(&f, f.metadata()?.len())
}

/// Holds `path`'s flock, or `None` when another process holds it.
fn lock_agent(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Written beside and renamed: a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, image: &str, outcome: Outcome) -> deploy::ServiceReport {
        deploy::ServiceReport {
            name: name.into(),
            image: format!("/var/lib/portables/{image}"),
            sha256: String::new(),
            upload: false,
            action: crate::deploy::Action::Reattach,
            previous: Some(format!("/var/lib/portables/{name}_1.0.raw")),
            settings: Vec::new(),
            outcome,
            transfer: Default::default(),
        }
    }

    fn trying() -> BTreeMap<String, String> {
        [("demo", "2.0"), ("shop", "5.0")]
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_the_version_whose_checks_failed_is_remembered_as_failed() {
        let mut r = deploy::HostReport::new("p1");
        r.outcome = Outcome::RolledBack;
        r.services = vec![
            service("demo", "demo_2.0.raw", Outcome::RolledBack),
            service("shop", "shop_5.0.raw", Outcome::RolledBack),
        ];
        r.culprit = Some("shop_5.0.raw".into());
        let mut state = State::default();
        let last = record(&r, trying(), &BTreeMap::new(), &mut state);
        assert_eq!(last.outcome, PullOutcome::RolledBack);
        assert_eq!(state.failed.get("shop").map(String::as_str), Some("5.0"));
        assert_eq!(state.failed.get("demo"), None, "demo 2.0 did nothing wrong");
        assert_eq!(state.attached.get("demo").map(String::as_str), Some("1.0"));

        // Rolled back for a reason no image is to blame for: retried.
        r.culprit = None;
        let mut state = State::default();
        record(&r, trying(), &BTreeMap::new(), &mut state);
        assert!(state.failed.is_empty());
    }

    #[test]
    fn a_busy_host_is_busy_not_failed() {
        let mut r = deploy::HostReport::new("p1");
        r.busy = true;
        r.error = Some("p1: another attache is deploying to this host".into());
        let mut state = State::default();
        let last = record(&r, trying(), &BTreeMap::new(), &mut state);
        assert_eq!(last.outcome, PullOutcome::Busy);
        assert!(last.why.contains("next run tries again"), "{}", last.why);
        assert!(state.failed.is_empty() && state.attached.is_empty());

        // Any other failure of the switch marks nothing failed either.
        r.busy = false;
        let last = record(&r, trying(), &BTreeMap::new(), &mut state);
        assert_eq!(last.outcome, PullOutcome::Failed);
        assert!(state.failed.is_empty());
    }

    #[test]
    fn an_image_the_host_cannot_read_is_not_a_bad_version() {
        let io = |k| std::io::Error::new(k, "x");
        let disk = Error::io("reading demo_2.0.raw", io(std::io::ErrorKind::StorageFull));
        assert!(the_hosts_fault(&disk));
        let garbage = Error::Image(crate::image::ImageError::Read {
            path: "demo_2.0.raw".into(),
            source: io(std::io::ErrorKind::InvalidData),
        });
        assert!(!the_hosts_fault(&garbage));
        assert!(!the_hosts_fault(&Error::Refused(vec!["no units".into()])));
    }

    #[test]
    fn one_agent_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pull/agent.lock");
        let first = lock_agent(&path).unwrap();
        assert!(first.is_some());
        assert!(
            lock_agent(&path).unwrap().is_none(),
            "a second run waits its turn"
        );
        drop(first);
        assert!(lock_agent(&path).unwrap().is_some());
    }

    #[test]
    fn the_newest_version_not_known_to_fail() {
        let sum = "0".repeat(64);
        let entries: Vec<index::Entry> = [
            "demo_1.0.raw",
            "demo_10.0.raw",
            "demo_2.0.raw",
            "demo-admin_99.raw",
        ]
        .iter()
        .map(|f| index::Entry::new(f, &sum).unwrap())
        .collect();
        let (newest, pick) = choose(&entries, "demo", None);
        assert_eq!(newest.unwrap().version, "10.0");
        assert_eq!(pick.unwrap().version, "10.0");
        let (newest, pick) = choose(&entries, "demo", Some(&"10.0".to_owned()));
        assert_eq!(newest.unwrap().version, "10.0");
        assert_eq!(pick.unwrap().file, "demo_2.0.raw");
        assert_eq!(choose(&entries, "shop", None), (None, None));
    }
}
