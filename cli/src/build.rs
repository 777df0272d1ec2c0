//! The build stage, shared by `attache build` and `attache deploy`: a
//! [`Source`] -> Nix build -> [`ImageSpec`] -> validated -> packed image. The
//! steps live in `nix`, `spec` (with `spec::from_nix`), `image` and `cache`;
//! this file strings them together.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::{self, Cache};
use crate::error::Error;
use crate::image::{self, Compression, PackEvent, PackOptions};
use crate::names::ImageFile;
use crate::nix::{Installable, Nix};
use crate::spec::from_nix::{self, Naming, PackHints};
use crate::spec::{self, ImageSpec};
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
    /// The unit prefixes the image declares (`PORTABLE_PREFIXES`).
    #[serde(default)]
    pub prefixes: Vec<String>,
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
    /// Image name and version instead of the derivation's.
    pub naming: Naming,
}

impl Source {
    /// An installable built as it is: pure, with the derivation's own name.
    pub fn new(installable: Installable, nix: PathBuf, nix_args: Vec<String>) -> Self {
        Source {
            installable,
            nix,
            nix_args,
            impure: false,
            naming: Naming::default(),
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
fn resolve(
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
        from_nix::from_spec_file(&out, closure, &src.naming)?
    } else {
        let (spec, skipped) = from_nix::from_package(&out, &described, closure, &src.naming)?;
        for s in skipped {
            ui.warn(format!(
                "skipping unit '{s}': it does not start with the image name, so portabled would refuse it"
            ));
        }
        (spec, PackHints::default())
    };
    Ok((spec, hints, out, gcroot))
}

fn pack_options(args: &PackChoice, hints: &PackHints) -> PackOptions {
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
    let (mut spec, hints, out, _gcroot) = resolve(source, ui)?;
    spec::validate(&spec)?;
    spec::declare_unit_prefixes(&mut spec);
    let opts = pack_options(pack, &hints);
    let file_name = ImageFile::new(&spec.name, &spec.version).file_name();
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
        let prefixes = spec::portable_prefixes(&spec);
        return Ok(Built {
            path: out_dir.join(&file_name),
            name: spec.name,
            version: spec.version,
            sha256: String::new(),
            size: 0,
            cached: false,
            store_path: out,
            units,
            prefixes,
        });
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io(format!("creating {}", out_dir.display()), e))?;
    let key = cache::key(&spec, &out, &opts);
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
            prefixes: spec::portable_prefixes(&spec),
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
        prefixes: spec::portable_prefixes(&spec),
    };
    cache.store(&key, &built);
    Ok(built)
}

fn pack_with_progress(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
