//! `attache rollback HOST SERVICE`: reattach the image that was attached
//! before the last deploy, and remember the one it replaces.

use serde_json::json;

use super::hosts;
use crate::cli::HostServiceArgs;
use crate::deploy;
use crate::error::Error;
use crate::ui::Ui;

pub fn run(args: &HostServiceArgs, ui: &Ui) -> Result<(), Error> {
    let (name, prev) = hosts::on_one_host(args, async |remote, name| {
        let prev = deploy::read_previous(remote, &args.service).await?;
        let current = deploy::attached_image(remote, &args.service).await?;
        let Some(prev) = prev.filter(|p| Some(p) != current.as_ref()) else {
            return Err(deploy::DeployError::Step {
                host: name.to_owned(),
                doing: "rollback".into(),
                output: format!(
                    "no earlier image of {} is recorded on this host; deploy the version you want instead",
                    args.service
                ),
            });
        };
        ui.status(
            "Rolling back",
            format!("{name}: {} -> {prev}", current.clone().unwrap_or_default()),
        );
        deploy::activate(remote, "reattach", &prev, &args.profile, &args.service).await?;
        // The image we left becomes the one to go back to.
        if current.is_some() {
            deploy::record_previous(remote, &args.service, current.as_deref()).await;
        }
        Ok(prev)
    })?;
    ui.result(
        &json!({"host": name, "service": args.service, "image": prev}),
        &format!("{name}: {} now runs {prev}", args.service),
    );
    Ok(())
}
