//! `attache deploy` on one host, as one transaction over every service it
//! changes: connect -> lock -> read the host -> plan -> push -> arm the
//! host's own revert -> activate all -> check all -> confirm, or put all back.
//!
//! The truth about what is attached comes from the units' drop-ins
//! (`system.attached/UNIT.d/20-portable.conf`), told apart by image file,
//! never from unit prefixes nor `portablectl list`.
//!
//! - `ops`: the remote protocol (every script, and its parser);
//! - `delta`: sending an upgrade as the bytes the host lacks;
//! - `plan`: what to do, as a pure function of the host's facts;
//! - `health`: is it running;
//! - `manage`: `status`, `rollback` and `detach` of one service;
//! - `session`: the connection and the host's lock;
//! - `report`, `error`: what a host ends with.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::build::BuiltUnit;
use crate::inventory::Check;
use crate::names::basename;
use crate::remote::{Destination, Elevation, RemoteError, SshOptions};

mod delta;
mod error;
mod health;
mod interrupt;
mod manage;
mod ops;
mod plan;
mod report;
mod session;
mod settings;

pub use error::HostError;
pub use interrupt::{clock, Interrupt};
#[cfg(test)]
pub use manage::SecretStatus;
pub use manage::{
    attached_manifests, detach_service, host_status, journal_units, rollback_service,
    AttachedManifest, ServiceStatus,
};
pub use ops::{journal, quote, JournalQuery};
pub use plan::{check_timer, Action};
pub use report::{Event, Events, HostReport, Outcome, ServiceReport, Stage, Transfer};
pub use session::HostSession;
pub use settings::ServiceSettings;

use error::Cause;
use report::StageTime;

use ops::{Disarmed, HostFacts, PortableCall};
use plan::{Plan, Step};

/// One image to run on a host.
#[derive(Debug, Clone)]
pub struct ServicePlan {
    /// The image name, which is the service's name.
    pub name: String,
    pub version: String,
    pub local: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub units: Vec<BuiltUnit>,
    /// The unit prefixes the image declares (`PORTABLE_PREFIXES`).
    pub prefixes: Vec<String>,
    pub checks: Vec<Check>,
    /// The image's manifest as packed into it, kept next to it on the host.
    pub manifest: Option<Vec<u8>>,
    /// This host's settings and secrets for it.
    pub settings: ServiceSettings,
}

#[derive(Debug, Clone)]
pub struct HostPlan {
    pub name: String,
    pub destination: Destination,
    pub elevation: Elevation,
    pub profile: String,
    pub services: Vec<ServicePlan>,
    /// The host is this machine (a pull host's agent): no SSH.
    pub local: bool,
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

/// What a host starts from: its connection, its lock (not in a dry run)
/// and a first read of its state, none of which needs the images.
pub struct Opened {
    stages: Vec<StageTime>,
    trips: Option<Arc<AtomicU32>>,
    host: Result<(HostSession, HostFacts), HostError>,
}

impl Opened {
    /// Releases the lock and closes the connection, when there is one.
    pub async fn close(self) {
        if let Ok((s, ..)) = self.host {
            s.close().await;
        }
    }
}

/// [`open_host`] started on the runtime, so that it runs while the images
/// build.
pub struct Opening(tokio::task::JoinHandle<Opened>);

impl Opening {
    pub fn start(
        rt: &tokio::runtime::Handle,
        name: &str,
        destination: &Destination,
        elevation: Elevation,
        settings: Arc<Settings>,
    ) -> Opening {
        let (name, destination) = (name.to_owned(), destination.clone());
        Opening(rt.spawn(async move {
            open_host(&name, &destination, elevation, false, &settings).await
        }))
    }

    async fn wait(self) -> Option<Opened> {
        self.0.await.ok()
    }

    /// The images could not be built: no lock or connection is left behind.
    pub async fn close(self) {
        if let Some(o) = self.wait().await {
            o.close().await;
        }
    }
}

/// Connects, then takes the lock and reads the host in one round-trip (a
/// dry run only reads: taking the lock would create its file).
pub async fn open_host(
    name: &str,
    destination: &Destination,
    elevation: Elevation,
    local: bool,
    settings: &Settings,
) -> Opened {
    let mut stages = Vec::new();
    let timed = |stages: &mut Vec<StageTime>, stage, start: Instant, ok, trips| {
        stages.push(StageTime {
            stage,
            ms: start.elapsed().as_millis(),
            ok,
            round_trips: trips,
        });
    };
    let start = Instant::now();
    let s = if local {
        Ok(HostSession::local(name))
    } else {
        HostSession::connect(name, destination, &settings.ssh, elevation).await
    };
    let trips = s.as_ref().ok().map(|s| s.remote.trips());
    let count = |t: &Option<Arc<AtomicU32>>| t.as_ref().map_or(0, |t| t.load(Ordering::Relaxed));
    timed(&mut stages, Stage::Connect, start, s.is_ok(), count(&trips));
    let mut s = match s {
        Ok(s) => s,
        Err(e) => {
            return Opened {
                stages,
                trips,
                host: Err(e),
            }
        }
    };
    let (start, before) = (Instant::now(), count(&trips));
    let (stage, read) = if settings.dry_run {
        let read = s.facts(&[], false, Stage::Preflight, false).await;
        (Stage::Preflight, read.map(|(facts, _)| facts))
    } else {
        (Stage::Lock, s.lock_and_read().await)
    };
    timed(
        &mut stages,
        stage,
        start,
        read.is_ok(),
        count(&trips) - before,
    );
    let host = match read {
        Ok(facts) => Ok((s, facts)),
        Err(e) => {
            s.close().await;
            Err(e)
        }
    };
    Opened {
        stages,
        trips,
        host,
    }
}

/// Runs the whole pipeline on one host, from `opening` when it was opened
/// already. Never panics; always returns a report saying where the host
/// ended.
pub async fn deploy_host<E: Events>(
    plan: HostPlan,
    settings: Arc<Settings>,
    ev: E,
    stop: Interrupt,
    opening: Option<Opening>,
) -> HostReport {
    let mut r = HostReport::new(&plan.name);
    if stop.asked() {
        if let Some(o) = opening {
            o.close().await;
        }
        return HostReport::skipped(&plan.name, "interrupted before it started");
    }
    let run = Run {
        plan: &plan,
        settings: &settings,
        ev: &ev,
        stop: &stop,
        trips: OnceLock::new(),
    };
    let result = run.host(&mut r, opening).await;
    r.round_trips = run.trips();
    match result {
        Ok(outcome) => r.outcome = outcome,
        Err(e) => {
            // A terminal's Ctrl-C also reaches an ssh still logging in; a
            // host stopped before its upload is unchanged either way.
            let early = matches!(e.stage, Stage::Connect | Stage::Lock | Stage::Preflight);
            if matches!(e.cause, Cause::Interrupted { .. }) || (early && stop.asked()) {
                r.outcome = Outcome::Interrupted;
            }
            r.busy = matches!(e.cause, Cause::Locked { .. });
            r.error = Some(e.to_string());
        }
    }
    if matches!(r.outcome, Outcome::Failed | Outcome::Interrupted) {
        r.set_changed(r.outcome);
    }
    ev.emit(
        &plan.name,
        Event::Done {
            outcome: r.outcome,
            error: r.error.as_deref(),
        },
    );
    r
}

struct Run<'a, E> {
    plan: &'a HostPlan,
    settings: &'a Settings,
    ev: &'a E,
    stop: &'a Interrupt,
    /// The host connection's count of commands, once connected.
    trips: OnceLock<Arc<AtomicU32>>,
}

/// Times a stage, and counts its round-trips, into the report.
struct Timer<'a> {
    stage: Stage,
    start: Instant,
    trips: &'a OnceLock<Arc<AtomicU32>>,
    trips_before: u32,
}

fn trips_now(trips: &OnceLock<Arc<AtomicU32>>) -> u32 {
    trips.get().map_or(0, |t| t.load(Ordering::Relaxed))
}

impl Timer<'_> {
    fn end(self, r: &mut HostReport, ok: bool) {
        r.stages.push(StageTime {
            stage: self.stage,
            ms: self.start.elapsed().as_millis(),
            ok,
            round_trips: trips_now(self.trips) - self.trips_before,
        });
    }
}

impl<E: Events> Run<'_, E> {
    fn host_name(&self) -> &str {
        &self.plan.name
    }

    fn stage(&self, stage: Stage) -> Timer<'_> {
        self.ev.emit(self.host_name(), Event::Stage(stage));
        Timer {
            stage,
            start: Instant::now(),
            trips: &self.trips,
            trips_before: self.trips(),
        }
    }

    fn trips(&self) -> u32 {
        trips_now(&self.trips)
    }

    fn note(&self, msg: &str) {
        self.ev.emit(self.host_name(), Event::Note(msg));
    }

    /// Stops here if a stop was asked for: nothing has changed yet.
    fn go_on(&self, s: &HostSession, before: &'static str) -> Result<(), HostError> {
        if self.stop.asked() {
            return Err(Cause::Interrupted { before }.at(s.host(), Stage::Push));
        }
        Ok(())
    }

    async fn host(
        &self,
        r: &mut HostReport,
        opening: Option<Opening>,
    ) -> Result<Outcome, HostError> {
        let p = self.plan;
        self.ev.emit(self.host_name(), Event::Stage(Stage::Connect));
        let opened = match opening {
            Some(o) => o.wait().await,
            None => None,
        };
        let opened = match opened {
            Some(o) => o,
            None => {
                let local = p.local;
                open_host(&p.name, &p.destination, p.elevation, local, self.settings).await
            }
        };
        r.stages.extend(opened.stages);
        if let Some(t) = opened.trips {
            let _ = self.trips.set(t);
        }
        let (s, facts) = opened.host?;
        let result = self.locked(&s, facts, r).await;
        s.close().await;
        result
    }

    /// Reads the host. Only planning needs the images hashed; every later
    /// read only asks what is attached and which files are there.
    async fn facts(&self, s: &HostSession, stage: Stage) -> Result<HostFacts, HostError> {
        Ok(s.facts(&[], false, stage, false).await?.0)
    }

    async fn locked(
        &self,
        s: &HostSession,
        facts: HostFacts,
        r: &mut HostReport,
    ) -> Result<Outcome, HostError> {
        let t = self.stage(Stage::Preflight);
        let prepared = self.prepare(s, facts).await;
        t.end(r, prepared.is_ok());
        let (plan, facts) = prepared?;
        for step in &plan.steps {
            let svc = &self.plan.services[step.service];
            if let Some(n) = &step.note {
                self.note(n);
            }
            r.services.push(ServiceReport {
                name: svc.name.clone(),
                image: step.target.clone(),
                sha256: svc.sha256.clone(),
                upload: step.upload,
                action: step.action,
                previous: step.previous.clone(),
                settings: step
                    .settings
                    .as_ref()
                    .map(|c| c.what.clone())
                    .unwrap_or_default(),
                outcome: Outcome::Planned,
                transfer: Transfer::default(),
            });
        }
        if self.settings.dry_run {
            return Ok(Outcome::Planned);
        }

        test_pause("before-push").await;
        self.go_on(s, "the upload")?;
        let t = self.stage(Stage::Push);
        let pushed = self.push_all(s, &plan, &facts, r).await;
        r.bytes_sent = r.services.iter().map(|sr| sr.transfer.bytes_sent).sum();
        r.bytes_saved = r.services.iter().map(|sr| sr.transfer.bytes_saved).sum();
        t.end(r, pushed.is_ok());
        pushed?;
        self.go_on(
            s,
            "the activation (the checked images stay in /var/lib/portables for the next deploy)",
        )?;

        let changes: Vec<&Step> = plan.changes().collect();
        let reverts: Vec<ops::Revert> = changes.iter().filter_map(|c| c.revert.clone()).collect();
        let armed = self.settings.rollback && !changes.is_empty();
        let arm = armed.then(|| ops::arm(&reverts, self.settings.rollback_after));
        let failure = self.activate_and_check(s, &plan, arm, r).await.err();
        match failure {
            None => self.confirm(s, &plan, &facts, armed, r).await,
            Some((e, false)) => Err(e),
            // `deploy_host` marks the changed services failed.
            Some((e, _)) if changes.is_empty() || !self.settings.rollback => Err(e),
            Some((e, _)) => {
                r.error = Some(e.to_string());
                r.culprit = e.cause.image().map(|i| basename(i).to_owned());
                test_pause("before-rollback").await;
                let t = self.stage(Stage::Rollback);
                let mut back = Ok(());
                if armed {
                    // The host's timer must not fire while attache puts the
                    // services back, yet must still cover a lost connection.
                    back = s
                        .step(
                            &ops::postpone(self.settings.rollback_after),
                            Stage::Rollback,
                        )
                        .await
                        .map(drop);
                    self.stop
                        .armed(self.host_name(), self.settings.rollback_after);
                }
                if back.is_ok() {
                    back = self.roll_back(s, &changes).await;
                }
                // Only now: a connection lost before this point is still
                // covered by the host's own revert.
                if back.is_ok() && s.run(&ops::disarm(), Stage::Rollback).await.is_ok() {
                    self.stop.disarmed(self.host_name());
                }
                t.end(r, back.is_ok());
                match back {
                    Ok(()) => {
                        r.set_changed(Outcome::RolledBack);
                        Ok(Outcome::RolledBack)
                    }
                    Err(rb) => {
                        let mut msg = rb.to_string();
                        if armed {
                            msg += &format!(
                                "; the host will try again by itself within {} s",
                                self.settings.rollback_after.as_secs()
                            );
                        }
                        r.rollback_error = Some(msg);
                        Ok(Outcome::Failed)
                    }
                }
            }
        }
    }

    /// Plans from the host's first read. Reads the host again only when
    /// it has images of the names built, whose sha256 the plan needs, or
    /// when an earlier deploy was never confirmed: that one is finished
    /// first, so the plan starts from the host's last good state.
    async fn prepare(
        &self,
        s: &HostSession,
        facts: HostFacts,
    ) -> Result<(Plan, HostFacts), HostError> {
        let hash: Vec<String> = plan::files_to_hash(self.plan)
            .into_iter()
            .filter(|f| facts.images.contains_key(f))
            .collect();
        let finish = facts.revert_pending && !self.settings.dry_run;
        let (facts, finished) = if hash.is_empty() && !finish {
            (facts, false)
        } else {
            s.facts(&hash, false, Stage::Preflight, finish).await?
        };
        if finished {
            self.note("an earlier deploy was never confirmed; its automatic rollback put back what it replaced first");
        }
        let plan = plan::plan(&facts, self.plan)
            .map_err(|e| Cause::Plan(e).at(s.host(), Stage::Preflight))?;
        Ok((plan, facts))
    }

    /// Pushes every image the plan uploads; what each took goes into its
    /// service's report (`r.services` is in the plan's order).
    async fn push_all(
        &self,
        s: &HostSession,
        plan: &Plan,
        facts: &HostFacts,
        r: &mut HostReport,
    ) -> Result<(), HostError> {
        for (i, step) in plan.steps.iter().enumerate() {
            let svc = &self.plan.services[step.service];
            if step.upload {
                self.go_on(s, "the upload")?;
                let transfer = &mut r.services[i].transfer;
                // A host with no image at all has no basis for a delta.
                let basis = !facts.images.is_empty();
                self.push(
                    s,
                    svc,
                    &step.target,
                    step.previous.as_deref(),
                    basis,
                    transfer,
                )
                .await?;
            } else if let (Some(m), false) = (&svc.manifest, facts.has_manifest(&step.target)) {
                // The image is there already, placed by an attache from
                // before manifests: record its manifest now.
                let tmp = self.push_manifest(s, m, &step.target).await?;
                r.services[i].transfer.bytes_sent += m.len() as u64;
                s.step(&ops::place_manifest(&tmp, &step.target), Stage::Push)
                    .await?;
            }
        }
        for step in &plan.steps {
            if let Some(change) = &step.settings {
                self.stage_settings(s, &self.plan.services[step.service], change)
                    .await?;
            }
        }
        Ok(())
    }

    /// Writes a service's next settings on the host, next to the live ones;
    /// each new secret travels on its own session's stdin.
    async fn stage_settings(
        &self,
        s: &HostSession,
        svc: &ServicePlan,
        change: &plan::SettingsChange,
    ) -> Result<(), HostError> {
        s.step(
            &ops::stage(&svc.name, &change.dropins, &change.keep),
            Stage::Push,
        )
        .await?;
        for &i in &change.send {
            let secret = &svc.settings.secrets[i];
            let salt = settings::new_salt();
            let mut input = ops::secret_sum(
                &salt,
                &secret.value.salted_hash(&salt),
                secret.value.bytes().len(),
                change.encrypted,
            )
            .into_bytes();
            input.extend_from_slice(secret.value.bytes());
            let script = ops::stage_secret(&svc.name, &secret.name, change.encrypted);
            let out = s
                .remote
                .run_with_input(&script.text, script.doing, &input)
                .await
                .map_err(|e| Cause::from(e).at(s.host(), Stage::Push))?;
            if !out.success() {
                return Err(Cause::Step {
                    doing: format!("storing the secret {} of {}", secret.name, svc.name),
                    output: out.tail(),
                }
                .at(s.host(), Stage::Push));
            }
        }
        Ok(())
    }

    /// Sends the image as a delta when the host has a basis for one, else
    /// whole, each in one command that receives it under a temporary name,
    /// checks its sha256 on the host, and only then renames it into place
    /// with its manifest and stores its signature.
    async fn push(
        &self,
        s: &HostSession,
        svc: &ServicePlan,
        target: &str,
        previous: Option<&str>,
        basis: bool,
        t: &mut Transfer,
    ) -> Result<(), HostError> {
        let tmp = ops::partial_path(target);
        let local = delta::Local::read(svc).await;
        // What follows the image on the command's stdin.
        let manifest = svc.manifest.clone().unwrap_or_default();
        let signature = match &local {
            Ok(l) => l.signature.to_text().into_bytes(),
            Err(_) => Vec::new(),
        };
        let (manifest_len, signature_len) = (manifest.len() as u64, signature.len() as u64);
        let then = [manifest, signature].concat();
        // The push's command, for the delta and for the whole image.
        let script = |body: &ops::Body, faults| {
            ops::push(
                body,
                &tmp,
                target,
                &svc.sha256,
                &svc.prefixes,
                manifest_len,
                signature_len,
                faults,
            )
        };
        let mut faults = ops::PushFaults {
            corrupt: test_fault("corrupt-upload"),
            stall: test_fault("stall-upload"),
            pause: None,
        };
        let prepared = match &local {
            // The stalled upload the test fault makes is the full one.
            Ok(_) if faults.stall => Err("the test fault stall-upload".to_owned()),
            Ok(_) if !basis => Err(delta::NO_BASIS.to_owned()),
            Ok(local) => delta::prepare(s, local, target, &tmp, previous).await,
            Err(why) => Err(why.clone()),
        };
        let why = match prepared {
            Err(why) => why,
            Ok(d) => {
                let file = ops::delta::delta_path(target);
                let body = ops::Body::Delta {
                    file: &file,
                    size: d.bytes,
                    basis: &d.basis,
                    check: d.check.as_deref(),
                };
                if std::env::var("ATTACHE_TEST_PAUSE").ok().as_deref() == Some("mid-delta") {
                    faults.pause = Some(test_pause_secs());
                }
                let pushed = self
                    .send(
                        s,
                        d.file.path(),
                        &then,
                        &script(&body, faults),
                        &[tmp.clone(), file.clone()],
                        target,
                        faults.pause.is_some(),
                    )
                    .await?;
                t.delta_basis = Some(d.basis.clone());
                match pushed {
                    Pushed::Placed { sent, signed } => {
                        t.bytes_sent += sent;
                        self.signed(svc, signed, t);
                        return Ok(());
                    }
                    Pushed::Corrupt(_) => {
                        t.bytes_sent += d.bytes;
                        t.delta_basis = None;
                        format!(
                            "the image rebuilt from the delta against {} did not have the built image's sha256",
                            basename(&d.basis)
                        )
                    }
                    Pushed::NoDelta(why) => {
                        t.bytes_sent += d.bytes;
                        t.delta_basis = None;
                        why
                    }
                }
            }
        };
        if previous.is_some() {
            self.note(&format!("{}: sending the whole image: {why}", svc.name));
        }
        t.full_upload_because = Some(why);
        let body = ops::Body::Whole { size: svc.size };
        let pushed = self
            .send(
                s,
                &svc.local,
                &then,
                &script(&body, faults),
                std::slice::from_ref(&tmp),
                target,
                false,
            )
            .await?;
        match pushed {
            Pushed::Placed { sent, signed } => {
                t.bytes_sent += sent;
                self.signed(svc, signed, t);
                Ok(())
            }
            Pushed::Corrupt(got) => Err(Cause::Corrupt {
                image: basename(target).to_owned(),
                got,
                want: svc.sha256.clone(),
            }
            .at(s.host(), Stage::Push)),
            Pushed::NoDelta(why) => Err(Cause::NotStored {
                image: basename(target).to_owned(),
                says: why,
            }
            .at(s.host(), Stage::Push)),
        }
    }

    /// Notes a signature that could not be stored, then counts what the
    /// push saved.
    fn signed(&self, svc: &ServicePlan, signed: Result<(), String>, t: &mut Transfer) {
        if let Err(why) = signed {
            self.note(&format!(
                "{}: the image's signature could not be stored, so its next upgrade sends it whole: {why}",
                svc.name
            ));
        }
        t.bytes_saved = svc.size.saturating_sub(t.bytes_sent);
    }

    /// Runs one push `script` fed `local` then `then`; `partials`: what an
    /// interrupted or failed push leaves, removed.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        s: &HostSession,
        local: &std::path::Path,
        then: &[u8],
        script: &ops::Script,
        partials: &[String],
        target: &str,
        pause: bool,
    ) -> Result<Pushed, HostError> {
        let total = std::fs::metadata(local).map_or(0, |m| m.len()) + then.len() as u64;
        self.ev
            .emit(self.host_name(), Event::PushStarted { bytes: total });
        let progress = |sent: u64| {
            self.ev.emit(self.host_name(), Event::PushProgress { sent });
            if pause && sent == total {
                // The host waits after receiving it, before using it.
                test_pause_said("mid-delta");
            }
        };
        let upload = s.remote.upload_then(local, then, &script.text, &progress);
        let sent = tokio::select! {
            sent = upload => sent,
            () = self.stop.after(1) => {
                // The upload is dropped, which closes its channel.
                let _ = s.run(&ops::remove(partials), Stage::Push).await;
                let before = if partials.len() == 1 {
                    "the image was in place (its partial file was removed)"
                } else {
                    "the image was in place (its partial files were removed)"
                };
                return Err(Cause::Interrupted { before }.at(s.host(), Stage::Push));
            }
        };
        let says = match sent {
            Ok(sent) => {
                return Ok(Pushed::Placed {
                    sent,
                    signed: Ok(()),
                })
            }
            Err(RemoteError::HostRefused { says, .. }) => says,
            Err(e) => {
                // Best effort: with the connection gone, the next deploy
                // clears it under the lock.
                let _ = s.run(&ops::remove(partials), Stage::Push).await;
                return Err(Cause::from(e).at(s.host(), Stage::Push));
            }
        };
        let said = |mark: &str| {
            says.lines()
                .find_map(|l| l.strip_prefix(mark))
                .map(|rest| rest.trim().to_owned())
        };
        if let Some(got) = said(ops::PUSH_CORRUPT) {
            return Ok(Pushed::Corrupt(got));
        }
        if let Some(why) = said(ops::PUSH_NO_DELTA) {
            return Ok(Pushed::NoDelta(why));
        }
        if let Some(why) = said(ops::PUSH_NO_SIGNATURE) {
            let sent = total.saturating_sub(then.len() as u64);
            return Ok(Pushed::Placed {
                sent,
                signed: Err(why),
            });
        }
        // The host refused before the rename (a full disk): nothing placed.
        let _ = s.run(&ops::remove(partials), Stage::Push).await;
        Err(Cause::NotStored {
            image: basename(target).to_owned(),
            says,
        }
        .at(s.host(), Stage::Push))
    }

    /// Uploads an image's manifest next to its partial upload; `place`
    /// moves both.
    async fn push_manifest(
        &self,
        s: &HostSession,
        manifest: &[u8],
        target: &str,
    ) -> Result<String, HostError> {
        let at = |c: Cause| c.at(s.host(), Stage::Push);
        let local_io = |source| {
            at(Cause::Remote(crate::remote::RemoteError::LocalIo {
                host: s.host().to_owned(),
                path: std::env::temp_dir().display().to_string(),
                source,
            }))
        };
        let mut local = tempfile::NamedTempFile::new().map_err(local_io)?;
        std::io::Write::write_all(&mut local, manifest).map_err(local_io)?;
        let tmp = ops::partial_path(&format!("{target}.json"));
        s.remote
            .upload(local.path(), &ops::receive(&tmp).text, &|_| {})
            .await
            .map_err(|e| at(e.into()))?;
        Ok(tmp)
    }

    /// Activates each changed service in one round-trip (the first one
    /// arming the host's revert before anything changes, when `arm`), then
    /// checks every service.
    async fn activate_and_check(
        &self,
        s: &HostSession,
        plan: &Plan,
        mut arm: Option<ops::Script>,
        r: &mut HostReport,
    ) -> Result<(), (HostError, bool)> {
        let mut samples = std::collections::BTreeMap::new();
        for step in plan.changes() {
            let t = self.stage(Stage::Activate);
            let svc = &self.plan.services[step.service];
            let mut parts: Vec<ops::Part> = Vec::new();
            let armed = arm.take().map(|a| parts.push(a.into())).is_some();
            if step.settings.is_some() {
                let restart = if step.action == Action::Restart {
                    health::units_to_check(&svc.units)
                } else {
                    Vec::new()
                };
                parts.push(ops::Part {
                    script: ops::apply(&svc.name, &restart),
                    needs: parts.len().checked_sub(1),
                });
            }
            let calls_at = parts.len();
            for call in &step.activate {
                let id = format!(
                    "{}-{}-{}",
                    svc.name,
                    call.verb.as_str(),
                    session::unix_now()
                );
                parts.push(ops::Part {
                    script: ops::portablectl(&id, call),
                    needs: parts.len().checked_sub(1),
                });
            }
            // The settle time's first sample, as soon as the units started.
            let units = health::units_to_check(&svc.units);
            if !parts.is_empty() && !units.is_empty() {
                parts.push(ops::Part {
                    script: ops::sample(&units),
                    needs: Some(parts.len() - 1),
                });
            }
            if armed {
                // Said before it is known: a connection lost half-way may
                // have left the host armed.
                self.stop
                    .armed(self.host_name(), self.settings.rollback_after);
            }
            let began = std::time::Instant::now();
            let done = self
                .activated(s, step, &parts, calls_at)
                .await
                .map(|o| o.map(|started| (started, began.elapsed())));
            if armed && done.as_ref().is_err_and(|(i, _)| *i == 0) {
                self.stop.disarmed(self.host_name());
            }
            t.end(r, done.is_ok());
            // An arm that failed changed nothing: nothing to put back.
            let sample = done.map_err(|(i, e)| (e, !(armed && i == 0)))?;
            samples.insert(step.service, sample);
        }
        test_pause("after-activate").await;
        for step in &plan.steps {
            let t = self.stage(Stage::Health);
            let h = health::health(
                s,
                &self.plan.services[step.service],
                &step.target,
                // Unchanged and running: nothing started, nothing to settle.
                (step.action != Action::Unchanged).then_some(self.settings.settle),
                samples.remove(&step.service).flatten(),
            )
            .await;
            t.end(r, h.is_ok());
            h.map_err(|e| (e, true))?;
        }
        Ok(())
    }

    /// Runs one service's activation `parts` (the portablectl calls from
    /// `calls_at`, then maybe the first sample of the settle time); on
    /// failure, which part failed and why.
    async fn activated(
        &self,
        s: &HostSession,
        step: &Step,
        parts: &[ops::Part],
        calls_at: usize,
    ) -> Result<Option<health::Started>, (usize, HostError)> {
        if parts.is_empty() {
            return Ok(None);
        }
        let outs = s
            .batch(parts, Stage::Activate)
            .await
            .map_err(|e| (usize::MAX, e))?;
        let sample_at = calls_at + step.activate.len();
        for (i, out) in outs.iter().enumerate().take(sample_at) {
            if out.success() {
                continue;
            }
            if i < calls_at {
                match s.part_ok(&parts[i], out, Stage::Activate) {
                    Err(e) => return Err((i, e)),
                    Ok(_) => continue,
                }
            }
            let call = &step.activate[i - calls_at];
            let stage = if call.verb.detaches() {
                Stage::Rollback
            } else {
                Stage::Activate
            };
            return Err((
                i,
                Cause::Portablectl {
                    verb: call.verb.as_str(),
                    image: call.image.clone(),
                    output: ops::strip_harmless(&health::tail(&out.output)),
                }
                .at(s.host(), stage),
            ));
        }
        // Without it, the health check takes its own first sample.
        Ok(outs
            .get(sample_at)
            .filter(|o| o.success())
            .and_then(|o| health::Started::parse(&o.output)))
    }

    /// Everything passed: disarm the host's revert, make sure it never ran
    /// and that nothing moved, then record what `attache rollback` goes
    /// back to and prune; one round-trip, in the stage [`Stage::Confirm`].
    async fn confirm(
        &self,
        s: &HostSession,
        plan: &Plan,
        facts: &HostFacts,
        armed: bool,
        r: &mut HostReport,
    ) -> Result<Outcome, HostError> {
        if plan.changes().next().is_none() {
            self.mark_confirmed(r);
            return Ok(Outcome::Healthy);
        }
        let t = self.stage(Stage::Confirm);
        let confirmed = self.confirm_on_host(s, plan, facts, armed, r).await;
        t.end(r, matches!(confirmed, Ok((Outcome::Healthy, true))));
        confirmed.map(|(outcome, _)| outcome)
    }

    /// [`Self::confirm`]'s round-trip: the outcome, and whether every
    /// record and prune went through (a failed one is only noted).
    async fn confirm_on_host(
        &self,
        s: &HostSession,
        plan: &Plan,
        facts: &HostFacts,
        armed: bool,
        r: &mut HostReport,
    ) -> Result<(Outcome, bool), HostError> {
        let stage = Stage::Confirm;
        // The disarm, then (only when in time) the check that nothing
        // moved, and only then, per service, its settings, its previous
        // image, then (once that is recorded) its old images.
        let mut parts = Vec::new();
        let mut gate = None;
        if armed {
            parts.push(ops::Part::from(ops::disarm()));
            let switched: Vec<(&str, &str, Vec<String>)> = plan
                .changes()
                .map(|st| {
                    let svc = &self.plan.services[st.service];
                    let units = svc.units.iter().map(|u| u.name.clone()).collect();
                    (svc.name.as_str(), st.target.as_str(), units)
                })
                .collect();
            parts.push(ops::Part {
                script: ops::still_switched(&switched),
                needs: Some(0),
            });
            gate = Some(1);
        }
        let records_at = parts.len();
        let mut of_service = Vec::new();
        for step in plan.changes() {
            let svc = &self.plan.services[step.service];
            parts.push(ops::Part {
                script: ops::record_settings(&svc.name, step.settings.is_some()),
                needs: gate,
            });
            parts.push(ops::Part {
                script: ops::record_previous(&svc.name, step.previous.as_deref()),
                needs: gate,
            });
            let doomed = plan::prune_after(facts, step, &svc.name, self.settings.keep);
            if !doomed.is_empty() {
                parts.push(ops::Part {
                    script: ops::prune(&doomed),
                    needs: Some(parts.len() - 1),
                });
            }
            of_service.push((svc.name.as_str(), parts.len()));
        }
        let outs = s.batch(&parts, stage).await?;
        if armed {
            let disarmed = match ops::disarm_outcome(&outs[0]) {
                Some(d) => d,
                None => ops::parse_disarm(s.part_ok(&parts[0], &outs[0], stage)?),
            };
            self.stop.disarmed(self.host_name());
            if let Disarmed::AlreadyReverted(_) = disarmed {
                r.set_changed(Outcome::RolledBack);
                r.error = Some(Cause::RevertedByHost.at(s.host(), stage).to_string());
                return Ok((Outcome::RolledBack, false));
            }
        }
        self.mark_confirmed(r);
        if armed && !outs[1].success() {
            return Err(self.moved(s, plan, &parts[1], &outs[1]));
        }
        let mut failed = Vec::new();
        let mut from = records_at;
        for (name, to) in of_service {
            for i in from..to {
                let Err(e) = s.part_ok(&parts[i], &outs[i], stage) else {
                    continue;
                };
                failed.push(match i - from {
                    0 => format!("recording the previous settings of {name} failed, so `attache rollback` will not find them: {e}"),
                    1 => format!("recording the previous image of {name} failed, so `attache rollback` will not find it: {e}"),
                    _ if outs[i].code.is_none() => continue,
                    _ => format!("pruning old images failed: {e}"),
                });
            }
            from = to;
        }
        for f in &failed {
            self.note(f);
        }
        Ok((Outcome::Healthy, failed.is_empty()))
    }

    /// Every service passed its checks: changed ones are healthy.
    fn mark_confirmed(&self, r: &mut HostReport) {
        for sr in &mut r.services {
            sr.outcome = if sr.action == Action::Unchanged {
                Outcome::Unchanged
            } else {
                Outcome::Healthy
            };
        }
    }

    /// The error for a failed [`ops::still_switched`]: what it found moved
    /// after the checks, when it says.
    fn moved(
        &self,
        s: &HostSession,
        plan: &Plan,
        part: &ops::Part,
        out: &ops::PartOutput,
    ) -> HostError {
        let found = ops::parse_moved(&out.output).and_then(|(service, now)| {
            let step = plan
                .changes()
                .find(|st| self.plan.services[st.service].name == service)?;
            let now = if now.is_empty() { "nothing" } else { &now };
            Some(Cause::Unhealthy {
                image: basename(&step.target).to_owned(),
                reason: format!("after the checks, {service} has {now} attached"),
            })
        });
        match found {
            Some(cause) => cause.at(s.host(), Stage::Confirm),
            None => match s.part_ok(part, out, Stage::Confirm) {
                Err(e) => e,
                Ok(_) => Cause::Step {
                    doing: part.script.doing.to_owned(),
                    output: out.output.clone(),
                }
                .at(s.host(), Stage::Confirm),
            },
        }
    }

    /// Puts every changed service back, last first, and checks each.
    async fn roll_back(&self, s: &HostSession, changes: &[&Step]) -> Result<(), HostError> {
        let facts = self.facts(s, Stage::Rollback).await?;
        let reverts: Vec<&ops::Revert> = changes.iter().filter_map(|c| c.revert.as_ref()).collect();
        let mut first_err = None;
        // Every change has a revert; both go last changed first.
        let back = changes
            .iter()
            .rev()
            .zip(plan::rollback_calls(&facts, &reverts));
        for (step, (service, calls)) in back {
            let mut done = Ok(());
            if step.settings.is_some() {
                let restart = match &step.revert {
                    Some(r) if calls.is_empty() => r.restart.clone(),
                    _ => Vec::new(),
                };
                done = s
                    .step(&ops::restore(&service, &restart), Stage::Rollback)
                    .await
                    .map(drop);
            }
            for call in &calls {
                if done.is_err() {
                    break;
                }
                done = portablectl(s, call, &service).await;
            }
            if let (Ok(()), Some(prev)) = (&done, step.previous.as_deref()) {
                let units = &self.plan.services[step.service].units;
                done = health::verify_back(s, units, prev, self.settings.settle).await;
            }
            if let Err(e) = done {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// One portablectl call, in a unit of its own on the host.
pub(crate) async fn portablectl(
    s: &HostSession,
    call: &PortableCall,
    service: &str,
) -> Result<(), HostError> {
    let id = format!("{service}-{}-{}", call.verb.as_str(), session::unix_now());
    let stage = if call.verb.detaches() {
        Stage::Rollback
    } else {
        Stage::Activate
    };
    let out = s.run(&ops::portablectl(&id, call), stage).await?;
    if out.success() {
        return Ok(());
    }
    Err(Cause::Portablectl {
        verb: call.verb.as_str(),
        image: call.image.clone(),
        output: ops::strip_harmless(&out.tail()),
    }
    .at(s.host(), stage))
}

/// A test-only hook: `ATTACHE_TEST_FAULT=NAME` makes attache meet the fault
/// `NAME`, so the e2e suite can see what the user would: `corrupt-upload`
/// (the uploaded file changes on the host before it is hashed),
/// `stall-upload` (the host stops reading after the first MiB for a minute).
fn test_fault(name: &str) -> bool {
    std::env::var("ATTACHE_TEST_FAULT").ok().as_deref() == Some(name)
}

/// How one push command ended, when the host answered.
enum Pushed {
    /// In place; with its signature stored, or why not.
    Placed {
        sent: u64,
        signed: Result<(), String>,
    },
    /// The image (whole or rebuilt) had this sha256 instead: nothing placed.
    Corrupt(String),
    /// The delta could not be used, and why: nothing placed.
    NoDelta(String),
}

/// A test-only hook: `ATTACHE_TEST_PAUSE=STEP` stops here for
/// `ATTACHE_TEST_PAUSE_SECS` (30) seconds, so the e2e suite can cut the
/// connection or reboot the host between two steps.
async fn test_pause(step: &str) {
    if std::env::var("ATTACHE_TEST_PAUSE").ok().as_deref() != Some(step) {
        return;
    }
    test_pause_said(step);
    tokio::time::sleep(Duration::from_secs(test_pause_secs())).await;
}

fn test_pause_secs() -> u64 {
    std::env::var("ATTACHE_TEST_PAUSE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

/// What the e2e suite waits for (a pause the host makes says it here).
#[allow(clippy::print_stderr)]
fn test_pause_said(step: &str) {
    eprintln!("attache-test: paused at {step}");
}
