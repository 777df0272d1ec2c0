//! `attache rollback HOST SERVICE`: reattach the image that was attached
//! before the last deploy, and remember the one it replaces.

use serde_json::json;

use super::hosts::{self, ssh_options};
use crate::cli::HostServiceArgs;
use crate::deploy;
use crate::error::Error;
use crate::remote::Remote;
use crate::ui::Ui;

pub fn run(args: &HostServiceArgs, ui: &Ui) -> Result<(), Error> {
    let (name, dest, elev) =
        hosts::resolve_one(&args.host, &args.flake, &args.nix.path, &args.ssh)?;
    let opts = ssh_options(&args.ssh);
    let rt = hosts::runtime()?;
    let r: Result<String, deploy::DeployError> = rt.block_on(async {
        let remote = Remote::connect(&name, &dest, &opts, elev).await?;
        let prev = deploy::read_previous(&remote, &args.service).await?;
        let current = deploy::attached_image(&remote, &args.service).await?;
        let Some(prev) = prev.filter(|p| Some(p) != current.as_ref()) else {
            return Err(deploy::DeployError::Step {
                host: name.clone(),
                doing: "rollback".into(),
                output: format!(
                    "no earlier image of {} is recorded on this host; deploy the version you want instead",
                    args.service
                ),
            });
        };
        ui.status("Rolling back", format!("{name}: {} -> {prev}", current.clone().unwrap_or_default()));
        deploy::activate(&remote, "reattach", &prev, &args.profile, &args.service).await?;
        // The image we left becomes the one to go back to.
        if current.is_some() {
            deploy::record_previous(&remote, &args.service, current.as_deref()).await;
        }
        remote.close().await;
        Ok(prev)
    });
    let prev = r.map_err(|e| Error::Remote(e.to_string()))?;
    ui.result(
        &json!({"host": name, "service": args.service, "image": prev}),
        &format!("{name}: {} now runs {prev}", args.service),
    );
    Ok(())
}
