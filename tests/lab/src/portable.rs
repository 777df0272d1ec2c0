//! A hand-made portable service image, without Nix: a squashfs with
//! os-release, the mount points portabled needs, a static busybox and units.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::image::remove_tree;
use crate::{Context, Error, Result};

/// Writes a portable image to `dest` (e.g. `…/smoke_1.0.raw`): `/bin/busybox`
/// (the host's static one), `etc/os-release` with `ID=lab`, the mount points
/// (`proc sys dev run tmp var/tmp`, tmp dirs 1777, empty `etc/resolv.conf`
/// and `etc/machine-id`) and each `(file name, text)` unit in
/// `etc/systemd/system/`. Needs `mksquashfs`.
pub fn busybox_portable_image(dest: &Path, units: &[(&str, &str)]) -> Result<()> {
    let tree = dest.with_extension("tree");
    remove_tree(&tree)?;
    let build = || -> Result<()> {
        for d in [
            "bin",
            "proc",
            "sys",
            "dev",
            "run",
            "tmp",
            "var/tmp",
            "var/lib",
            "var/log",
            "var/cache",
            "etc/systemd/system",
        ] {
            fs::create_dir_all(tree.join(d))?;
        }
        for d in ["tmp", "var/tmp"] {
            fs::set_permissions(tree.join(d), fs::Permissions::from_mode(0o1777))?;
        }
        fs::set_permissions(&tree, fs::Permissions::from_mode(0o755))?;
        fs::write(
            tree.join("etc/os-release"),
            "ID=lab\nPRETTY_NAME=\"attache lab portable\"\n",
        )?;
        fs::write(tree.join("etc/resolv.conf"), "")?;
        fs::write(tree.join("etc/machine-id"), "")?;
        fs::copy("/bin/busybox", tree.join("bin/busybox"))
            .context(|| "copying /bin/busybox (install busybox-static)".into())?;
        for (name, text) in units {
            fs::write(tree.join("etc/systemd/system").join(name), text)?;
        }
        let out = Command::new("mksquashfs")
            .arg(&tree)
            .arg(dest)
            .args(["-noappend", "-all-root", "-no-progress"])
            .output()
            .context(|| "running mksquashfs (install squashfs-tools)".into())?;
        if !out.status.success() {
            return Err(Error::new(format!(
                "mksquashfs failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    };
    let res = build();
    let _ = remove_tree(&tree);
    res
}
