//! `attache build`: installable -> Nix build -> [`ImageSpec`] -> validated ->
//! packed image. The stages live in `nix`, `spec` and `image`; this file only
//! strings them together and decides what "unchanged" means.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::image::{self, Compression, PackEvent, PackOptions};
use crate::nix::{Described, Installable, Nix};
use crate::spec::{self, ImageSpec, OsReleaseInput, Symlink, UnitFile};
use crate::ui::Ui;

/// What `build` produced, as printed with `--json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Built {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    /// True when an unchanged closure returned the existing image.
    pub cached: bool,
    pub store_path: PathBuf,
    /// The units in the image, and whether attach enables them.
    #[serde(default)]
    pub units: Vec<BuiltUnit>,
}

/// A unit of a built image: what the deploy health check needs to know.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuiltUnit {
    pub name: String,
    /// Has an `[Install]` section, so `attach --enable` links and starts it.
    pub install: bool,
}

fn built_units(spec: &ImageSpec) -> Vec<BuiltUnit> {
    spec.units
        .iter()
        .map(|u| BuiltUnit {
            name: u.name.clone(),
            install: std::fs::read_to_string(&u.source).is_ok_and(|t| {
                let mut in_install = false;
                t.lines().any(|l| {
                    let l = l.trim();
                    if l.starts_with('[') {
                        in_install = l == "[Install]";
                        return false;
                    }
                    in_install
                        && ["WantedBy=", "RequiredBy=", "UpheldBy="]
                            .iter()
                            .any(|k| l.starts_with(k))
                })
            }),
        })
        .collect()
}

/// The JSON file written by `portableService` in `nix/lib.nix`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NixSpec {
    #[allow(dead_code)]
    attache_spec: u32,
    pname: Option<String>,
    version: Option<String>,
    description: Option<String>,
    homepage: Option<String>,
    #[serde(default)]
    units: Vec<NixUnit>,
    #[serde(default)]
    symlinks: Vec<NixSymlink>,
    squash_compression: Option<String>,
    squash_block_size: Option<serde_json::Value>,
    #[serde(default)]
    os_release: BTreeMap<String, String>,
    portable_prefixes: Option<Vec<String>>,
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct NixUnit {
    name: String,
    path: PathBuf,
}

#[derive(Debug, Deserialize)]
struct NixSymlink {
    object: String,
    symlink: String,
}

/// Packing choices the spec itself asked for (nixpkgs' `squash-compression`
/// and `squash-block-size`), used when the command line does not override.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PackHints {
    pub compression: Option<Compression>,
    pub level: Option<u32>,
    pub block_size: Option<u32>,
}

/// What to build and with which nix, resolved from the command line or the
/// inventory: all that the stages need to know about Nix.
#[derive(Debug, Clone)]
pub struct Source {
    pub installable: Installable,
    /// The user's nix binary.
    pub nix: PathBuf,
    /// Passed to every nix call.
    pub nix_args: Vec<String>,
    pub impure: bool,
    /// Image name instead of the derivation's `pname`.
    pub name: Option<String>,
    /// Image version instead of the derivation's `version`.
    pub version: Option<String>,
}

impl Source {
    /// An installable built as it is: pure, with the derivation's own name.
    pub fn new(installable: Installable, nix: PathBuf, nix_args: Vec<String>) -> Self {
        Source {
            installable,
            nix,
            nix_args,
            impure: false,
            name: None,
            version: None,
        }
    }

    fn nix(&self) -> Nix {
        let mut extra = Vec::new();
        if self.impure {
            extra.push("--impure".to_owned());
        }
        extra.extend(self.nix_args.iter().cloned());
        Nix::new(self.nix.clone(), extra)
    }
}

/// Packing choices made on the command line; each wins over the spec's hint.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PackChoice {
    pub compression: Option<Compression>,
    pub level: Option<u32>,
    pub block_size: Option<u32>,
}

/// Evaluates and builds the installable, and turns its output into a spec.
/// The returned tempdir holds the GC root: keep it alive while packing.
pub fn resolve(
    src: &Source,
    ui: &Ui,
) -> Result<(ImageSpec, PackHints, PathBuf, tempfile::TempDir), Error> {
    let inst = &src.installable;
    let nix = src.nix();
    nix.version()?;
    ui.status("Evaluating", inst);
    let described = nix.describe(inst)?;
    let gcroot = tempfile::Builder::new()
        .prefix("attache-gcroot-")
        .tempdir()
        .map_err(|e| Error::io("creating a temporary directory", e))?;
    ui.status("Building", inst);
    let out = nix.build(inst, &gcroot.path().join("result"))?;
    ui.verbose(format!("built {}", out.display()));
    let closure = nix.closure(&out)?;
    let (spec, hints) = if out.is_file() {
        from_spec_file(&out, closure, src)?
    } else {
        let (spec, skipped) = from_package(&out, &described, closure, src)?;
        for s in skipped {
            ui.warn(format!(
                "skipping unit '{s}': it does not start with the image name, so portabled would refuse it"
            ));
        }
        (spec, PackHints::default())
    };
    Ok((spec, hints, out, gcroot))
}

fn from_spec_file(
    out: &Path,
    closure: Vec<PathBuf>,
    src: &Source,
) -> Result<(ImageSpec, PackHints), Error> {
    let text =
        std::fs::read(out).map_err(|e| Error::io(format!("reading {}", out.display()), e))?;
    let ns: NixSpec = serde_json::from_slice(&text).map_err(|e| {
        Error::Usage(format!(
            "{} is a file but not an attache spec ({e}): build the result of attache's portableService, or a package with unit files",
            out.display()
        ))
    })?;
    let name = src.name.clone().or(ns.pname.clone()).unwrap_or_default();
    let version = src
        .version
        .clone()
        .or(ns.version.clone())
        .unwrap_or_default();
    // The spec file itself is bookkeeping, not image content.
    let store_paths: Vec<PathBuf> = closure.into_iter().filter(|p| p != out).collect();
    let os_release = spec::os_release(&OsReleaseInput {
        name: &name,
        version: &version,
        description: ns.description.as_deref(),
        homepage: ns.homepage.as_deref(),
        id: ns.id.as_deref(),
        prefixes: ns.portable_prefixes.as_deref(),
        extra: &ns.os_release,
    });
    let spec = ImageSpec {
        name,
        version,
        units: ns
            .units
            .into_iter()
            .map(|u| UnitFile {
                name: u.name,
                source: u.path,
            })
            .collect(),
        symlinks: ns
            .symlinks
            .into_iter()
            .map(|s| Symlink {
                path: s.symlink,
                target: s.object,
            })
            .collect(),
        store_paths,
        os_release,
    };
    let hints = parse_hints(
        ns.squash_compression.as_deref(),
        ns.squash_block_size.as_ref(),
    )?;
    Ok((spec, hints))
}

/// Zero-config: any package with unit files becomes an image named after its
/// `pname`. Units that portabled would refuse are skipped (and named) when
/// at least one unit matches; otherwise validation explains the rule.
fn from_package(
    out: &Path,
    d: &Described,
    closure: Vec<PathBuf>,
    src: &Source,
) -> Result<(ImageSpec, Vec<String>), Error> {
    let (guess_name, guess_version) = split_name(d.name.as_deref().unwrap_or(""));
    let name = src.name.clone().or(d.pname.clone()).unwrap_or(guess_name);
    let version = src
        .version
        .clone()
        .or(d.version.clone())
        .unwrap_or(guess_version);
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in ["lib/systemd/system", "etc/systemd/system"] {
        let Ok(rd) = std::fs::read_dir(out.join(dir)) else {
            continue;
        };
        for entry in rd.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if spec::UNIT_SUFFIXES.iter().any(|s| file_name.ends_with(s)) {
                found.entry(file_name).or_insert(entry.path());
            }
        }
    }
    if found.is_empty() {
        return Err(Error::Usage(format!(
            "{} has no unit files in lib/systemd/system or etc/systemd/system: wrap it with attache's portableService and list its units",
            out.display()
        )));
    }
    let prefix = name.clone();
    let (matching, skipped): (Vec<_>, Vec<_>) = found
        .into_iter()
        .partition(|(n, _)| spec::unit_matches_prefix(n, &prefix));
    let (units, skipped) = if matching.is_empty() {
        (skipped, Vec::new())
    } else {
        (matching, skipped.into_iter().map(|(n, _)| n).collect())
    };
    let extra = BTreeMap::new();
    let os_release = spec::os_release(&OsReleaseInput {
        name: &name,
        version: &version,
        description: None,
        homepage: None,
        id: None,
        prefixes: None,
        extra: &extra,
    });
    let spec = ImageSpec {
        name,
        version,
        units: units
            .into_iter()
            .map(|(name, source)| UnitFile { name, source })
            .collect(),
        symlinks: Vec::new(),
        store_paths: closure,
        os_release,
    };
    Ok((spec, skipped))
}

/// `hello-2.12.1` -> (`hello`, `2.12.1`): Nix's own rule, the version starts
/// at the first `-` followed by a digit.
fn split_name(name: &str) -> (String, String) {
    let bytes = name.as_bytes();
    for i in 0..bytes.len().saturating_sub(1) {
        if bytes[i] == b'-' && bytes[i + 1].is_ascii_digit() {
            return (name[..i].to_owned(), name[i + 1..].to_owned());
        }
    }
    (name.to_owned(), String::new())
}

/// Reads nixpkgs' `squash-compression` (`"xz -Xdict-size 100%"`,
/// `"zstd -Xcompression-level 19"`) and `squash-block-size` (`"1M"`).
pub fn parse_hints(
    compression: Option<&str>,
    block_size: Option<&serde_json::Value>,
) -> Result<PackHints, Error> {
    let mut hints = PackHints::default();
    if let Some(c) = compression {
        let mut words = c.split_whitespace();
        if let Some(algo) = words.next() {
            hints.compression = Some(algo.parse::<Compression>().map_err(|_| {
                Error::Usage(format!(
                    "squash-compression '{c}' uses a compressor attache does not write: use zstd, xz or gzip, or pass --compression"
                ))
            })?);
        }
        let rest: Vec<&str> = words.collect();
        for w in rest.windows(2) {
            if w[0] == "-Xcompression-level" {
                hints.level = w[1].parse().ok();
            }
        }
    }
    if let Some(b) = block_size {
        let s = match b {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        hints.block_size = Some(
            crate::cli::parse_size(&s)
                .map_err(|e| Error::Usage(format!("squash-block-size: {e}")))?,
        );
    }
    Ok(hints)
}

pub fn pack_options(args: &PackChoice, hints: &PackHints) -> PackOptions {
    let compression = args
        .compression
        .or(hints.compression)
        .unwrap_or(Compression::Zstd);
    // A level only carries over when the compressor did too.
    let level = args.level.or(if Some(compression) == hints.compression {
        hints.level
    } else {
        None
    });
    PackOptions {
        compression,
        level,
        block_size: args.block_size.or(hints.block_size).unwrap_or(1 << 20),
        threads: 0,
    }
}

/// The whole build stage, shared by `build` and `deploy`.
pub fn build_image(
    source: &Source,
    pack: &PackChoice,
    out_dir: &Path,
    dry_run: bool,
    ui: &Ui,
) -> Result<Built, Error> {
    let (spec, hints, out, _gcroot) = resolve(source, ui)?;
    spec::validate(&spec)?;
    let opts = pack_options(pack, &hints);
    let file_name = format!("{}_{}.raw", spec.name, spec.version);
    if dry_run {
        ui.status(
            "Would pack",
            format!(
                "{file_name}: {} units, {} store paths, {} compression",
                spec.units.len(),
                spec.store_paths.len(),
                opts.compression
            ),
        );
        let units = built_units(&spec);
        return Ok(Built {
            path: out_dir.join(&file_name),
            name: spec.name,
            version: spec.version,
            sha256: String::new(),
            size: 0,
            cached: false,
            store_path: out,
            units,
        });
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io(format!("creating {}", out_dir.display()), e))?;
    let key = cache_key(&spec, &out, &opts);
    let cache = Cache::open();
    if let Some(hit) = cache.lookup(&key, &out_dir.join(&file_name)) {
        ui.status(
            "Fresh",
            format!("{} (unchanged closure)", hit.path.display()),
        );
        return Ok(Built {
            cached: true,
            store_path: out,
            units: built_units(&spec),
            ..hit
        });
    }
    ui.status("Packing", format!("{file_name} ({})", opts.compression));
    let image = pack_with_progress(&spec, &opts, out_dir, ui)?;
    let built = Built {
        path: image.path,
        name: image.name,
        version: image.version,
        sha256: image.sha256,
        size: image.size,
        cached: false,
        store_path: out,
        units: built_units(&spec),
    };
    cache.store(&key, &built);
    Ok(built)
}

pub fn pack_with_progress(
    spec: &ImageSpec,
    opts: &PackOptions,
    out_dir: &Path,
    ui: &Ui,
) -> Result<image::Image, Error> {
    let mut bar = None;
    let mut on_event = |ev: PackEvent| match ev {
        PackEvent::Started { files, bytes } => {
            bar = ui.bytes_bar(bytes, "Packing");
            ui.verbose(format!("{files} files, {bytes} bytes to pack"));
        }
        PackEvent::Progress {
            files_done,
            bytes_done,
        } => {
            if let Some(b) = &bar {
                b.set_position(bytes_done);
                b.set_message(format!("{files_done} files"));
            }
        }
        PackEvent::Finished => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
        }
    };
    let image = image::pack(spec, opts, out_dir, &mut on_event)?;
    Ok(image)
}

/// An unchanged closure packed with unchanged options gives the same bytes,
/// so the key is the build output (a store path names its whole closure),
/// the resolved spec and the options.
fn cache_key(spec: &ImageSpec, out: &Path, opts: &PackOptions) -> String {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(out.as_os_str().as_encoded_bytes());
    h.update(format!("{spec:?}").as_bytes());
    h.update(format!("{}/{:?}/{}", opts.compression, opts.level, opts.block_size).as_bytes());
    hex::encode(h.finalize())
}

/// attache's directory in the user's cache (`$XDG_CACHE_HOME/attache`,
/// else `~/.cache/attache`).
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|b| b.join("attache"))
}

/// Remembers which image a key produced, in the user's cache directory. A
/// hit needs the image still in place with the recorded size and mtime.
struct Cache {
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
    fn open() -> Self {
        Cache {
            file: cache_dir().map(|d| d.join("images.json")),
        }
    }

    fn read(&self) -> CacheEntries {
        self.file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn lookup(&self, key: &str, expected_path: &Path) -> Option<Built> {
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
    fn store(&self, key: &str, built: &Built) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nixpkgs_compression_strings() {
        let h = parse_hints(Some("xz -Xdict-size 100%"), Some(&json!("1M"))).unwrap();
        assert_eq!(h.compression, Some(Compression::Xz));
        assert_eq!(h.block_size, Some(1 << 20));
        let h = parse_hints(Some("zstd -Xcompression-level 19"), Some(&json!("128K"))).unwrap();
        assert_eq!(h.compression, Some(Compression::Zstd));
        assert_eq!(h.level, Some(19));
        assert!(parse_hints(Some("lzo"), None).is_err());
        assert!(parse_hints(None, Some(&json!("3M"))).is_err());
    }

    #[test]
    fn cli_wins_over_hints() {
        let hints = PackHints {
            compression: Some(Compression::Xz),
            level: Some(9),
            block_size: Some(1 << 17),
        };
        let args = PackChoice {
            compression: Some(Compression::Zstd),
            level: None,
            block_size: None,
        };
        let o = pack_options(&args, &hints);
        assert_eq!(o.compression, Compression::Zstd);
        assert_eq!(o.level, None, "xz's level must not leak into zstd");
        assert_eq!(o.block_size, 1 << 17);
    }

    #[test]
    fn nix_name_split() {
        assert_eq!(
            split_name("hello-2.12.1"),
            ("hello".into(), "2.12.1".into())
        );
        assert_eq!(split_name("my-app-1.0"), ("my-app".into(), "1.0".into()));
        assert_eq!(split_name("plain"), ("plain".into(), String::new()));
    }
}
