//! `attache rollback HOST SERVICE`: put back the image that was attached
//! before the last deploy, under the host's lock, and remember the one it
//! replaces.

use serde_json::json;

use super::hosts::{self, ssh_options};
use crate::cli::HostServiceArgs;
use crate::deploy::{self, HostSession};
use crate::error::Error;
use crate::ui::Ui;

pub fn run(args: &HostServiceArgs, ui: &Ui) -> Result<(), Error> {
    let ((name, dest, elev), inventory_profile) =
        hosts::resolve_one(&args.host, &args.fleet.flake, &args.nix, &args.fleet.ssh)?;
    let profile = args
        .profile
        .clone()
        .or(inventory_profile)
        .unwrap_or_else(|| "default".into());
    let opts = ssh_options(&args.fleet.ssh);
    let r = hosts::runtime()?.block_on(async {
        let mut s = HostSession::connect(&name, &dest, &opts, elev).await?;
        let r = deploy::rollback_service(&mut s, &args.service, &profile).await;
        s.close().await;
        r
    });
    let (left, prev) = r.map_err(hosts::host_error)?;
    ui.status(
        "Rolled back",
        format!("{name}: {} -> {prev}", left.unwrap_or_default()),
    );
    ui.result(
        &json!({"host": name, "service": args.service, "image": prev}),
        &format!("{name}: {} now runs {prev}", args.service),
    );
    Ok(())
}
