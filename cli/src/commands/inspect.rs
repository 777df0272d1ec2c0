//! `attache inspect IMAGE`: what is inside an image, read offline (the
//! reading itself is `image::inspect`).

use serde_json::json;

use crate::cli::InspectArgs;
use crate::error::Error;
use crate::image;
use crate::ui::{self, Ui};

pub fn run(args: &InspectArgs, ui: &Ui) -> Result<(), Error> {
    let i = image::inspect(&args.image)?;
    let units: Vec<_> = i
        .units
        .iter()
        .map(|u| json!({ "name": u.name, "exec_start": u.exec_start }))
        .collect();
    let value = json!({
        "path": args.image,
        "name": i.name,
        "version": i.version,
        "os_release": i.os_release,
        "units": units,
        "store_paths": i.store_paths,
        "size": i.size,
        "compression": i.compression,
        "block_size": i.block_size,
        "sha256": i.sha256,
        "problems": i.problems,
        "portable": i.problems.is_empty(),
    });
    ui.result(&value, &ui::inspection(&args.image, &i));
    if i.problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Refused(i.problems))
    }
}
