//! From what Nix built to an [`ImageSpec`]: the one place that knows the
//! spec file `portableService` writes (`nix/portable-service.nix`) and the
//! zero-config rule for plain packages with unit files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{os_release, ImageSpec, OsReleaseInput, Symlink, UnitFile};
use crate::image::Compression;
use crate::names::{unit_matches_prefix, unit_suffix};
use crate::nix::Described;

/// The command line's name and version for the image; `None` takes the
/// derivation's.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Naming {
    pub name: Option<String>,
    pub version: Option<String>,
}

/// What Nix built cannot be read as an image.
#[derive(Debug, thiserror::Error)]
pub enum FromNixError {
    #[error("reading {path}: {source}", path = .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a file but not an attache spec ({reason}): build the result of attache's portableService, or a package with unit files", path = .path.display())]
    NotASpec { path: PathBuf, reason: String },
    #[error("{path} is an attache spec of schema {found}, but this attache ({ours}) reads only schema {SPEC_SCHEMA}: upgrade attache to the release that goes with the attache Nix library that wrote it", path = .path.display(), ours = env!("CARGO_PKG_VERSION"))]
    Schema { path: PathBuf, found: u32 },
    #[error("{path} has no unit files in lib/systemd/system or etc/systemd/system: wrap it with attache's portableService and list its units", path = .path.display())]
    NoUnits { path: PathBuf },
    /// Unit files are there, but none of a kind portabled attaches: naming
    /// them beats "no unit files", which the user can see is not true.
    #[error("{path} has no unit portabled would attach: portabled attaches .service, .socket, .target, .timer and .path units; {} ignored", ignored_list(.ignored), path = .path.display())]
    OnlyIgnoredUnits { path: PathBuf, ignored: Vec<String> },
    #[error("squash-compression '{value}' uses a compressor attache does not write: use zstd, xz or gzip, or pass --compression")]
    Compressor { value: String },
    #[error("squash-block-size: {0}")]
    BlockSize(String),
}

/// The spec file schema this attache reads: `attacheSpec` in
/// `nix/portable-service.nix`, raised when the file changes meaning.
pub const SPEC_SCHEMA: u32 = 1;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Schema {
    attache_spec: u32,
}

/// The JSON file written by `portableService` in `nix/portable-service.nix`
/// (its `attacheSpec` is read first, as [`Schema`]).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NixSpec {
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

/// Reads the spec file `portableService` built at `out`.
pub fn from_spec_file(
    out: &Path,
    closure: Vec<PathBuf>,
    wanted: &Naming,
) -> Result<(ImageSpec, PackHints), FromNixError> {
    let text = std::fs::read(out).map_err(|source| FromNixError::Read {
        path: out.to_owned(),
        source,
    })?;
    let not_a_spec = |e: serde_json::Error| FromNixError::NotASpec {
        path: out.to_owned(),
        reason: e.to_string(),
    };
    // The schema first: a newer schema may not parse as this one at all, and
    // "upgrade attache" helps more than a serde message.
    let schema: Schema = serde_json::from_slice(&text).map_err(not_a_spec)?;
    if schema.attache_spec != SPEC_SCHEMA {
        return Err(FromNixError::Schema {
            path: out.to_owned(),
            found: schema.attache_spec,
        });
    }
    let ns: NixSpec = serde_json::from_slice(&text).map_err(not_a_spec)?;
    let name = wanted.name.clone().or(ns.pname.clone()).unwrap_or_default();
    let version = wanted
        .version
        .clone()
        .or(ns.version.clone())
        .unwrap_or_default();
    // The spec file itself is bookkeeping, not image content.
    let store_paths: Vec<PathBuf> = closure.into_iter().filter(|p| p != out).collect();
    let os_release = os_release(&OsReleaseInput {
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
pub fn from_package(
    out: &Path,
    d: &Described,
    closure: Vec<PathBuf>,
    wanted: &Naming,
) -> Result<(ImageSpec, Vec<String>), FromNixError> {
    let (guess_name, guess_version) = split_name(d.name.as_deref().unwrap_or(""));
    let name = wanted
        .name
        .clone()
        .or(d.pname.clone())
        .unwrap_or(guess_name);
    let version = wanted
        .version
        .clone()
        .or(d.version.clone())
        .unwrap_or(guess_version);
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut ignored = std::collections::BTreeSet::new();
    for dir in ["lib/systemd/system", "etc/systemd/system"] {
        let Ok(rd) = std::fs::read_dir(out.join(dir)) else {
            continue;
        };
        for entry in rd.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if unit_suffix(&file_name).is_some() {
                found.entry(file_name).or_insert(entry.path());
            } else if is_systemd_unit_name(&file_name) {
                ignored.insert(file_name);
            }
        }
    }
    if found.is_empty() {
        if !ignored.is_empty() {
            return Err(FromNixError::OnlyIgnoredUnits {
                path: out.to_owned(),
                ignored: ignored.into_iter().collect(),
            });
        }
        return Err(FromNixError::NoUnits {
            path: out.to_owned(),
        });
    }
    let prefix = name.clone();
    let (matching, skipped): (Vec<_>, Vec<_>) = found
        .into_iter()
        .partition(|(n, _)| unit_matches_prefix(n, &prefix));
    let (units, skipped) = if matching.is_empty() {
        (skipped, Vec::new())
    } else {
        (matching, skipped.into_iter().map(|(n, _)| n).collect())
    };
    let extra = BTreeMap::new();
    let os_release = os_release(&OsReleaseInput {
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

/// systemd's other unit types: files a user means as units, which
/// portabled skips. Drop-in directories and `.wants` links are not named,
/// they are not units of their own.
fn is_systemd_unit_name(file_name: &str) -> bool {
    [
        ".mount",
        ".automount",
        ".swap",
        ".device",
        ".slice",
        ".scope",
    ]
    .iter()
    .any(|s| file_name.len() > s.len() && file_name.ends_with(s))
}

/// `a.mount is`, `a.mount and b.swap are`, `a, b and c are`.
fn ignored_list(names: &[String]) -> String {
    match names {
        [one] => format!("{one} is"),
        [init @ .., last] => format!("{} and {last} are", init.join(", ")),
        [] => "nothing is".to_owned(),
    }
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
fn parse_hints(
    compression: Option<&str>,
    block_size: Option<&serde_json::Value>,
) -> Result<PackHints, FromNixError> {
    let mut hints = PackHints::default();
    if let Some(c) = compression {
        let mut words = c.split_whitespace();
        if let Some(algo) = words.next() {
            hints.compression =
                Some(
                    algo.parse::<Compression>()
                        .map_err(|_| FromNixError::Compressor {
                            value: c.to_owned(),
                        })?,
                );
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
        hints.block_size = Some(parse_block_size(&s).map_err(FromNixError::BlockSize)?);
    }
    Ok(hints)
}

/// Parses `4096`, `128K`, `1M` (nixpkgs' `squash-block-size`, and
/// `--block-size`): a power of two between 4 KiB and 1 MiB, the range
/// squashfs allows.
pub fn parse_block_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1024u64),
        Some('M') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size: use e.g. 128K or 1M"))?;
    let bytes = n * mult;
    if !(4096..=1024 * 1024).contains(&bytes) || !bytes.is_power_of_two() {
        return Err(format!(
            "block size '{s}' must be a power of two from 4K to 1M"
        ));
    }
    Ok(bytes as u32)
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
    fn nix_name_split() {
        assert_eq!(
            split_name("hello-2.12.1"),
            ("hello".into(), "2.12.1".into())
        );
        assert_eq!(split_name("my-app-1.0"), ("my-app".into(), "1.0".into()));
        assert_eq!(split_name("plain"), ("plain".into(), String::new()));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_block_size("1M"), Ok(1 << 20));
        assert_eq!(parse_block_size("4096"), Ok(4096));
        assert!(parse_block_size("3K").is_err());
        assert!(parse_block_size("2M").is_err());
        assert!(parse_block_size("x").is_err());
    }

    /// A package whose only unit is a mount: the error says which units
    /// portabled attaches and names the one it ignores.
    #[test]
    fn a_package_with_only_ignored_units_is_told_which() {
        let d = tempfile::tempdir().unwrap();
        let units = d.path().join("lib/systemd/system");
        std::fs::create_dir_all(units.join("shop.service.d")).unwrap();
        std::fs::write(units.join("shop.mount"), "[Mount]\n").unwrap();
        let described: Described = serde_json::from_value(
            json!({ "derivation": true, "pname": "shop", "version": "1.0" }),
        )
        .unwrap();
        let e = from_package(d.path(), &described, Vec::new(), &Naming::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} has no unit portabled would attach: portabled attaches .service, .socket, .target, .timer and .path units; shop.mount is ignored",
                d.path().display()
            )
        );
        let etc = d.path().join("etc/systemd/system");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("shop.automount"), "[Automount]\n").unwrap();
        let e = from_package(d.path(), &described, Vec::new(), &Naming::default()).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("; shop.automount and shop.mount are ignored"),
            "{e}"
        );

        let empty = tempfile::tempdir().unwrap();
        let e = from_package(empty.path(), &described, Vec::new(), &Naming::default()).unwrap_err();
        assert!(matches!(e, FromNixError::NoUnits { .. }), "{e:?}");
    }

    #[test]
    fn unknown_spec_schema_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("spec.json");
        let read = |schema: u32| {
            let text = json!({ "attacheSpec": schema, "pname": "demo", "version": "1.0" });
            std::fs::write(&file, text.to_string()).unwrap();
            from_spec_file(&file, Vec::new(), &Naming::default())
        };
        let (spec, _) = read(SPEC_SCHEMA).unwrap();
        assert_eq!(spec.name, "demo");
        let e = read(SPEC_SCHEMA + 1).unwrap_err();
        assert!(matches!(e, FromNixError::Schema { found: 2, .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("reads only schema 1: upgrade attache"),
            "{e}"
        );
        // A newer schema is refused for its number, whatever its fields.
        std::fs::write(&file, r#"{"attacheSpec": 2, "units": "changed"}"#).unwrap();
        assert!(matches!(
            from_spec_file(&file, Vec::new(), &Naming::default()),
            Err(FromNixError::Schema { .. })
        ));
    }
}
