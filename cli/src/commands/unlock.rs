//! `attache unlock HOST`: end the host-side process that holds the host's
//! deploy lock for an attache that is gone, and nothing else.

use serde_json::json;

use super::hosts::{self, ssh_options};
use crate::cli::UnlockArgs;
use crate::deploy::HostSession;
use crate::error::Error;
use crate::ui::Ui;

pub fn run(args: &UnlockArgs, ui: &Ui) -> Result<(), Error> {
    let ((name, dest, elev), _) =
        hosts::resolve_one(&args.host, &args.fleet.flake, &args.nix, &args.fleet.ssh)?;
    let opts = ssh_options(&args.fleet.ssh);
    let rt = hosts::runtime()?;
    let s = rt
        .block_on(HostSession::connect(&name, &dest, &opts, elev))
        .map_err(hosts::host_error)?;
    let r = rt.block_on(unlock(&s, &name, args.yes, ui));
    rt.block_on(s.close());
    let (holder, ended) = r?;
    let human = match (&holder, ended.is_empty()) {
        (None, _) => format!("{name}: the deploy lock is free; nothing to do"),
        (Some(h), true) => format!("{name}: {h} no longer held the lock; nothing was ended"),
        (Some(h), false) => format!("{name}: ended the lock's holder ({h}); the host is free"),
    };
    ui.result(
        &json!({
            "host": name,
            "holder": holder.as_ref().map(ToString::to_string),
            "ended_pids": ended,
        }),
        &human,
    );
    Ok(())
}

/// Reads the holder, asks, ends it: the holder shown and the pids ended.
async fn unlock(
    s: &HostSession,
    name: &str,
    yes: bool,
    ui: &Ui,
) -> Result<(Option<String>, Vec<u32>), Error> {
    let holder = s.lock_holder().await.map_err(hosts::host_error)?;
    if holder.pids.is_empty() {
        return Ok((None, Vec::new()));
    }
    if !yes {
        let question = format!(
            "{name}: the deploy lock is held by {holder}. End that process on the host? A deploy still running would lose its lock."
        );
        match ui.confirm(&question) {
            Some(true) => {}
            Some(false) => return Err(Error::Usage(format!("{name}: not unlocked"))),
            None => {
                return Err(Error::Usage(format!(
                    "{name}: the deploy lock is held by {holder}; run `attache unlock {name} --yes` to end that holder (nothing was asked: this is no terminal)"
                )))
            }
        }
    }
    let mut ended = Vec::new();
    for pid in &holder.pids {
        if s.end_lock_holder(*pid).await.map_err(hosts::host_error)? {
            ended.push(*pid);
        }
    }
    Ok((Some(holder.to_string()), ended))
}
