//! `attache inspect IMAGE`: what is inside an image, read offline (the
//! reading itself is `image::inspect`).

use serde_json::json;

use crate::cli::InspectArgs;
use crate::error::Error;
use crate::image;
use crate::ui::Ui;

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
    let mut h = String::new();
    let pretty = i
        .os_release
        .get("PORTABLE_PRETTY_NAME")
        .or_else(|| i.os_release.get("PRETTY_NAME"))
        .cloned()
        .unwrap_or_default();
    h += &format!("image        {}\n", args.image.display());
    h += &format!(
        "name         {}  version {}  ({pretty})\n",
        i.name, i.version
    );
    h += &format!(
        "size         {} bytes, {} compression, {} KiB blocks\n",
        i.size,
        i.compression,
        i.block_size / 1024
    );
    h += &format!("sha256       {}\n", i.sha256);
    h += "os-release\n";
    for (k, v) in &i.os_release {
        h += &format!("  {k}={v}\n");
    }
    h += &format!("units ({})\n", i.units.len());
    for u in &i.units {
        h += &format!("  {}\n", u.name);
        for e in &u.exec_start {
            h += &format!("    ExecStart={e}\n");
        }
    }
    h += &format!("store paths ({})\n", i.store_paths.len());
    for p in &i.store_paths {
        h += &format!("  {p}\n");
    }
    if i.problems.is_empty() {
        h += "portabled would accept this image\n";
    }
    ui.result(&value, &h);
    if i.problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Refused(i.problems))
    }
}
