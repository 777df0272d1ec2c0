//! Which image an unchanged build already produced, so that rebuilding an
//! unchanged closure with unchanged options returns the existing image at
//! once. Kept in the user's cache directory; losing it only costs a repack.

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

/// Remembers which images a key produced, in the user's cache directory. A
/// hit needs the image still in place with the recorded size and mtime.
pub struct Cache {
    file: Option<PathBuf>,
}

/// One entry per image file; one key may have several (`build` writes to
/// its --out-dir, `deploy` to the cache directory). Files in the older
/// format (a map from key to one image) read as empty: a repack, once.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheEntries {
    #[serde(default)]
    images: Vec<CacheEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    built: Built,
    mtime_ns: u128,
}

impl CacheEntry {
    fn intact(&self) -> bool {
        mtime_ns(&self.built.path) == Some((self.built.size, self.mtime_ns))
    }
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

    #[cfg(test)]
    fn at(file: PathBuf) -> Self {
        Cache { file: Some(file) }
    }

    fn read(&self) -> CacheEntries {
        self.file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The image `key` produced, at `expected_path`. When the only intact
    /// one is elsewhere (an image `build` wrote, now wanted by `deploy`, or
    /// the other way round), it is copied there: copying the bytes beats
    /// packing them again, and they are the same bytes.
    pub fn lookup(&self, key: &str, expected_path: &Path) -> Option<Built> {
        let entries = self.read();
        let mut intact = entries.images.iter().filter(|e| e.key == key && e.intact());
        let here = std::fs::canonicalize(expected_path).ok();
        let found = intact
            .clone()
            .find(|e| Some(&e.built.path) == here.as_ref());
        if let Some(e) = found {
            return Some(e.built.clone());
        }
        let elsewhere = intact.next()?;
        let copied = copy_atomically(&elsewhere.built.path, expected_path).ok()?;
        let built = Built {
            path: copied,
            ..elsewhere.built.clone()
        };
        self.store(key, &built);
        Some(built)
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
        // A file holds one image; entries of deleted files are dropped.
        entries
            .images
            .retain(|e| e.built.path != canon && e.built.path.exists());
        entries.images.push(CacheEntry {
            key: key.to_owned(),
            built: Built {
                path: canon,
                ..built.clone()
            },
            mtime_ns,
        });
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

/// Copies `from` to `to` through a temporary file beside `to`, so `to` is
/// never half-written; returns `to`, canonical.
fn copy_atomically(from: &Path, to: &Path) -> std::io::Result<PathBuf> {
    let dir = to.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".attache-copy.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    std::io::copy(&mut std::fs::File::open(from)?, tmp.as_file_mut())?;
    std::fs::set_permissions(tmp.path(), std::fs::metadata(from)?.permissions())?;
    tmp.persist(to).map_err(|e| e.error)?;
    std::fs::canonicalize(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(path: &Path) -> Built {
        Built {
            path: path.to_owned(),
            name: "demo".into(),
            version: "1.0".into(),
            sha256: "ab".repeat(32),
            size: std::fs::metadata(path).unwrap().len(),
            cached: false,
            store_path: "/nix/store/x-demo".into(),
            units: Vec::new(),
            prefixes: Vec::new(),
            manifest: None,
        }
    }

    /// `build` then `deploy` (two directories, one closure) pack once: the
    /// second finds the first's image and gets a copy, and both stay hits.
    #[test]
    fn an_image_elsewhere_is_copied_not_repacked() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::at(d.path().join("cache/images.json"));
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let first = a.join("demo_1.0.raw");
        std::fs::write(&first, b"image bytes").unwrap();
        cache.store("k", &built(&first));

        let copy = cache.lookup("k", &b.join("demo_1.0.raw")).expect("a hit");
        assert_eq!(copy.path, b.canonicalize().unwrap().join("demo_1.0.raw"));
        assert_eq!(std::fs::read(&copy.path).unwrap(), b"image bytes");
        assert_eq!(copy.sha256, "ab".repeat(32));
        // No temporary file left beside it.
        assert_eq!(std::fs::read_dir(&b).unwrap().count(), 1);
        // Both places are hits now, each for its own file.
        assert_eq!(
            cache.lookup("k", &first).unwrap().path,
            first.canonicalize().unwrap()
        );
        assert_eq!(cache.lookup("k", &copy.path).unwrap().path, copy.path);
        // Another key is not these images.
        assert!(cache.lookup("other", &first).is_none());
    }

    /// A recorded image that changed since is neither a hit nor a source.
    #[test]
    fn a_changed_image_is_a_miss() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::at(d.path().join("images.json"));
        let first = d.path().join("demo_1.0.raw");
        std::fs::write(&first, b"image bytes").unwrap();
        cache.store("k", &built(&first));
        std::fs::write(&first, b"other bytes, longer").unwrap();
        assert!(cache.lookup("k", &first).is_none());
        assert!(cache.lookup("k", &d.path().join("elsewhere.raw")).is_none());
        assert!(!d.path().join("elsewhere.raw").exists());
    }
}
