//! `attache detach HOST SERVICE`: stop a service and detach its image.

use serde_json::json;

use super::hosts;
use crate::cli::HostServiceArgs;
use crate::deploy;
use crate::error::Error;
use crate::ui::Ui;

pub fn run(args: &HostServiceArgs, ui: &Ui) -> Result<(), Error> {
    let (name, image) = hosts::on_one_host(args, async |remote, name| {
        let Some(image) = deploy::attached_image(remote, &args.service).await? else {
            return Err(deploy::DeployError::Step {
                host: name.to_owned(),
                doing: "detach".into(),
                output: format!("{} is not attached on this host", args.service),
            });
        };
        ui.status("Detaching", format!("{name}: {image}"));
        deploy::detach(remote, &args.service, &image).await?;
        Ok(image)
    })?;
    ui.result(
        &json!({"host": name, "service": args.service, "detached": image}),
        &format!("{name}: detached {image}"),
    );
    Ok(())
}
