//! What the host commands share: which hosts the command line names, how to
//! reach them, and one bounded runner for "do this on many hosts".

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::cli::{NixArgs, SshArgs};
use crate::error::Error;
use crate::inventory;
use crate::nix::NixError;
use crate::remote::{Destination, Elevation, SshOptions};

pub fn ssh_options(a: &SshArgs) -> SshOptions {
    SshOptions {
        config_file: a.ssh_config.clone(),
        accept_new_host_keys: a.accept_new_host_keys,
    }
}

pub fn elevation(sudo: bool) -> Elevation {
    if sudo {
        Elevation::Sudo
    } else {
        Elevation::None
    }
}

/// Two workers: the work is waiting on SSH, and the machine may be small.
pub fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))
}

/// A host named on the command line, resolved.
pub type Target = (String, Destination, Elevation);

/// Hosts named on the command line: inventory names and @tags when the
/// flake has an inventory, else SSH destinations.
pub fn resolve(
    names: &[String],
    flake: &str,
    nix: &NixArgs,
    ssh: &SshArgs,
) -> Result<Vec<Target>, Error> {
    Ok(resolve_with_profiles(names, flake, nix, ssh)?
        .into_iter()
        .map(|(t, _)| t)
        .collect())
}

/// The one host `rollback` and `detach` act on, with its inventory profile.
pub fn resolve_one(
    host: &str,
    flake: &str,
    nix: &NixArgs,
    ssh: &SshArgs,
) -> Result<(Target, Option<String>), Error> {
    resolve_with_profiles(&[host.to_owned()], flake, nix, ssh)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Usage(format!("unknown host {host}")))
}

/// A local flake directory without a flake.nix has no inventory: names are
/// SSH destinations, and nothing needs evaluating.
fn no_flake_here(flake: &str) -> bool {
    let local = !flake.contains(':') || flake.starts_with("path:");
    let dir = flake.strip_prefix("path:").unwrap_or(flake);
    local && !Path::new(dir).join("flake.nix").exists()
}

fn resolve_with_profiles(
    names: &[String],
    flake: &str,
    nix: &NixArgs,
    ssh: &SshArgs,
) -> Result<Vec<(Target, Option<String>)>, Error> {
    // `user@host` is never an inventory name: no need to evaluate the flake.
    let all_ssh = !names.is_empty() && names.iter().all(|n| n.contains('@') && !n.starts_with('@'));
    let nix = nix.nix();
    let inv = if all_ssh || no_flake_here(flake) {
        None
    } else {
        match inventory::load(&nix, flake) {
            Ok(hosts) => Some(hosts),
            // Only a flake without `attache.hosts` makes names plain SSH
            // destinations; a flake that fails to evaluate is the user's to
            // see.
            Err(inventory::InventoryError::Nix(NixError::MissingAttribute {
                nix_says, ..
            })) if nix_says.contains("does not provide attribute") => None,
            Err(inventory::InventoryError::Nix(n)) => {
                let msg = format!(
                    "{flake} could not be evaluated to read its attache.hosts inventory; fix it, pass --flake with the flake that has the inventory, or name hosts as USER@HOST to skip it. {n}"
                );
                // The flake's fault is bad input; a network or nix failure
                // is the environment's.
                return Err(if n.is_user_error() {
                    Error::Usage(msg)
                } else {
                    Error::Remote(msg)
                });
            }
            Err(other) => return Err(Error::Usage(other.to_string())),
        }
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
                    .map(|h| {
                        let e = elevation(h.sudo || ssh.sudo);
                        ((h.name, h.destination, e), Some(h.profile))
                    })
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
            Ok(((n.clone(), d, elevation(ssh.sudo)), None))
        })
        .collect()
}

/// A host command's error as the command ends with it: a refusal is bad
/// input, anything else the environment's.
pub fn host_error(e: crate::deploy::HostError) -> Error {
    if e.is_user_error() {
        Error::Usage(e.to_string())
    } else {
        Error::Remote(e.to_string())
    }
}

/// How many hosts at once, and when to stop starting new ones.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Hosts worked on at once (at least one).
    pub jobs: usize,
    /// Hosts done first; the rest start only if all of these end well.
    pub canary: usize,
    /// Without it, a host that ends badly stops hosts not yet started.
    pub keep_going: bool,
}

impl Policy {
    /// Every host at once, none stopping the others.
    pub fn all_at_once(hosts: usize) -> Self {
        Policy {
            jobs: hosts.max(1),
            canary: 0,
            keep_going: true,
        }
    }
}

/// What became of one host.
#[derive(Debug)]
pub enum Ran<R> {
    Done(R),
    /// Not run, and why, in words for the report.
    Skipped(&'static str),
}

/// Runs `work` on every host under `policy`: canary hosts first, then the
/// rest, `jobs` at a time. `ends_well` says whether a result lets the run go
/// on. Results come back in the order of `hosts`.
pub async fn on_hosts<H, R, Fut>(
    hosts: Vec<H>,
    policy: Policy,
    ends_well: fn(&R) -> bool,
    work: impl Fn(H) -> Fut,
) -> Vec<Ran<R>>
where
    R: Send + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let split = policy.canary.min(hosts.len());
    let mut rest = hosts;
    let first: Vec<H> = rest.drain(..split).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut ran = batch(first, policy, ends_well, &work, &stop).await;
    let canary_failed = ran.iter().any(|r| match r {
        Ran::Done(r) => !ends_well(r),
        Ran::Skipped(_) => true,
    });
    if canary_failed {
        ran.extend(rest.iter().map(|_| Ran::Skipped("a canary host failed")));
    } else {
        ran.extend(batch(rest, policy, ends_well, &work, &stop).await);
    }
    ran
}

async fn batch<H, R, Fut>(
    hosts: Vec<H>,
    policy: Policy,
    ends_well: fn(&R) -> bool,
    work: &impl Fn(H) -> Fut,
    stop: &Arc<AtomicBool>,
) -> Vec<Ran<R>>
where
    R: Send + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(policy.jobs.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let count = hosts.len();
    for (i, host) in hosts.into_iter().enumerate() {
        // A future does nothing until polled: the work starts with the permit.
        let fut = work(host);
        let sem = sem.clone();
        let stop = stop.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            if stop.load(Ordering::SeqCst) {
                return (
                    i,
                    Ran::Skipped("stopped after another host failed (use --keep-going)"),
                );
            }
            let r = fut.await;
            if !ends_well(&r) && !policy.keep_going {
                stop.store(true, Ordering::SeqCst);
            }
            (i, Ran::Done(r))
        });
    }
    let mut slots: Vec<Option<Ran<R>>> = (0..count).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, r)) = joined {
            slots[i] = Some(r);
        }
    }
    slots
        .into_iter()
        .map(|s| s.unwrap_or(Ran::Skipped("the host's task died")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(hosts: Vec<u32>, policy: Policy) -> Vec<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(on_hosts(
            hosts,
            policy,
            |ok: &bool| *ok,
            |h| async move { h != 2 },
        ))
        .into_iter()
        .map(|r| match r {
            Ran::Done(ok) => ok.to_string(),
            Ran::Skipped(why) => why.to_owned(),
        })
        .collect()
    }

    #[test]
    fn results_keep_the_input_order() {
        let p = Policy::all_at_once(4);
        assert_eq!(run(vec![1, 2, 3, 4], p), ["true", "false", "true", "true"]);
    }

    #[test]
    fn a_failure_stops_hosts_not_yet_started() {
        let p = Policy {
            jobs: 1,
            canary: 0,
            keep_going: false,
        };
        let r = run(vec![1, 2, 3], p);
        assert_eq!(r[..2], ["true", "false"]);
        assert!(
            r[2].starts_with("stopped after another host failed"),
            "{r:?}"
        );
    }

    #[test]
    fn a_failed_canary_skips_the_rest() {
        let p = Policy {
            jobs: 4,
            canary: 2,
            keep_going: true,
        };
        let r = run(vec![1, 2, 3, 4], p);
        assert_eq!(
            r,
            [
                "true",
                "false",
                "a canary host failed",
                "a canary host failed"
            ]
        );
        let r = run(vec![1, 3, 2], p);
        assert_eq!(r, ["true", "true", "false"]);
    }
}
