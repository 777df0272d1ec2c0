//! `attache detach HOST SERVICE`: stop a service and detach its image.

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
        let Some(image) = deploy::attached_image(&remote, &args.service).await? else {
            return Err(deploy::DeployError::Step {
                host: name.clone(),
                doing: "detach".into(),
                output: format!("{} is not attached on this host", args.service),
            });
        };
        ui.status("Detaching", format!("{name}: {image}"));
        deploy::detach(&remote, &args.service, &image).await?;
        remote.close().await;
        Ok(image)
    });
    let image = r.map_err(|e| Error::Remote(e.to_string()))?;
    ui.result(
        &json!({"host": name, "service": args.service, "detached": image}),
        &format!("{name}: detached {image}"),
    );
    Ok(())
}
