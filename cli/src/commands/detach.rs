//! `attache detach HOST SERVICE`: stop a service and detach its image, under
//! the host's lock, touching no other service.

use serde_json::json;

use super::hosts::{self, ssh_options};
use crate::cli::HostServiceArgs;
use crate::deploy::{self, HostSession};
use crate::error::Error;
use crate::ui::Ui;

pub fn run(args: &HostServiceArgs, ui: &Ui) -> Result<(), Error> {
    let ((name, dest, elev), _) =
        hosts::resolve_one(&args.host, &args.fleet.flake, &args.nix, &args.fleet.ssh)?;
    let opts = ssh_options(&args.fleet.ssh);
    let r = hosts::runtime()?.block_on(async {
        let mut s = HostSession::connect(&name, &dest, &opts, elev).await?;
        let r = deploy::detach_service(&mut s, &args.service).await;
        s.close().await;
        r
    });
    let image = r.map_err(hosts::host_error)?;
    ui.result(
        &json!({"host": name, "service": args.service, "detached": image}),
        &format!("{name}: detached {image}"),
    );
    Ok(())
}
