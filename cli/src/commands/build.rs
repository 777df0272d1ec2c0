//! `attache build`: one image from one installable, path and sha256 printed.

use crate::build;
use crate::cli::BuildArgs;
use crate::deploy::Interrupt;
use crate::error::Error;
use crate::ui::Ui;

/// Ctrl-C lets the step at hand end (nix stops with the terminal's Ctrl-C;
/// packing removes its temporary file when it fails and renames it into
/// place when done), so that no half-written image nor GC root stays.
pub fn run(args: &BuildArgs, ui: &Ui) -> Result<(), Error> {
    let rt = super::hosts::runtime()?;
    let stop = {
        let _in_runtime = rt.enter();
        Interrupt::listen().map_err(|e| Error::io("listening for Ctrl-C", e))?
    };
    let built = build::build_image(
        &args.source.source()?,
        &args.pack.choice(),
        &args.out_dir,
        args.dry_run,
        ui,
    );
    let built = match built {
        Err(_) if stop.asked() => {
            return Err(Error::Interrupted(
                "interrupted: the build stopped and wrote no image".into(),
            ))
        }
        built => built?,
    };
    let json = serde_json::to_value(&built).unwrap_or_default();
    let human = if args.dry_run {
        String::new()
    } else {
        format!("{}\nsha256 {}", built.path.display(), built.sha256)
    };
    ui.result(&json, &human);
    Ok(())
}
