//! `attache pack-spec` (hidden): the builder of portableService's
//! `nix build`, run by Nix in its sandbox with the attache package of the
//! user's flake. It packs the spec file exactly as `attache build` does.

use crate::build;
use crate::cli::PackSpecArgs;
use crate::error::Error;
use crate::ui::Ui;

pub fn run(args: &PackSpecArgs, ui: &Ui) -> Result<(), Error> {
    let image = build::pack_spec_file(&args.spec, &args.closure, &args.out_dir, ui)?;
    ui.status(
        "Packed",
        format!("{} sha256 {}", image.path.display(), image.sha256),
    );
    Ok(())
}
