//! `status`, `rollback` and `detach` of one service on one host (and what
//! `diff` and `logs` read there: attached manifests, journal units), on the same
//! protocol and the same rules as a deploy: services are told apart by image
//! file, changes happen under the host's lock, and a call whose unit
//! prefixes would reach another service is refused before anything changes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::error::{Cause, HostError};
use super::ops::{self, PortableCall, Verb};
use super::plan::{back_calls, refuse_collision};
use super::report::Stage;
use super::session::HostSession;
use super::{health, portablectl};
use crate::build::BuiltUnit;
use crate::names::{basename, ImageFile};

/// One attached image, as `attache status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub version: String,
    pub image: String,
    pub sha256: String,
    /// Unit -> "ACTIVE (SUB)", or "template".
    pub units: BTreeMap<String, String>,
    /// Units that are not templates, and how many of them are active.
    pub units_total: usize,
    pub units_active: usize,
    /// Restarts of its units since they were started (systemd's NRestarts).
    pub restarts: u64,
    /// When its units became active (the earliest), `YYYY-MM-DD HH:MM:SS
    /// TZ`; empty when none is.
    pub since: String,
    /// The credentials attache stored for it: never their values.
    pub secrets: Vec<SecretStatus>,
}

/// A stored secret as `status` shows it: name, size and age only.
#[derive(Debug, Clone, Serialize)]
pub struct SecretStatus {
    pub name: String,
    pub size: u64,
    pub encrypted: bool,
    pub age_secs: u64,
}

/// What is attached on the host, grouped by image.
pub async fn host_status(s: &HostSession) -> Result<Vec<ServiceStatus>, HostError> {
    let (facts, _) = s.facts(&[], true, Stage::Preflight, false).await?;
    let mut by_image: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for a in &facts.attached {
        by_image.entry(&a.image).or_default().push(&a.unit);
    }
    let real: Vec<String> = facts
        .attached
        .iter()
        .filter(|a| !a.unit.contains("@."))
        .map(|a| a.unit.clone())
        .collect();
    let states = if real.is_empty() {
        BTreeMap::new()
    } else {
        ops::parse_show(&s.step(&ops::show(&real), Stage::Health).await?.stdout)
    };
    Ok(by_image
        .into_iter()
        .map(|(image, units)| {
            let file = ImageFile::parse(image);
            let now = super::session::unix_now();
            let secrets = file
                .as_ref()
                .and_then(|f| facts.settings.get(f.name()))
                .map(|st| {
                    st.secrets
                        .iter()
                        .map(|(name, c)| SecretStatus {
                            name: name.clone(),
                            size: c.size,
                            encrypted: c.encrypted,
                            age_secs: now.saturating_sub(c.since),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let own: Vec<&ops::UnitState> = units.iter().filter_map(|u| states.get(*u)).collect();
            ServiceStatus {
                units_total: own.len(),
                units_active: own.iter().filter(|s| s.active == "active").count(),
                restarts: own
                    .iter()
                    .map(|s| s.restarts.parse::<u64>().unwrap_or(0))
                    .sum(),
                since: own
                    .iter()
                    .filter(|s| s.active == "active")
                    .map(|s| wall_time(&s.since_wall))
                    .filter(|s| !s.is_empty())
                    .min()
                    .unwrap_or_default(),
                secrets,
                name: file
                    .as_ref()
                    .map_or_else(|| basename(image).to_owned(), |f| f.name().to_owned()),
                version: file
                    .as_ref()
                    .map(|f| f.version().to_owned())
                    .unwrap_or_default(),
                image: image.to_owned(),
                sha256: facts.sha256.get(image).cloned().unwrap_or_default(),
                units: units
                    .iter()
                    .map(|u| {
                        let st = states
                            .get(*u)
                            .map(|s| format!("{} ({})", s.active, s.sub))
                            .unwrap_or_else(|| "template".into());
                        ((*u).to_owned(), st)
                    })
                    .collect(),
            }
        })
        .collect())
}

/// `Tue 2026-12-01 17:05:07 UTC` without the weekday, which sorts.
fn wall_time(systemd: &str) -> String {
    let t = systemd.trim();
    match t.split_once(' ') {
        Some((day, rest)) if day.len() == 3 && day.chars().all(|c| c.is_ascii_alphabetic()) => {
            rest.to_owned()
        }
        _ => t.to_owned(),
    }
}

/// What one service has attached on a host, and the manifest the host
/// keeps of that image (`None` for an image placed before manifests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedManifest {
    pub service: String,
    pub image: Option<String>,
    pub manifest: Option<String>,
}

/// Reads, without the host's lock (nothing changes), which image each of
/// `services` has attached and its manifest, in two round trips.
pub async fn attached_manifests(
    s: &HostSession,
    services: &[String],
) -> Result<Vec<AttachedManifest>, HostError> {
    let (facts, _) = s.facts(&[], false, Stage::Preflight, false).await?;
    let images: Vec<String> = services
        .iter()
        .filter_map(|svc| facts.attached_image(svc).map(str::to_owned))
        .collect();
    let mut texts = if images.is_empty() {
        BTreeMap::new()
    } else {
        let out = s
            .step(&ops::read_manifests(&images), Stage::Preflight)
            .await?;
        ops::parse_manifests(&out.stdout)
    };
    Ok(services
        .iter()
        .map(|svc| {
            let image = facts.attached_image(svc).map(str::to_owned);
            let manifest = image.as_ref().and_then(|i| texts.remove(i).flatten());
            AttachedManifest {
                service: svc.clone(),
                image,
                manifest,
            }
        })
        .collect())
}

/// The units whose journal `attache logs` reads on this host: `service`'s
/// (every attached service's when `None`), template instances included.
pub async fn journal_units(
    s: &HostSession,
    service: Option<&str>,
) -> Result<Vec<String>, HostError> {
    let (facts, _) = s.facts(&[], false, Stage::Preflight, false).await?;
    Ok(ops::journal_units(&facts, service))
}

/// Puts back the image attached before the last deploy of `service`, checks
/// that its units run from it, and records the one it left as the next
/// rollback's target. Returns (left, now attached).
pub async fn rollback_service(
    s: &mut HostSession,
    service: &str,
    profile: &str,
) -> Result<(Option<String>, String), HostError> {
    s.lock().await?;
    // A pending revert would undo this rollback when its timer fires.
    let (facts, _) = s.facts(&[], false, Stage::Preflight, true).await?;
    super::plan::check_profile(&facts, profile)
        .map_err(|e| Cause::Plan(e).at(s.host(), Stage::Preflight))?;
    let refused = |msg: String| Cause::Refused(msg).at(s.host(), Stage::Preflight);
    let current = facts.attached_image(service).map(str::to_owned);
    // The last deploy changed settings only (it recorded the image it
    // kept): put back the settings it replaced.
    if let Some(cur) = current.as_deref() {
        let settings_only = facts.previous.get(service).map(String::as_str) == Some(cur)
            && facts.settings.get(service).is_some_and(|st| st.previous);
        if settings_only {
            let units = attached_units(&facts.units_of(cur));
            let restart = health::units_to_check(&units);
            s.step(&ops::swap_settings(service, &restart), Stage::Rollback)
                .await?;
            health::verify_back(s, &units, cur, Duration::from_secs(3)).await?;
            return Ok((Some(cur.to_owned()), cur.to_owned()));
        }
    }
    let Some(prev) = facts
        .previous
        .get(service)
        .filter(|p| Some(*p) != current.as_ref())
        .cloned()
    else {
        return Err(refused(format!(
            "no earlier image of {service} is recorded on this host; deploy the version you want instead"
        )));
    };
    if !facts.images.contains_key(&prev) {
        return Err(refused(format!(
            "the earlier image of {service}, {prev}, is no longer on the host; deploy the version you want instead"
        )));
    }
    let before = facts.declared_prefixes(&prev);
    let calls = match &current {
        None => vec![PortableCall::new(Verb::Attach, &prev, &before, profile)],
        Some(cur) => back_calls(
            &facts,
            service,
            cur,
            &facts.declared_prefixes(cur),
            &prev,
            profile,
        )
        .map_err(|e| Cause::Plan(e).at(s.host(), Stage::Preflight))?,
    };
    // The settings go back with the image, before it starts again.
    s.step(&ops::swap_settings(service, &[]), Stage::Rollback)
        .await?;
    for c in &calls {
        if let Err(e) = portablectl(s, c, service).await {
            // The image stayed: so do its settings.
            let _ = s
                .run(&ops::swap_settings(service, &[]), Stage::Rollback)
                .await;
            return Err(e);
        }
    }
    // The units to check are the old image's: known now only if something
    // was attached before (its units), else read back after the attach.
    let after;
    let units_of = match &current {
        Some(cur) => facts.units_of(cur),
        None => {
            after = s.facts(&[], false, Stage::Rollback, false).await?.0;
            after.units_of(&prev)
        }
    };
    let units = attached_units(&units_of);
    health::verify_back(s, &units, &prev, Duration::from_secs(3)).await?;
    // The image we left becomes the one to go back to.
    if current.is_some() {
        s.step(
            &ops::record_previous(service, current.as_deref()),
            Stage::Rollback,
        )
        .await?;
    }
    Ok((current, prev))
}

/// Attached units as health reads them: each one checked, templates aside.
fn attached_units(units: &[&str]) -> Vec<BuiltUnit> {
    units
        .iter()
        .map(|u| BuiltUnit {
            name: (*u).to_owned(),
            install: true,
        })
        .collect()
}

/// Stops and detaches `service`; returns the image it had attached.
pub async fn detach_service(s: &mut HostSession, service: &str) -> Result<String, HostError> {
    s.lock().await?;
    // A pending revert would attach again what this detaches.
    let (facts, _) = s.facts(&[], false, Stage::Preflight, true).await?;
    let Some(image) = facts.attached_image(service).map(str::to_owned) else {
        return Err(
            Cause::Refused(format!("{service} is not attached on this host"))
                .at(s.host(), Stage::Preflight),
        );
    };
    let prefixes = facts.declared_prefixes(&image);
    let verb = facts.detach_verb(service);
    if verb == Verb::Detach {
        refuse_collision(&facts, service, &prefixes, "detach", || {
            format!(
                "{} was attached before attache recorded unit prefixes; deploy {service} again with this attache first, then detach it",
                basename(&image)
            )
        })
        .map_err(|e| Cause::Plan(e).at(s.host(), Stage::Preflight))?;
    }
    portablectl(s, &PortableCall::new(verb, &image, &prefixes, ""), service).await?;
    s.step(&ops::forget_settings(service), Stage::Rollback)
        .await?;
    Ok(image)
}
