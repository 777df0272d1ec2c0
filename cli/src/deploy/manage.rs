//! `status`, `rollback` and `detach` of one service on one host, on the same
//! protocol and the same rules as a deploy: services are told apart by image
//! file, changes happen under the host's lock, and a call whose unit
//! prefixes would reach another service is refused before anything changes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::error::{Cause, HostError};
use super::ops::{self, HostFacts, PortableCall, Verb};
use super::plan::refuse_collision;
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
}

async fn facts(s: &HostSession, hash_attached: bool, stage: Stage) -> Result<HostFacts, HostError> {
    let out = s.step(&ops::facts(&[], hash_attached), stage).await?;
    Ok(ops::parse_facts(&out.stdout))
}

/// What is attached on the host, grouped by image.
pub async fn host_status(s: &HostSession) -> Result<Vec<ServiceStatus>, HostError> {
    let facts = facts(s, true, Stage::Preflight).await?;
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
            ServiceStatus {
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

/// Puts back the image attached before the last deploy of `service`, checks
/// that its units run from it, and records the one it left as the next
/// rollback's target. Returns (left, now attached).
pub async fn rollback_service(
    s: &mut HostSession,
    service: &str,
    profile: &str,
) -> Result<(Option<String>, String), HostError> {
    s.lock().await?;
    let facts = facts(s, false, Stage::Preflight).await?;
    super::plan::check_profile(&facts, profile)
        .map_err(|e| Cause::Plan(e).at(s.host(), Stage::Preflight))?;
    let refused = |msg: String| Cause::Refused(msg).at(s.host(), Stage::Preflight);
    let current = facts.attached_image(service).map(str::to_owned);
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
    let named_like = facts.others_named_like(service);
    let calls = match &current {
        None => vec![call(Verb::Attach, &prev, &before, profile)],
        // As in a deploy: a reattach would take along a sibling whose image
        // name starts with ours.
        Some(_) if facts.others_matching(service, &before).is_empty() && !named_like => {
            vec![call(Verb::Reattach, &prev, &before, profile)]
        }
        Some(cur) => {
            let now = facts.declared_prefixes(cur);
            let verb = detach_verb(&facts, service);
            if verb == Verb::Detach {
                refuse_collision(&facts, service, &now, "detach", || {
                    "Detach the other service first".to_owned()
                })
                .map_err(|e| Cause::Plan(e).at(s.host(), Stage::Preflight))?;
            }
            vec![
                call(verb, cur, &now, profile),
                call(Verb::Attach, &prev, &before, profile),
            ]
        }
    };
    for c in &calls {
        portablectl(s, c, service).await?;
    }
    let units: Vec<BuiltUnit> = facts
        .units_of(current.as_deref().unwrap_or(&prev))
        .into_iter()
        .map(|u| BuiltUnit {
            name: u.to_owned(),
            install: true,
        })
        .collect();
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

/// Stops and detaches `service`; returns the image it had attached.
pub async fn detach_service(s: &mut HostSession, service: &str) -> Result<String, HostError> {
    s.lock().await?;
    let facts = facts(s, false, Stage::Preflight).await?;
    let Some(image) = facts.attached_image(service).map(str::to_owned) else {
        return Err(
            Cause::Refused(format!("{service} is not attached on this host"))
                .at(s.host(), Stage::Preflight),
        );
    };
    let prefixes = facts.declared_prefixes(&image);
    let verb = detach_verb(&facts, service);
    if verb == Verb::Detach {
        refuse_collision(&facts, service, &prefixes, "detach", || {
            format!(
                "{} was attached before attache recorded unit prefixes; deploy {service} again with this attache first, then detach it",
                basename(&image)
            )
        })
        .map_err(|e| Cause::Plan(e).at(s.host(), Stage::Preflight))?;
    }
    portablectl(s, &call(verb, &image, &prefixes, ""), service).await?;
    Ok(image)
}

/// portabled before 257 detaches along every image whose name starts with
/// the service's: there, detach by hand.
fn detach_verb(facts: &HostFacts, service: &str) -> Verb {
    if facts.systemd < 257 && facts.others_named_like(service) {
        Verb::Unlink
    } else {
        Verb::Detach
    }
}

fn call(verb: Verb, image: &str, prefixes: &[String], profile: &str) -> PortableCall {
    PortableCall {
        verb,
        image: image.to_owned(),
        prefixes: prefixes.to_vec(),
        profile: (!verb.detaches()).then(|| profile.to_owned()),
    }
}
