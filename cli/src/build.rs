//! The build stage, shared by `attache build` and `attache deploy`: a
//! [`Source`] -> Nix build -> [`ImageSpec`] -> validated -> packed image. The
//! steps live in `nix`, `spec` (with `spec::from_nix`), `image` and `cache`;
//! this file strings them together.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::{self, Cache};
use crate::error::Error;
use crate::image::{self, Compression, PackEvent, PackOptions};
use crate::names::{portable_prefixes, unit_installs, ImageFile};
use crate::nix::{parse_references_graph, Installable, Nix};
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
    /// What the image holds (also inside it); `None` only for a dry run.
    #[serde(skip)]
    pub manifest: Option<image::Manifest>,
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
            install: std::fs::read_to_string(&u.source).is_ok_and(|t| unit_installs(&t)),
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
    /// Passed to every nix call (`--impure` among them).
    pub nix_args: Vec<String>,
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
            naming: Naming::default(),
        }
    }

    fn nix(&self) -> Nix {
        Nix::new(self.nix.clone(), self.nix_args.clone())
    }
}

/// Packing choices made on the command line; each wins over the spec's hint.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PackChoice {
    pub compression: Option<Compression>,
    pub level: Option<u32>,
    pub block_size: Option<u32>,
}

/// A compression level no compressor in play accepts. Each variant says
/// where the compressor and the level came from, since the fix differs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LevelError {
    #[error("--level {level} is out of range for {compression}: use {}", range(*.compression))]
    Chosen {
        compression: Compression,
        level: u32,
    },
    #[error(
        "--level {level} is out of range for every compressor (zstd {}, xz {}, gzip {})",
        range(Compression::Zstd),
        range(Compression::Xz),
        range(Compression::Gzip)
    )]
    NoCompressor { level: u32 },
    #[error("--level {level} is out of range for {compression}, {}: use {}, or pass --compression", if *.from_spec { "the compressor the spec's squash-compression asks for" } else { "the default compressor" }, range(*.compression))]
    Implied {
        compression: Compression,
        level: u32,
        from_spec: bool,
    },
    #[error("the spec's squash-compression asks for {compression} level {level}, which is out of range: use {} (fix squash-compression, or pass --level)", range(*.compression))]
    InSpec {
        compression: Compression,
        level: u32,
    },
}

fn range(c: Compression) -> String {
    let r = c.levels();
    format!("{}..={}", r.start(), r.end())
}

impl PackChoice {
    /// What the command line alone can refuse, before Nix builds anything:
    /// a level the chosen compressor does not take, or that none does.
    pub fn check(&self) -> Result<(), LevelError> {
        let Some(level) = self.level else {
            return Ok(());
        };
        match self.compression {
            Some(compression) if !compression.levels().contains(&level) => {
                Err(LevelError::Chosen { compression, level })
            }
            None if [Compression::Zstd, Compression::Xz, Compression::Gzip]
                .iter()
                .all(|c| !c.levels().contains(&level)) =>
            {
                Err(LevelError::NoCompressor { level })
            }
            _ => Ok(()),
        }
    }
}

/// The options as packing will use them, checked as soon as the spec is
/// read: packing comes after validation and may take minutes.
fn check_pack_options(
    choice: &PackChoice,
    hints: &PackHints,
    opts: &PackOptions,
) -> Result<(), LevelError> {
    let compression = opts.compression;
    let level = opts.level.unwrap_or(compression.default_level());
    if compression.levels().contains(&level) {
        return Ok(());
    }
    Err(if choice.level.is_some() {
        LevelError::Implied {
            compression,
            level,
            from_spec: hints.compression.is_some(),
        }
    } else {
        LevelError::InSpec { compression, level }
    })
}

/// What Nix built, read: a spec to pack, or an image packed already.
enum Resolved {
    Spec(ImageSpec, PackHints),
    /// A derivation whose output is a portable image (nixpkgs'
    /// `pkgs.portableService`): taken as it is.
    Image(PathBuf),
}

/// Evaluates and builds the installable, and reads its output. Of a
/// portableService whose own output is the image, only its spec is built.
/// The returned tempdir holds the GC root: keep it alive while packing.
fn resolve(src: &Source, ui: &Ui) -> Result<(Resolved, PathBuf, tempfile::TempDir), Error> {
    let inst = &src.installable;
    // No `nix --version` first: a missing Nix fails the evaluation with the
    // same error, one process sooner.
    let nix = src.nix();
    ui.status("Evaluating", inst);
    let described = nix.describe(inst)?;
    if let Some(packer) = described
        .packer
        .as_deref()
        .filter(|v| *v != env!("CARGO_PKG_VERSION"))
    {
        ui.warn(format!(
            "{inst} packs its image under `nix build` with attache {packer}, but this is attache {}: the two may write different bytes; use the same release for both",
            env!("CARGO_PKG_VERSION")
        ));
    }
    let gcroot = tempfile::Builder::new()
        .prefix("attache-gcroot-")
        .tempdir()
        .map_err(|e| Error::io("creating a temporary directory", e))?;
    let link = gcroot.path().join("result");
    ui.status("Building", inst);
    let (out, closure) = match &described.spec {
        // A spec is a JSON file, never an image: its closure comes with
        // its build.
        Some(spec) => {
            let closure = nix.realise(spec, &inst.to_string(), &link)?;
            ui.verbose(format!("built {}", spec.out.display()));
            (spec.out.clone(), closure)
        }
        None => {
            let out = nix.build(inst, &link)?;
            ui.verbose(format!("built {}", out.display()));
            if let Some(image) = prebuilt_image(&out) {
                return Ok((Resolved::Image(image), out, gcroot));
            }
            let closure = nix.closure(&out)?;
            (out, closure)
        }
    };
    let resolved = if out.is_file() {
        let (spec, hints) = from_nix::from_spec_file(&out, closure, &src.naming)?;
        Resolved::Spec(spec, hints)
    } else {
        let (spec, skipped) = from_nix::from_package(&out, &described, closure, &src.naming)?;
        for s in skipped {
            ui.warn(format!(
                "skipping unit '{s}': it does not start with the image name, so portabled would refuse it"
            ));
        }
        Resolved::Spec(spec, PackHints::default())
    };
    Ok((resolved, out, gcroot))
}

/// The image in a build output that is one: a squashfs file, or a
/// directory holding nothing but one `.raw` file (nixpkgs' layout).
fn prebuilt_image(out: &Path) -> Option<PathBuf> {
    let is_squashfs = |p: &Path| {
        use std::io::Read;
        let mut magic = [0u8; 4];
        std::fs::File::open(p)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            // squashfs' magic number, as it starts the superblock
            && &magic == b"hsqs"
    };
    if out.is_file() {
        return is_squashfs(out).then(|| out.to_owned());
    }
    let entries: Vec<_> = std::fs::read_dir(out).ok()?.flatten().collect();
    match entries.as_slice() {
        [one] if one.file_name().to_string_lossy().ends_with(".raw") && one.path().is_file() => {
            Some(one.path())
        }
        _ => None,
    }
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

/// A spec checked and ready to pack, with the options packing will use:
/// what `attache build` and the `nix build` of portableService share.
struct Ready {
    spec: ImageSpec,
    opts: PackOptions,
}

fn ready(mut spec: ImageSpec, hints: &PackHints, pack: &PackChoice) -> Result<Ready, Error> {
    let opts = pack_options(pack, hints);
    check_pack_options(pack, hints, &opts)?;
    spec::validate(&spec)?;
    spec::declare_unit_prefixes(&mut spec);
    Ok(Ready { spec, opts })
}

/// The whole build stage, shared by `build` and `deploy`.
pub fn build_image(
    source: &Source,
    pack: &PackChoice,
    out_dir: &Path,
    dry_run: bool,
    ui: &Ui,
) -> Result<Built, Error> {
    pack.check()?;
    let (resolved, out, _gcroot) = resolve(source, ui)?;
    let (spec, hints) = match resolved {
        Resolved::Spec(spec, hints) => (spec, hints),
        Resolved::Image(image) => {
            return take_image(&image, out, source, pack, out_dir, dry_run, ui)
        }
    };
    let Ready { spec, opts } = ready(spec, &hints, pack)?;
    let units = built_units(&spec);
    let prefixes = spec::portable_prefixes(&spec);
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
            manifest: None,
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
        // The cache keeps no manifest: read it from the image.
        let manifest = image::read_manifest(&hit.path)?;
        return Ok(Built {
            cached: true,
            store_path: out,
            units,
            prefixes,
            manifest,
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
        units,
        prefixes,
        manifest: Some(image.manifest),
    };
    cache.store(&key, &built);
    Ok(built)
}

/// An image Nix built already: checked as `inspect` checks it, and copied
/// to `out_dir` under its own name (through a temporary file, so a failed
/// copy leaves nothing behind).
fn take_image(
    image: &Path,
    out: PathBuf,
    source: &Source,
    pack: &PackChoice,
    out_dir: &Path,
    dry_run: bool,
    ui: &Ui,
) -> Result<Built, Error> {
    if source.naming.name.is_some() || source.naming.version.is_some() {
        return Err(Error::Usage(format!(
            "{} is an image built already ({}): --name and --version cannot rename it; rename it in Nix",
            source.installable,
            image.display()
        )));
    }
    if *pack != PackChoice::default() {
        ui.warn(format!(
            "{} is an image built already: --compression, --level and --block-size do not apply, it is copied as it is",
            source.installable
        ));
    }
    ui.status("Checking", image.display());
    let mut built = prebuilt(image)?;
    let file_name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = out_dir.join(&file_name);
    built.path = path.clone();
    built.store_path = out;
    if dry_run {
        ui.status("Would copy", &file_name);
        return Ok(built);
    }
    ui.status("Copying", &file_name);
    copy_image(image, out_dir, &path)?;
    Ok(built)
}

/// An image built already, checked as `inspect` checks it: its name,
/// version, units, prefixes and manifest, as a build would give them. Also
/// how a pull host reads an image it fetched.
pub fn prebuilt(image: &Path) -> Result<Built, Error> {
    let found = image::inspect(image)?;
    if !found.problems.is_empty() {
        return Err(Error::Refused(found.problems));
    }
    Ok(Built {
        path: image.to_owned(),
        prefixes: portable_prefixes(
            found
                .os_release
                .get("PORTABLE_PREFIXES")
                .map(String::as_str),
            &found.name,
        ),
        name: found.name,
        version: found.version,
        sha256: found.sha256,
        size: found.size,
        cached: false,
        store_path: image.to_owned(),
        manifest: image::read_manifest(image)?,
        units: found
            .units
            .into_iter()
            .map(|u| BuiltUnit {
                name: u.name,
                install: u.install,
            })
            .collect(),
    })
}

fn copy_image(from: &Path, out_dir: &Path, to: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e| Error::io(format!("copying {} to {}", from.display(), to.display()), e);
    std::fs::create_dir_all(out_dir).map_err(io)?;
    let tmp = tempfile::Builder::new()
        .prefix(".attache-copy-")
        .tempfile_in(out_dir)
        .map_err(io)?;
    let mut src = std::fs::File::open(from).map_err(io)?;
    std::io::copy(&mut src, &mut tmp.as_file()).map_err(io)?;
    // Store files are read-only; the copy is the user's, like a packed one.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(io)?;
    tmp.persist(to).map_err(|e| io(e.error))?;
    Ok(())
}

/// The builder of portableService's `nix build` (`attache pack-spec`): the
/// spec file and its closure as Nix hands them over, checked and packed as
/// `attache build` packs them with no options given.
pub fn pack_spec_file(
    spec_file: &Path,
    closure_graph: &Path,
    out_dir: &Path,
    ui: &Ui,
) -> Result<image::Image, Error> {
    let graph = std::fs::read_to_string(closure_graph)
        .map_err(|e| Error::io(format!("reading {}", closure_graph.display()), e))?;
    let closure = parse_references_graph(&graph)?;
    let (spec, hints) = from_nix::from_spec_file(spec_file, closure, &Naming::default())?;
    let Ready { spec, opts } = ready(spec, &hints, &PackChoice::default())?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io(format!("creating {}", out_dir.display()), e))?;
    ui.status(
        "Packing",
        format!(
            "{} ({})",
            ImageFile::new(&spec.name, &spec.version).file_name(),
            opts.compression
        ),
    );
    pack_with_progress(&spec, &opts, out_dir, ui)
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

    /// nixpkgs' layout (a directory with one `.raw`) or a bare squashfs
    /// file is an image; a spec file or a package is not.
    #[test]
    fn prebuilt_images_are_told_apart_from_specs_and_packages() {
        let d = tempfile::tempdir().unwrap();
        let nixpkgs = d.path().join("nixpkgs");
        std::fs::create_dir(&nixpkgs).unwrap();
        std::fs::write(nixpkgs.join("demo_1.0.raw"), b"hsqs and the rest").unwrap();
        assert_eq!(prebuilt_image(&nixpkgs), Some(nixpkgs.join("demo_1.0.raw")));
        let bare = nixpkgs.join("demo_1.0.raw");
        assert_eq!(prebuilt_image(&bare), Some(bare.clone()));

        let spec = d.path().join("attache-spec-demo-1.0.json");
        std::fs::write(&spec, br#"{"attacheSpec":1}"#).unwrap();
        assert_eq!(prebuilt_image(&spec), None);
        let package = d.path().join("package");
        std::fs::create_dir_all(package.join("lib/systemd/system")).unwrap();
        std::fs::write(package.join("demo_1.0.raw"), b"hsqs").unwrap();
        assert_eq!(prebuilt_image(&package), None);
    }

    /// `--level 99 --compression zstd` needs no Nix to be refused.
    #[test]
    fn a_bad_command_line_level_is_refused_before_nix() {
        let choice = |compression, level| PackChoice {
            compression,
            level: Some(level),
            block_size: None,
        };
        let e = choice(Some(Compression::Zstd), 99).check().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--level 99 is out of range for zstd: use 1..=22"
        );
        let e = choice(None, 99).check().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--level 99 is out of range for every compressor (zstd 1..=22, xz 0..=9, gzip 1..=9)"
        );
        // Without --compression, 15 may still fit the spec's compressor.
        assert_eq!(choice(None, 15).check(), Ok(()));
        assert_eq!(choice(Some(Compression::Xz), 0).check(), Ok(()));
        assert!(choice(Some(Compression::Gzip), 0).check().is_err());

        // build_image refuses it before evaluating: a nix that does not
        // exist is never reached.
        let src = Source::new(
            Installable::Flake(".#demo".into()),
            "/nonexistent/nix".into(),
            Vec::new(),
        );
        let (ui, _, _) =
            crate::ui::capture::ui(crate::ui::capture::settings(crate::ui::Verbosity::Quiet));
        let dir = tempfile::tempdir().unwrap();
        let e = build_image(
            &src,
            &choice(Some(Compression::Zstd), 99),
            dir.path(),
            false,
            &ui,
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Level(LevelError::Chosen { .. })),
            "{e:?}"
        );
        assert_eq!(e.exit_code(), crate::error::ExitCode::BadInput);
    }

    /// When the compressor or the level comes from the spec, the check
    /// runs on the options packing would use, and says where they came from.
    #[test]
    fn a_level_the_spec_makes_wrong_is_refused_before_packing() {
        let check = |choice: PackChoice, hints: PackHints| {
            let opts = pack_options(&choice, &hints);
            check_pack_options(&choice, &hints, &opts)
        };
        let xz = PackHints {
            compression: Some(Compression::Xz),
            ..PackHints::default()
        };
        let level = |l| PackChoice {
            level: Some(l),
            ..PackChoice::default()
        };
        let e = check(level(15), xz.clone()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--level 15 is out of range for xz, the compressor the spec's squash-compression asks for: use 0..=9, or pass --compression"
        );
        assert_eq!(check(level(7), xz.clone()), Ok(()));
        let e = check(level(0), PackHints::default()).unwrap_err();
        assert!(
            matches!(
                e,
                LevelError::Implied {
                    from_spec: false,
                    ..
                }
            ),
            "{e:?}"
        );
        let zstd30 = PackHints {
            compression: Some(Compression::Zstd),
            level: Some(30),
            block_size: None,
        };
        let e = check(PackChoice::default(), zstd30.clone()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the spec's squash-compression asks for zstd level 30, which is out of range: use 1..=22 (fix squash-compression, or pass --level)"
        );
        // Another compressor on the command line leaves the spec's level behind.
        let gzip = PackChoice {
            compression: Some(Compression::Gzip),
            ..PackChoice::default()
        };
        assert_eq!(check(gzip, zstd30.clone()), Ok(()));
        assert_eq!(check(level(19), zstd30), Ok(()));
    }
}
