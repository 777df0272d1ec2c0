//! Which image an unchanged build already produced, so that rebuilding an
//! unchanged closure with unchanged options returns the existing image at
//! once. Kept in the user's cache directory; losing it only costs a repack.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::build::Built;
use crate::image::PackOptions;
use crate::spec::ImageSpec;

/// An unchanged closure packed with unchanged options gives the same bytes,
/// so the key is the build output (a store path names its whole closure),
/// the resolved spec and the options.
pub fn key(spec: &ImageSpec, out: &Path, opts: &PackOptions) -> String {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    // Images from before manifests are not reused.
    h.update(crate::image::MANIFEST_PATH.as_bytes());
    h.update(out.as_os_str().as_encoded_bytes());
    h.update(format!("{spec:?}").as_bytes());
    h.update(format!("{}/{:?}/{}", opts.compression, opts.level, opts.block_size).as_bytes());
    hex::encode(h.finalize())
}

/// attache's directory in the user's cache (`$XDG_CACHE_HOME/attache`,
/// else `~/.cache/attache`).
pub fn dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|b| b.join("attache"))
}

/// Remembers which image a key produced, in the user's cache directory. A
/// hit needs the image still in place with the recorded size and mtime.
pub struct Cache {
    file: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheEntries {
    entries: BTreeMap<String, CacheEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    built: Built,
    mtime_ns: u128,
}

fn mtime_ns(p: &Path) -> Option<(u64, u128)> {
    let m = std::fs::metadata(p).ok()?;
    let t = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some((m.len(), t.as_nanos()))
}

impl Cache {
    pub fn open() -> Self {
        Cache {
            file: dir().map(|d| d.join("images.json")),
        }
    }

    fn read(&self) -> CacheEntries {
        self.file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn lookup(&self, key: &str, expected_path: &Path) -> Option<Built> {
        let entries = self.read();
        let e = entries.entries.get(key)?;
        let canon = std::fs::canonicalize(expected_path).ok()?;
        if canon != e.built.path {
            return None;
        }
        let (size, mtime) = mtime_ns(&canon)?;
        (size == e.built.size && mtime == e.mtime_ns).then(|| e.built.clone())
    }

    /// Best effort: a cache that cannot be written only costs a repack.
    pub fn store(&self, key: &str, built: &Built) {
        let Some(file) = &self.file else { return };
        let Ok(canon) = std::fs::canonicalize(&built.path) else {
            return;
        };
        let Some((_, mtime_ns)) = mtime_ns(&canon) else {
            return;
        };
        let mut entries = self.read();
        entries.entries.retain(|_, e| e.built.path != canon);
        entries.entries.insert(
            key.to_owned(),
            CacheEntry {
                built: Built {
                    path: canon,
                    ..built.clone()
                },
                mtime_ns,
            },
        );
        let Some(dir) = file.parent() else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        if let Ok(mut tmp) = tempfile::NamedTempFile::new_in(dir) {
            use std::io::Write;
            let ok = serde_json::to_vec(&entries)
                .ok()
                .is_some_and(|b| tmp.write_all(&b).is_ok());
            if ok {
                let _ = tmp.persist(file);
            }
        }
    }
}
