//! What an image holds, as a small JSON file inside it
//! (`/usr/lib/attache/manifest.json`): the spec it was packed from and its
//! store paths with their NAR sizes. `attache diff` compares two of them;
//! hosts keep a copy next to each image, so nothing has to be mounted to
//! read it.
//!
//! The manifest is a function of the spec and the closure only (no attache
//! version, no date), so the same closure still gives the same image bytes.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Component, Path};

use backhand::InnerNode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ImageError;
use super::layout::{Content, EntryKind, ImagePath, Layout};
use crate::spec::ImageSpec;

/// Where the manifest lives inside every image attache packs.
pub const MANIFEST_PATH: &str = "/usr/lib/attache/manifest.json";

/// The manifest format; raised when a field changes meaning.
pub const MANIFEST_SCHEMA: u32 = 1;

/// Larger manifests are refused when read back (a closure of 10,000 paths
/// is about 1 MiB).
const MAX_MANIFEST: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub attache_manifest: u32,
    pub name: String,
    pub version: String,
    pub os_release: BTreeMap<String, String>,
    pub units: Vec<ManifestUnit>,
    pub symlinks: Vec<ManifestSymlink>,
    /// The runtime closure, sorted by path.
    pub store_paths: Vec<StorePath>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestUnit {
    pub name: String,
    /// sha256 of the unit file as packed.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSymlink {
    pub path: String,
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorePath {
    pub path: String,
    /// The size of the path's NAR serialisation, what `nix path-info
    /// --json` calls `narSize` and `nix store diff-closures` compares: not
    /// the packed (compressed, deduplicated) size.
    pub nar_size: u64,
}

impl Manifest {
    /// Sum of the store paths' NAR sizes.
    pub fn nar_size(&self) -> u64 {
        self.store_paths.iter().map(|p| p.nar_size).sum()
    }

    /// The file name the image has (`NAME_VERSION.raw`).
    pub fn file_name(&self) -> String {
        crate::names::ImageFile::new(&self.name, &self.version).file_name()
    }

    /// The bytes written into the image (and onto hosts): pretty JSON
    /// with sorted keys where they are maps, and a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).unwrap_or_default();
        b.push(b'\n');
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<Manifest, String> {
        let v: serde_json::Value = serde_json::from_slice(b).map_err(|e| e.to_string())?;
        match v.get("attache_manifest").and_then(serde_json::Value::as_u64) {
            Some(n) if n == u64::from(MANIFEST_SCHEMA) => {}
            Some(n) => {
                return Err(format!(
                    "it is of manifest schema {n}, this attache reads {MANIFEST_SCHEMA}: use the attache that built it"
                ))
            }
            None => return Err("it is not an attache manifest".into()),
        }
        serde_json::from_value(v).map_err(|e| e.to_string())
    }
}

/// The manifest of a planned layout: store paths and their NAR sizes from
/// the entries under `/nix/store`, unit checksums from the unit files.
pub(crate) fn of_layout(spec: &ImageSpec, layout: &Layout) -> Manifest {
    let mut sizes: BTreeMap<String, u64> = spec
        .store_paths
        .iter()
        .filter_map(|p| p.file_name())
        .map(|b| (format!("/nix/store/{}", b.to_string_lossy()), 0))
        .collect();
    let mut units = Vec::new();
    for (path, entry) in &layout.entries {
        if let Some((root, depth)) = store_root(path) {
            if let Some(total) = sizes.get_mut(&root) {
                *total += nar_cost(path, &entry.kind, entry.mode, depth);
            }
        } else if let (Some(name), EntryKind::File(Content::Bytes(b))) =
            (path.strip_prefix("/etc/systemd/system").ok(), &entry.kind)
        {
            if spec.units.iter().any(|u| Path::new(&u.name) == name) {
                units.push(ManifestUnit {
                    name: name.to_string_lossy().into_owned(),
                    sha256: hex::encode(Sha256::digest(b)),
                });
            }
        }
    }
    Manifest {
        attache_manifest: MANIFEST_SCHEMA,
        name: spec.name.clone(),
        version: spec.version.clone(),
        os_release: spec.os_release.clone(),
        units,
        symlinks: spec
            .symlinks
            .iter()
            .map(|s| ManifestSymlink {
                path: s.path.clone(),
                target: s.target.clone(),
            })
            .collect(),
        store_paths: sizes
            .into_iter()
            .map(|(path, nar_size)| StorePath { path, nar_size })
            .collect(),
    }
}

/// `/nix/store/HASH-name` of a path under the store, and how deep below it
/// the path is (0 for the store path itself).
fn store_root(path: &ImagePath) -> Option<(String, usize)> {
    let rest = path.strip_prefix("/nix/store").ok()?;
    let mut comps = rest.components();
    let Some(Component::Normal(base)) = comps.next() else {
        return None;
    };
    Some((
        format!("/nix/store/{}", base.to_string_lossy()),
        comps.count(),
    ))
}

/// A string in a NAR: its length as 8 bytes, then the bytes padded to 8.
fn nar_str(len: usize) -> u64 {
    8 + (len as u64).div_ceil(8) * 8
}

/// What one entry adds to its store path's NAR (nix's `dumpPath`): its
/// node, the `entry` wrapper that names it in its parent, and for the root
/// the archive's magic string. Sums are order-free, so the layout's order
/// does not matter.
fn nar_cost(path: &Path, kind: &EntryKind, mode: u16, depth: usize) -> u64 {
    let s = |t: &str| nar_str(t.len());
    let mut n = s("(") + s("type") + s(")");
    n += match kind {
        EntryKind::Dir => s("directory"),
        EntryKind::Symlink(t) => s("symlink") + s("target") + nar_str(t.as_os_str().len()),
        EntryKind::File(c) => {
            let exec = if mode & 0o111 != 0 {
                s("executable") + s("")
            } else {
                0
            };
            s("regular") + exec + s("contents") + nar_str(c.size() as usize)
        }
    };
    if depth == 0 {
        n += s("nix-archive-1");
    } else {
        let name = path.file_name().map_or(0, |b| b.as_bytes().len());
        n += s("entry") + s("(") + s("name") + nar_str(name) + s("node") + s(")");
    }
    n
}

/// Reads the manifest of the image at `path`; `None` for an image packed
/// before manifests (or by another tool).
pub fn read(path: &Path) -> Result<Option<Manifest>, ImageError> {
    let corrupt = |reason: String| ImageError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let (file, _) = super::inspect::checked(path)?;
    let fs = super::inspect::open(path, file)?;
    let got = panic::catch_unwind(AssertUnwindSafe(|| -> Result<Option<Vec<u8>>, String> {
        let Some(node) = fs.files().find(|n| n.fullpath == Path::new(MANIFEST_PATH)) else {
            return Ok(None);
        };
        let InnerNode::File(f) = &node.inner else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        fs.file(f)
            .reader()
            .take(MAX_MANIFEST + 1)
            .read_to_end(&mut buf)
            .map_err(|e| e.to_string())?;
        if buf.len() as u64 > MAX_MANIFEST {
            return Err(format!("{MANIFEST_PATH} is larger than 16 MiB"));
        }
        Ok(Some(buf))
    }));
    let bytes = match got {
        Ok(r) => r.map_err(corrupt)?,
        Err(_) => return Err(corrupt("the reader crashed on it".into())),
    };
    bytes
        .map(|b| Manifest::from_bytes(&b).map_err(|e| corrupt(format!("{MANIFEST_PATH}: {e}"))))
        .transpose()
}
