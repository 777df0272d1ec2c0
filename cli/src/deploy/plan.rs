//! The deploy planner: from what a host has ([`HostFacts`]) and what should
//! run there, what to upload, which portablectl calls switch each service,
//! and which calls put it back. A pure function: every case `--dry-run` can
//! print, and every refusal, is unit-tested here without a host.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::ops::{self, HostFacts, PortableCall, Revert, Verb};
use super::{HostPlan, ServicePlan, Settings};
use crate::inventory::{Check, HttpUrl};
use crate::names::{basename, ImageFile};

/// What a deploy does to one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Attach,
    Reattach,
    /// Same image, other settings: reload and restart its units.
    Restart,
    Unchanged,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Attach => "attach",
            Action::Reattach => "reattach",
            Action::Restart => "restart",
            Action::Unchanged => "unchanged",
        })
    }
}

/// One service's part of a host's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Index into [`HostPlan::services`].
    pub service: usize,
    pub target: String,
    pub upload: bool,
    pub action: Action,
    /// What the service had attached before.
    pub previous: Option<String>,
    /// The calls that switch it (empty when unchanged).
    pub activate: Vec<PortableCall>,
    /// How it goes back (`None` when unchanged).
    pub revert: Option<Revert>,
    /// Said to the user before anything happens.
    pub note: Option<String>,
    /// The service's settings change with this deploy.
    pub settings: Option<SettingsChange>,
}

/// How a service's settings change on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsChange {
    /// Unit -> its whole drop-in, as it will be.
    pub dropins: BTreeMap<String, String>,
    /// Secrets to send (indexes into the service's secrets).
    pub send: Vec<usize>,
    /// Secrets that stay as the host has them.
    pub keep: Vec<String>,
    /// Credentials are encrypted with the host's key.
    pub encrypted: bool,
    /// What changes, for the user: `demo.service: changed`, `secret db: rotated`.
    pub what: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
}

/// What pruning deletes of `step`'s service (`service`) once the deploy
/// is confirmed, by `ops::prune_candidates`' rules, without reading the
/// host again: its images are the read taken under the lock (`facts`),
/// plus the image this step placed, the newest. Nothing else placed one
/// since: a push deploy, `rollback` and `detach` hold the host's lock
/// throughout, and so does the pull agent's switch (`deploy_host`, through
/// `open_host`). The agent downloads into /var/lib/portables before it
/// takes the lock, though: an image it placed meanwhile is not in this
/// list, so it is kept, never pruned.
pub fn prune_after(facts: &HostFacts, step: &Step, service: &str, keep: usize) -> Vec<String> {
    let mut images = facts.images_of(service);
    if step.upload {
        images.retain(|i| *i != step.target);
        images.insert(0, &step.target);
    }
    ops::prune_candidates(&images, keep, Some(&step.target), step.previous.as_deref())
}

impl Plan {
    pub fn changes(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| s.action != Action::Unchanged)
    }
}

/// Why a host is refused before anything on it changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("portablectl is missing; install systemd-container on the host (apt install systemd-container)")]
    NoPortablectl,
    #[error(
        "systemd {version} is too old; attache needs systemd 248 or newer (portablectl reattach)"
    )]
    OldSystemd { version: u32 },
    #[error("portabled has no profile '{profile}' on this host; nothing was changed. Pass --profile (or set `profile` in the inventory) to one of: {known}")]
    UnknownProfile { profile: String, known: String },
    #[error("not enough space in {}: {free_mb} MB free, {need_mb} MB needed; free some space (old images: attache prunes to --keep)", crate::names::PORTABLES)]
    NoSpace { free_mb: u64, need_mb: u64 },
    #[error("{service}'s check {url} needs curl on the host, which has none (attache checks plain HTTP without it, never HTTPS); nothing was changed. Install curl on the host, or check an http:// URL")]
    HttpsWithoutCurl { service: String, url: String },
    #[error("{0}'s image on this pull host is not the one its agent recorded (it switched since); nothing was changed. Run the deploy again")]
    PullSwitched(String),
    #[error("{}", .0)]
    Collision(Box<Collision>),
    #[error("this host cannot encrypt credentials ({why}), and {services} would get secrets; nothing was changed. Install systemd 250 or newer with systemd-creds, or set `unencryptedSecrets = true;` for this host in the inventory to hand them over as plain files only root can read")]
    CannotEncrypt { why: String, services: String },
    #[error("--rollback-after {after} is too short: activating and checking {what} can take up to {need} s, and the host would put back a deploy that was still being checked; nothing was changed. Pass --rollback-after {suggest} or more, or give the checks fewer retries or a shorter timeout")]
    TimerTooShort {
        after: u64,
        need: u64,
        suggest: u64,
        what: String,
    },
}

/// A unit prefix that reaches another service's unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{service}'s unit prefix '{prefix}' also matches {unit} of {other}, so portabled could not {doing} {service} without touching it; nothing was changed. {fix}")]
pub struct Collision {
    pub service: String,
    pub prefix: String,
    pub unit: String,
    pub other: String,
    pub doing: &'static str,
    pub fix: String,
}

/// What an activation may take on a slow host, per service: portablectl
/// reattach took 15 s in a TCG guest under load.
const ACTIVATION_ALLOWANCE: Duration = Duration::from_secs(30);

/// The image files whose sha256 planning needs: each service's target, and
/// the name a rebuilt version would get.
pub fn files_to_hash(host: &HostPlan) -> Vec<String> {
    host.services
        .iter()
        .flat_map(|s| {
            let f = ImageFile::new(&s.name, &s.version);
            [f.host_path(), f.with_content_tag(&s.sha256).host_path()]
        })
        .collect()
}

/// The plan for one host, or why it must be left alone.
pub fn plan(facts: &HostFacts, host: &HostPlan) -> Result<Plan, PlanError> {
    if !facts.portablectl {
        return Err(PlanError::NoPortablectl);
    }
    if facts.systemd < 248 {
        return Err(PlanError::OldSystemd {
            version: facts.systemd,
        });
    }
    check_profile(facts, &host.profile)?;
    if !facts.curl {
        if let Some((svc, url)) = host.services.iter().find_map(|s| {
            s.checks.iter().find_map(|c| match c {
                Check::Http { url, .. } if HttpUrl::parse(url).is_ok_and(|u| u.https) => {
                    Some((s.name.clone(), url.clone()))
                }
                _ => None,
            })
        }) {
            return Err(PlanError::HttpsWithoutCurl { service: svc, url });
        }
    }
    check_encryption(facts, host)?;
    let mut steps = Vec::new();
    let mut need_kb = 0u64;
    for (i, svc) in host.services.iter().enumerate() {
        let step = plan_service(facts, i, svc, &host.profile)?;
        if step.upload {
            need_kb += svc.size / 1024 + 1;
        }
        steps.push(step);
    }
    // Keep 5% and 16 MiB in reserve: a full /var breaks more than us.
    let margin_kb = need_kb / 20 + 16 * 1024;
    if need_kb > 0 && facts.free_kb < need_kb + margin_kb {
        return Err(PlanError::NoSpace {
            free_mb: facts.free_kb / 1024,
            need_mb: (need_kb + margin_kb) / 1024,
        });
    }
    Ok(Plan { steps })
}

fn plan_service(
    facts: &HostFacts,
    index: usize,
    svc: &ServicePlan,
    profile: &str,
) -> Result<Step, PlanError> {
    let attached = facts.attached_image(&svc.name).map(str::to_owned);
    let file = ImageFile::new(&svc.name, &svc.version);
    let mut target = file.host_path();
    let mut note = None;
    // Same name, other content, and attached: portabled cannot reattach the
    // same name, and overwriting an attached image is picked up silently at
    // the next restart. Give the new content its own name instead.
    if facts.sha256.get(&target).is_some_and(|s| *s != svc.sha256)
        && attached.as_deref() == Some(target.as_str())
    {
        let tagged = file.with_content_tag(&svc.sha256);
        note = Some(format!(
            "{} is attached with other content; deploying it as {} (bump the version next time)",
            file.file_name(),
            tagged.file_name()
        ));
        target = tagged.host_path();
    }
    let upload = facts.sha256.get(&target) != Some(&svc.sha256);
    let settings = plan_settings(facts, svc);
    let action = match attached.as_deref() {
        None => Action::Attach,
        Some(img) if img == target && !upload && settings.is_some() => Action::Restart,
        Some(img) if img == target && !upload => Action::Unchanged,
        Some(_) => Action::Reattach,
    };
    if svc.settings.image_as_is && matches!(action, Action::Attach | Action::Reattach) {
        return Err(PlanError::PullSwitched(svc.name.clone()));
    }
    let mut step = Step {
        service: index,
        target: target.clone(),
        upload,
        action,
        previous: attached.clone(),
        activate: Vec::new(),
        revert: None,
        note,
        settings,
    };
    if action == Action::Unchanged {
        return Ok(step);
    }
    if action == Action::Restart {
        step.revert = Some(Revert {
            service: svc.name.clone(),
            previous: attached,
            new: target,
            calls: Vec::new(),
            settings: true,
            restart: super::health::units_to_check(&svc.units),
        });
        return Ok(step);
    }
    let new = &svc.prefixes;
    refuse_collision(facts, &svc.name, new, "replace or detach", || {
        format!(
            "Rename {}'s units so that they do not start with another service's name (e.g. {}-web.service under a name no other service starts with)",
            svc.name, svc.name
        )
    })?;
    let call =
        |verb, image: &str, prefixes: &[String]| PortableCall::new(verb, image, prefixes, profile);
    // Another image's name starts with ours: portabled before 257 would
    // take it along on detach and reattach (see `Verb::Unlink`), 257 on
    // reattach. Switch by detach + attach then, detaching by hand before 257.
    let named_like = facts.others_named_like(&svc.name);
    let detach_verb = facts.detach_verb(&svc.name);
    step.activate = match &attached {
        None => vec![call(Verb::Attach, &target, new)],
        Some(prev) => {
            let before = facts.declared_prefixes(prev);
            // A reattach detaches only the old units the new prefixes match;
            // any other unit of the old image would stay behind, attached
            // from an image that is no longer the service's.
            let left_behind = facts
                .units_of(prev)
                .into_iter()
                .any(|u| !new.iter().any(|p| crate::names::unit_matches_prefix(u, p)));
            if left_behind || named_like {
                if detach_verb == Verb::Detach {
                    refuse_collision(facts, &svc.name, &before, "detach the old image of", || {
                        old_style_fix(&svc.name, prev)
                    })?;
                }
                vec![
                    call(detach_verb, prev, &before),
                    call(Verb::Attach, &target, new),
                ]
            } else {
                vec![call(Verb::Reattach, &target, new)]
            }
        }
    };
    let calls = match &attached {
        None => vec![call(detach_verb, &target, new)],
        Some(prev) => back_calls(facts, &svc.name, &target, new, prev, profile)?,
    };
    step.revert = Some(Revert {
        service: svc.name.clone(),
        previous: attached,
        new: target,
        calls,
        settings: step.settings.is_some(),
        restart: Vec::new(),
    });
    Ok(step)
}

/// Secrets go to a host that can encrypt them, or, where the inventory
/// allows it, as plain root-only files; refused before anything changes.
fn check_encryption(facts: &HostFacts, host: &HostPlan) -> Result<(), PlanError> {
    if facts.can_encrypt() {
        return Ok(());
    }
    let services: Vec<&str> = host
        .services
        .iter()
        .filter(|s| !s.settings.secrets.is_empty() && !s.settings.unencrypted)
        .map(|s| s.name.as_str())
        .collect();
    if services.is_empty() {
        return Ok(());
    }
    Err(PlanError::CannotEncrypt {
        why: if facts.systemd < 250 {
            format!("systemd {} is older than 250", facts.systemd)
        } else {
            "systemd-creds is missing".into()
        },
        services: services.join(", "),
    })
}

/// What changes in `svc`'s settings on this host, if anything. Secrets are
/// compared by a salted hash the host keeps, never by value.
pub fn plan_settings(facts: &HostFacts, svc: &ServicePlan) -> Option<SettingsChange> {
    if svc.settings.as_is {
        return None;
    }
    let empty = ops::SettingsState::default();
    let host = facts.settings.get(&svc.name).unwrap_or(&empty);
    if svc.settings.is_empty() && host.units.is_empty() && host.secrets.is_empty() {
        return None;
    }
    let encrypted = facts.can_encrypt();
    let units: Vec<String> = svc.units.iter().map(|u| u.name.clone()).collect();
    let dropins = svc.settings.dropins(&svc.name, &units, encrypted);
    let mut what = Vec::new();
    for (unit, text) in &dropins {
        let sha = hex::encode(Sha256::digest(text.as_bytes()));
        match host.units.get(unit) {
            None => what.push(format!("{unit}: new settings")),
            Some(h) if *h != sha => what.push(format!("{unit}: settings changed")),
            Some(_) => {}
        }
    }
    for unit in host.units.keys().filter(|u| !dropins.contains_key(*u)) {
        what.push(format!("{unit}: settings removed"));
    }
    let (mut send, mut keep) = (Vec::new(), Vec::new());
    for (i, s) in svc.settings.secrets.iter().enumerate() {
        match host.secrets.get(&s.name) {
            None => {
                what.push(format!("secret {}: new", s.name));
                send.push(i);
            }
            Some(h) if h.encrypted != encrypted || s.value.salted_hash(&h.salt) != h.hash => {
                what.push(format!("secret {}: rotated", s.name));
                send.push(i);
            }
            Some(_) => keep.push(s.name.clone()),
        }
    }
    for name in host.secrets.keys() {
        if !svc.settings.secrets.iter().any(|s| &s.name == name) {
            what.push(format!("secret {name}: removed"));
        }
    }
    if what.is_empty() {
        return None;
    }
    Some(SettingsChange {
        dropins,
        send,
        keep,
        encrypted,
        what,
    })
}

/// portabled skips a profile it does not know without a word, and the
/// service then runs without the sandbox the user asked for.
pub fn check_profile(facts: &HostFacts, profile: &str) -> Result<(), PlanError> {
    // A host that lists no profiles at all is not one to judge by.
    if facts.profiles.is_empty() || facts.profiles.iter().any(|p| p == profile) {
        return Ok(());
    }
    Err(PlanError::UnknownProfile {
        profile: profile.to_owned(),
        known: facts.profiles.join(", "),
    })
}

/// The calls that take `service` from the image `from` (declaring
/// `from_prefixes`) back to `to`: a reattach, or, where a reattach would
/// take another service along, a detach of `from` and an attach of `to`
/// (attach touches only the image's own units).
pub fn back_calls(
    facts: &HostFacts,
    service: &str,
    from: &str,
    from_prefixes: &[String],
    to: &str,
    profile: &str,
) -> Result<Vec<PortableCall>, PlanError> {
    let before = facts.declared_prefixes(to);
    if facts.others_matching(service, &before).is_empty() && !facts.others_named_like(service) {
        return Ok(vec![PortableCall::new(
            Verb::Reattach,
            to,
            &before,
            profile,
        )]);
    }
    let verb = facts.detach_verb(service);
    if verb == Verb::Detach {
        refuse_collision(facts, service, from_prefixes, "detach", || {
            "Detach the other service first".to_owned()
        })?;
    }
    Ok(vec![
        PortableCall::new(verb, from, from_prefixes, profile),
        PortableCall::new(Verb::Attach, to, &before, profile),
    ])
}

/// The calls that put each changed service back, given what the host has
/// attached now (after a failed step, or a host's own revert): a service
/// already on its previous image needs none. Last changed goes back first.
pub fn rollback_calls(facts: &HostFacts, reverts: &[&Revert]) -> Vec<(String, Vec<PortableCall>)> {
    reverts
        .iter()
        .rev()
        .map(|r| {
            let now = facts.attached_image(&r.service);
            let calls = match (now, &r.previous) {
                (now, prev) if now == prev.as_deref() => Vec::new(),
                // Nothing attached: the switch failed half-way. Attach the
                // old image with the call that would have ended the revert.
                (None, Some(_)) => r.attach_previous().into_iter().collect(),
                (Some(_), _) => r.calls.clone(),
                (None, None) => Vec::new(),
            };
            (r.service.clone(), calls)
        })
        .collect()
}

fn old_style_fix(service: &str, image: &str) -> String {
    format!(
        "{} was attached before attache recorded unit prefixes; detach the other service first, deploy {service}, then deploy the other service again",
        basename(image)
    )
}

/// Refuses when `prefixes` reach a unit of another service.
pub fn refuse_collision(
    facts: &HostFacts,
    service: &str,
    prefixes: &[String],
    doing: &'static str,
    fix: impl FnOnce() -> String,
) -> Result<(), PlanError> {
    let others = facts.others_matching(service, prefixes);
    let Some(hit) = others.first() else {
        return Ok(());
    };
    let prefix = prefixes
        .iter()
        .find(|p| crate::names::unit_matches_prefix(&hit.unit, p))
        .cloned()
        .unwrap_or_default();
    Err(PlanError::Collision(Box::new(Collision {
        service: service.to_owned(),
        prefix,
        unit: hit.unit.clone(),
        other: basename(&hit.image).to_owned(),
        doing,
        fix: fix(),
    })))
}

/// The dead-man timer must outlast everything between arming it and
/// confirming: a timer that fires while attache is still checking would put
/// back a deploy attache then reports healthy. Checked before any host is
/// contacted, as if every service changed (all of them are checked after
/// the switch, changed or not). Twice the settle time: a program that has
/// not started by the end of the first gets a second (`health::health`).
pub fn check_timer(host: &HostPlan, settings: &Settings) -> Result<(), PlanError> {
    if !settings.rollback || host.services.is_empty() {
        return Ok(());
    }
    let need: Duration = host
        .services
        .iter()
        .map(|s| {
            ACTIVATION_ALLOWANCE
                + 2 * settings.settle
                + s.checks.iter().map(ops::check_budget).sum()
        })
        .sum();
    if need <= settings.rollback_after {
        return Ok(());
    }
    let names: Vec<&str> = host.services.iter().map(|s| s.name.as_str()).collect();
    Err(PlanError::TimerTooShort {
        after: settings.rollback_after.as_secs(),
        need: need.as_secs(),
        suggest: need.as_secs() + 60,
        what: names.join(", "),
    })
}

#[cfg(test)]
mod tests;
