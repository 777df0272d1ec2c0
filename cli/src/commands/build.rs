//! `attache build`: one image from one installable, path and sha256 printed.

use crate::build;
use crate::cli::BuildArgs;
use crate::error::Error;
use crate::ui::Ui;

pub fn run(args: &BuildArgs, ui: &Ui) -> Result<(), Error> {
    let built = build::build_image(
        &args.source.source()?,
        &args.pack.choice(),
        &args.out_dir,
        args.dry_run,
        ui,
    )?;
    let json = serde_json::to_value(&built).unwrap_or_default();
    let human = if args.dry_run {
        String::new()
    } else {
        format!("{}\nsha256 {}", built.path.display(), built.sha256)
    };
    ui.result(&json, &human);
    Ok(())
}
