//! What goes into a portable image, as plain data, and portabled's rules for it.
//!
//! `nix` produces an [`ImageSpec`]; `validate` checks it against what
//! systemd-portabled accepts (see shared notes `portable-services.md`) so that
//! `image` only ever packs something `portablectl attach` takes first time.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Everything the packer needs, resolved: no Nix left in here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Image name; the unit prefix portabled derives from `NAME_VERSION.raw`.
    pub name: String,
    pub version: String,
    /// Units copied as regular files into `etc/systemd/system/`.
    pub units: Vec<UnitFile>,
    /// Extra symlinks inside the image (`/etc/ssl -> /nix/store/…/etc/ssl`).
    pub symlinks: Vec<Symlink>,
    /// Store paths copied to `nix/store/` (the runtime closure), sorted.
    pub store_paths: Vec<PathBuf>,
    /// `etc/os-release` lines, written in key order.
    pub os_release: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitFile {
    /// File name inside the image, e.g. `demo.service`.
    pub name: String,
    /// Where to read it on the build machine (store symlinks are followed).
    pub source: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symlink {
    /// Absolute path inside the image, e.g. `/etc/ssl`.
    pub path: String,
    /// Link target, usually an absolute `/nix/store/…` path.
    pub target: String,
}
