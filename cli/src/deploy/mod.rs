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

/// Runs the whole pipeline on one host. Never panics; always returns a
/// report saying where the host ended.
pub async fn deploy_host<E: Events>(
    plan: HostPlan,
    settings: Arc<Settings>,
    ev: E,
    stop: Interrupt,
) -> HostReport {
    let mut r = HostReport::new(&plan.name);
    if stop.asked() {
        return HostReport::skipped(&plan.name, "interrupted before it started");
    }
    let run = Run {
        plan: &plan,
        settings: &settings,
        ev: &ev,
        stop: &stop,
        trips: OnceLock::new(),
    };
    let result = run.host(&mut r).await;
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

    async fn host(&self, r: &mut HostReport) -> Result<Outcome, HostError> {
        let p = self.plan;
        let t = self.stage(Stage::Connect);
        let s = if p.local {
            Ok(HostSession::local(&p.name))
        } else {
            HostSession::connect(&p.name, &p.destination, &self.settings.ssh, p.elevation).await
        };
        if let Ok(s) = &s {
            let _ = self.trips.set(s.remote.trips());
        }
        t.end(r, s.is_ok());
        let mut s = s?;
        // A dry run only reads, and must leave the host as it was: taking
        // the lock would create its file.
        if !self.settings.dry_run {
            let t = self.stage(Stage::Lock);
            let locked = s.lock().await;
            t.end(r, locked.is_ok());
            locked?;
        }
        let result = self.locked(&s, r).await;
        s.close().await;
        result
    }

    /// Reads the host. Only planning needs the images hashed; every later
    /// read only asks what is attached and which files are there.
    async fn facts(&self, s: &HostSession, stage: Stage) -> Result<HostFacts, HostError> {
        Ok(s.facts(&[], false, stage, false).await?.0)
    }

    async fn locked(&self, s: &HostSession, r: &mut HostReport) -> Result<Outcome, HostError> {
        let t = self.stage(Stage::Preflight);
        let prepared = self.prepare(s).await;
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
            None => self.confirm(s, &plan, armed, r).await,
            Some((e, false)) => Err(e),
            // `deploy_host` marks the changed services failed.
            Some((e, _)) if changes.is_empty() || !self.settings.rollback => Err(e),
            Some((e, _)) => {
                r.error = Some(e.to_string());
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
                t.end(r, back.is_ok());
                match back {
                    Ok(()) => {
                        // Only now: a connection lost before this point is
                        // still covered by the host's own revert.
                        if s.run(&ops::disarm(), Stage::Rollback).await.is_ok() {
                            self.stop.disarmed(self.host_name());
                        }
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

    /// Reads the host and plans; finishes first an earlier deploy that was
    /// never confirmed, so the plan starts from the host's last good state.
    async fn prepare(&self, s: &HostSession) -> Result<(Plan, HostFacts), HostError> {
        let hash = plan::files_to_hash(self.plan);
        let finish = !self.settings.dry_run;
        let (facts, finished) = s.facts(&hash, false, Stage::Preflight, finish).await?;
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
                self.push(s, svc, &step.target, step.previous.as_deref(), transfer)
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
    /// whole, under a temporary name; checks its sha256 on the host, then
    /// renames it into place.
    async fn push(
        &self,
        s: &HostSession,
        svc: &ServicePlan,
        target: &str,
        previous: Option<&str>,
        t: &mut Transfer,
    ) -> Result<(), HostError> {
        let tmp = ops::partial_path(target);
        let image = basename(target).to_owned();
        let local = delta::Local::read(svc).await;
        let sent = match &local {
            // The stalled upload the test fault makes is the full one.
            Ok(_) if test_fault("stall-upload") => Err("the test fault stall-upload".to_owned()),
            Ok(local) => {
                let send = delta::send(s, self.ev, local, target, &tmp, previous);
                tokio::select! {
                    sent = send => sent,
                    () = self.stop.after(1) => {
                        let parts = [tmp, ops::delta::delta_path(target)];
                        let _ = s.run(&ops::remove(&parts), Stage::Push).await;
                        return Err(Cause::Interrupted { before: "the image was in place (its partial files were removed)" }
                            .at(s.host(), Stage::Push));
                    }
                }
            }
            Err(why) => Err(why.clone()),
        };
        let mut delivered = match sent {
            Ok(d) => {
                t.bytes_sent += d.bytes;
                t.delta_basis = Some(d.basis);
                if test_fault("corrupt-upload") {
                    s.step(&ops::corrupt(&tmp), Stage::Push).await?;
                }
                self.host_sha256(s, &tmp).await? == svc.sha256
            }
            Err(why) => {
                t.full_upload_because = Some(why);
                false
            }
        };
        let failed_delta = if delivered {
            None
        } else {
            t.delta_basis.take()
        };
        if let Some(basis) = failed_delta {
            let _ = s
                .run(&ops::remove(std::slice::from_ref(&tmp)), Stage::Push)
                .await;
            t.full_upload_because = Some(format!(
                "the image rebuilt from the delta against {} did not have the built image's sha256",
                basename(&basis)
            ));
        }
        if let (Some(why), true) = (&t.full_upload_because, previous.is_some()) {
            self.note(&format!("{}: sending the whole image: {why}", svc.name));
        }
        let mut got = String::new();
        if !delivered {
            t.bytes_sent += self.upload(s, svc, &tmp, &image).await?;
            got = self.host_sha256(s, &tmp).await?;
            delivered = got == svc.sha256;
        }
        if !delivered {
            let _ = s.run(&ops::remove(&[tmp]), Stage::Push).await;
            return Err(Cause::Corrupt {
                image,
                got,
                want: svc.sha256.clone(),
            }
            .at(s.host(), Stage::Push));
        }
        let Some(m) = &svc.manifest else {
            s.step(&ops::place(&tmp, target, &svc.prefixes, None), Stage::Push)
                .await?;
            self.sign(s, svc, &local, target, t).await;
            return Ok(());
        };
        // The manifest rides on the stdin of the command that places both.
        t.bytes_sent += m.len() as u64;
        let mtmp = ops::partial_path(&format!("{target}.json"));
        let place = ops::receive_then(&mtmp, &ops::place(&tmp, target, &svc.prefixes, Some(&mtmp)));
        let out = s
            .remote
            .run_with_input(&place.text, place.doing, m)
            .await
            .map_err(|e| Cause::from(e).at(s.host(), Stage::Push))?;
        if !out.success() {
            return Err(Cause::Step {
                doing: place.doing.to_owned(),
                output: out.tail(),
            }
            .at(s.host(), Stage::Push));
        }
        self.sign(s, svc, &local, target, t).await;
        Ok(())
    }

    /// Stores the placed image's signature, the basis of its next delta:
    /// only once the image is in place, so that a signature always
    /// describes the bytes at its name. Then counts what the push saved.
    async fn sign(
        &self,
        s: &HostSession,
        svc: &ServicePlan,
        local: &Result<delta::Local, String>,
        target: &str,
        t: &mut Transfer,
    ) {
        if let Ok(local) = local {
            match delta::store_signature(s, local, target).await {
                Ok(n) => t.bytes_sent += n,
                Err(why) => self.note(&format!(
                    "{}: the image's signature could not be stored, so its next upgrade sends it whole: {why}",
                    svc.name
                )),
            }
        }
        t.bytes_saved = svc.size.saturating_sub(t.bytes_sent);
    }

    /// The sha256 of `path` on the host (empty when there is no such file).
    async fn host_sha256(&self, s: &HostSession, path: &str) -> Result<String, HostError> {
        let out = s.step(&ops::sha256(path), Stage::Push).await?;
        Ok(ops::parse_sha256(&out.stdout).unwrap_or_default())
    }

    /// Uploads the whole image to `tmp`; returns the bytes sent.
    async fn upload(
        &self,
        s: &HostSession,
        svc: &ServicePlan,
        tmp: &str,
        image: &str,
    ) -> Result<u64, HostError> {
        self.ev
            .emit(self.host_name(), Event::PushStarted { bytes: svc.size });
        let progress = |sent: u64| self.ev.emit(self.host_name(), Event::PushProgress { sent });
        let receive = if test_fault("stall-upload") {
            ops::receive_stalled(tmp)
        } else {
            ops::receive(tmp)
        };
        let upload = s.remote.upload(&svc.local, &receive.text, &progress);
        let tmp = tmp.to_owned();
        let sent = tokio::select! {
            sent = upload => sent,
            () = self.stop.after(1) => {
                // The upload is dropped, which closes its channel.
                let _ = s.run(&ops::remove(&[tmp]), Stage::Push).await;
                return Err(Cause::Interrupted { before: "the image was in place (its partial file was removed)" }
                    .at(s.host(), Stage::Push));
            }
        };
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) => {
                // Best effort: with the connection gone, the next deploy
                // clears it under the lock.
                let removed = s.run(&ops::remove(&[tmp]), Stage::Push).await;
                let cause = match e {
                    RemoteError::HostRefused { says, .. } if removed.is_ok() => Cause::NotStored {
                        image: image.to_owned(),
                        says,
                    },
                    e => Cause::from(e),
                };
                return Err(cause.at(s.host(), Stage::Push));
            }
        };
        if test_fault("corrupt-upload") {
            s.step(&ops::corrupt(&tmp), Stage::Push).await?;
        }
        Ok(sent)
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
            if armed {
                // Said before it is known: a connection lost half-way may
                // have left the host armed.
                self.stop
                    .armed(self.host_name(), self.settings.rollback_after);
            }
            let done = self.activated(s, step, &parts, calls_at).await;
            if armed && done.as_ref().is_err_and(|(i, _)| *i == 0) {
                self.stop.disarmed(self.host_name());
            }
            t.end(r, done.is_ok());
            // An arm that failed changed nothing: nothing to put back.
            done.map_err(|(i, e)| (e, !(armed && i == 0)))?;
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
            )
            .await;
            t.end(r, h.is_ok());
            h.map_err(|e| (e, true))?;
        }
        Ok(())
    }

    /// Runs one service's activation `parts` (the portablectl calls from
    /// `calls_at`); on failure, which part failed and why.
    async fn activated(
        &self,
        s: &HostSession,
        step: &Step,
        parts: &[ops::Part],
        calls_at: usize,
    ) -> Result<(), (usize, HostError)> {
        if parts.is_empty() {
            return Ok(());
        }
        let outs = s
            .batch(parts, Stage::Activate)
            .await
            .map_err(|e| (usize::MAX, e))?;
        for (i, out) in outs.iter().enumerate() {
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
        Ok(())
    }

    /// Everything passed: disarm the host's revert, make sure it never ran,
    /// then record what `attache rollback` goes back to and prune.
    async fn confirm(
        &self,
        s: &HostSession,
        plan: &Plan,
        armed: bool,
        r: &mut HostReport,
    ) -> Result<Outcome, HostError> {
        if plan.changes().next().is_none() {
            self.mark_confirmed(r);
            return Ok(Outcome::Healthy);
        }
        // One round-trip disarms, then reads what both the last check and
        // the pruning need.
        let units: Vec<String> = plan
            .changes()
            .flat_map(|st| health::units_to_check(&self.plan.services[st.service].units))
            .collect();
        let mut parts = Vec::new();
        if armed {
            parts.push(ops::Part::from(ops::disarm()));
        }
        let needs = armed.then_some(0);
        let facts_at = parts.len();
        parts.push(ops::Part {
            script: ops::facts(&[], false),
            needs,
        });
        let show_at = (armed && !units.is_empty()).then(|| {
            parts.push(ops::Part {
                script: ops::show(&units),
                needs,
            });
            parts.len() - 1
        });
        let outs = s.batch(&parts, Stage::Health).await?;
        if armed {
            let out = s.part_ok(&parts[0], &outs[0], Stage::Health)?;
            self.stop.disarmed(self.host_name());
            if let Disarmed::AlreadyReverted(_) = ops::parse_disarm(out) {
                r.set_changed(Outcome::RolledBack);
                r.error = Some(
                    Cause::RevertedByHost
                        .at(s.host(), Stage::Health)
                        .to_string(),
                );
                return Ok(Outcome::RolledBack);
            }
        }
        self.mark_confirmed(r);
        let facts =
            ops::parse_facts(s.part_ok(&parts[facts_at], &outs[facts_at], Stage::Health)?);
        if let Some(i) = show_at {
            let running = ops::parse_show(s.part_ok(&parts[i], &outs[i], Stage::Health)?);
            self.still_switched(s, plan, &facts, &running)?;
        }
        let t = self.stage(Stage::Prune);
        // Per service: its settings, its previous image, then (only once
        // that is recorded) its old images; all in one round-trip.
        let mut parts = Vec::new();
        let mut of_service = Vec::new();
        for step in plan.changes() {
            let svc = &self.plan.services[step.service];
            parts.push(ops::Part::from(ops::record_settings(
                &svc.name,
                step.settings.is_some(),
            )));
            parts.push(ops::Part::from(ops::record_previous(
                &svc.name,
                step.previous.as_deref(),
            )));
            let doomed = ops::prune_candidates(
                &facts.images_of(&svc.name),
                self.settings.keep,
                Some(&step.target),
                step.previous.as_deref(),
            );
            if !doomed.is_empty() {
                parts.push(ops::Part {
                    script: ops::prune(&doomed),
                    needs: Some(parts.len() - 1),
                });
            }
            of_service.push((svc.name.as_str(), parts.len()));
        }
        let mut failed = Vec::new();
        match s.batch(&parts, Stage::Prune).await {
            Err(e) => failed.push(format!(
                "recording the previous images and settings failed, so `attache rollback` may not find them: {e}"
            )),
            Ok(outs) => {
                let mut from = 0;
                for (name, to) in of_service {
                    for i in from..to {
                        let Err(e) = s.part_ok(&parts[i], &outs[i], Stage::Prune) else {
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
            }
        }
        t.end(r, failed.is_empty());
        for f in failed {
            self.note(&f);
        }
        Ok(Outcome::Healthy)
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

    /// After disarming: nothing moved since the checks. The drop-ins name
    /// the new images and the changed services' units run from them.
    fn still_switched(
        &self,
        s: &HostSession,
        plan: &Plan,
        facts: &HostFacts,
        running: &std::collections::BTreeMap<String, ops::UnitState>,
    ) -> Result<(), HostError> {
        for step in plan.changes() {
            let svc = &self.plan.services[step.service];
            let now = facts.attached_image(&svc.name);
            let elsewhere = health::units_to_check(&svc.units)
                .into_iter()
                .find_map(|u| {
                    let st = running.get(&u)?;
                    (!st.root_image.is_empty() && st.root_image != step.target)
                        .then(|| format!("after the checks, {u} runs {}", st.root_image))
                });
            let reason = match (now, elsewhere) {
                (Some(n), None) if n == step.target => continue,
                (Some(_), Some(reason)) => reason,
                (now, _) => format!(
                    "after the checks, {} has {} attached",
                    svc.name,
                    now.unwrap_or("nothing")
                ),
            };
            return Err(Cause::Unhealthy {
                image: basename(&step.target).to_owned(),
                reason,
            }
            .at(s.host(), Stage::Health));
        }
        Ok(())
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

/// A test-only hook: `ATTACHE_TEST_PAUSE=STEP` stops here for
/// `ATTACHE_TEST_PAUSE_SECS` (30) seconds, so the e2e suite can cut the
/// connection or reboot the host between two steps.
#[allow(clippy::print_stderr)]
async fn test_pause(step: &str) {
    if std::env::var("ATTACHE_TEST_PAUSE").ok().as_deref() != Some(step) {
        return;
    }
    let secs = std::env::var("ATTACHE_TEST_PAUSE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    eprintln!("attache-test: paused at {step}");
    tokio::time::sleep(Duration::from_secs(secs)).await;
}
