//! What goes into a portable image, as plain data, and portabled's rules for it.
//!
//! [`from_nix`] turns what Nix built into an [`ImageSpec`]; `validate` checks
//! it against what systemd-portabled accepts (its names are in
//! `crate::names`) so that `image` only ever packs something
//! `portablectl attach` takes first time.

pub mod from_nix;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::names::unit_matches_prefix;

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

/// A spec that portabled would refuse, or that cannot be packed faithfully.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("the image has no name: set `pname` in portableService, or pass --name")]
    EmptyName,
    #[error("image name '{name}' contains '_': portabled cuts the file name at the first '_' to find the unit prefix, so the units would have to start with '{cut}'. Rename it, e.g. '{suggestion}'")]
    NameWithUnderscore {
        name: String,
        cut: String,
        suggestion: String,
    },
    #[error("image name '{name}' may only use letters, digits, '-' and '.', and must start with a letter or digit: rename it")]
    BadName { name: String },
    #[error(
        "image '{name}' has an empty version: set `version` in portableService, or pass --version"
    )]
    EmptyVersion { name: String },
    #[error("version '{version}' of image '{name}' may only use letters, digits and '.', '+', '~', '-', '_', and must start with a letter or digit: pass e.g. --version 1.0")]
    BadVersion { name: String, version: String },
    #[error("image '{name}' has no units: portabled refuses images without a unit file. Add a unit to `units`, e.g. {name}.service")]
    NoUnits { name: String },
    #[error("unit '{unit}' has a suffix portabled ignores: use one of .service, .socket, .target, .timer, .path")]
    UnitSuffix { unit: String },
    #[error("unit '{unit}' does not match the image's prefix '{prefix}', so portabled would refuse it: name it {examples}")]
    UnitPrefix {
        unit: String,
        prefix: String,
        examples: String,
    },
    #[error("unit '{unit}' is refused: {UNIT_NAME_RULE}")]
    UnitNotPlain { unit: String },
    #[error("unit '{unit}' appears twice: give each unit a distinct file name")]
    DuplicateUnit { unit: String },
    #[error("unit '{unit}' ({source_path}) is not a regular file: a unit must be a file, not a directory or a dangling link")]
    UnitNotAFile { unit: String, source_path: String },
    #[error("unit '{unit}' ({source_path}) is empty: portabled ignores empty unit files")]
    UnitEmpty { unit: String, source_path: String },
    #[error("symlink '{path}' is refused: {SYMLINK_PATH_RULE}")]
    SymlinkPath { path: String },
    #[error("symlink '{path}' has a target of {len} bytes; squashfs images written by attache allow at most 255: shorten it")]
    SymlinkTooLong { path: String, len: usize },
    #[error("symlink '{path}' -> '{target}' points outside the image: use an absolute target inside the image, such as a /nix/store path")]
    SymlinkEscapes { path: String, target: String },
    #[error("symlink '{path}' -> '{target}' points into a store path that is not in the image's closure: add it to `contents`, or reference it from a unit")]
    SymlinkDangling { path: String, target: String },
    #[error("os-release of image '{name}' has an empty ID=: portabled refuses it; set `id` (default \"nixos\")")]
    NoOsReleaseId { name: String },
}

/// Checks a spec against every rule portabled enforces (systemd 239-257) and
/// the limits of the packer, in the order a user would want to fix them.
pub fn validate(spec: &ImageSpec) -> Result<(), SpecError> {
    validate_name(&spec.name)?;
    validate_version(&spec.name, &spec.version)?;
    if spec
        .os_release
        .get("ID")
        .is_none_or(|v| v.trim().is_empty())
    {
        return Err(SpecError::NoOsReleaseId {
            name: spec.name.clone(),
        });
    }
    if spec.units.is_empty() {
        return Err(SpecError::NoUnits {
            name: spec.name.clone(),
        });
    }
    let prefixes = portable_prefixes(spec);
    let mut seen = std::collections::BTreeSet::new();
    for unit in &spec.units {
        if !seen.insert(unit.name.as_str()) {
            return Err(SpecError::DuplicateUnit {
                unit: unit.name.clone(),
            });
        }
        validate_unit_name(&unit.name, &prefixes)?;
        let source_path = unit.source.display().to_string();
        match std::fs::metadata(&unit.source) {
            Ok(m) if m.is_file() && m.len() == 0 => {
                return Err(SpecError::UnitEmpty {
                    unit: unit.name.clone(),
                    source_path,
                })
            }
            Ok(m) if m.is_file() => {}
            _ => {
                return Err(SpecError::UnitNotAFile {
                    unit: unit.name.clone(),
                    source_path,
                })
            }
        }
    }
    for link in &spec.symlinks {
        validate_symlink(link, &spec.store_paths)?;
    }
    Ok(())
}

/// Declares the stems of the image's own units as its `PORTABLE_PREFIXES`
/// when the user declared none. With the image name as prefix, portabled
/// would match another service's units too (`shop` matches
/// `shop-admin-web.service`); with the stems, attach, reattach and detach
/// touch this image's units only. Call after [`validate`], which holds the
/// units to the image name.
pub fn declare_unit_prefixes(spec: &mut ImageSpec) {
    if spec.os_release.contains_key("PORTABLE_PREFIXES") {
        return;
    }
    let stems = crate::names::unit_prefixes(spec.units.iter().map(|u| u.name.as_str()));
    spec.os_release
        .insert("PORTABLE_PREFIXES".into(), stems.join(" "));
}

/// The prefixes units must start with: `PORTABLE_PREFIXES=` when set, else
/// the image name.
pub fn portable_prefixes(spec: &ImageSpec) -> Vec<String> {
    crate::names::portable_prefixes(
        spec.os_release.get("PORTABLE_PREFIXES").map(String::as_str),
        &spec.name,
    )
}

pub fn validate_name(name: &str) -> Result<(), SpecError> {
    if name.is_empty() {
        return Err(SpecError::EmptyName);
    }
    if let Some((cut, _)) = name.split_once('_') {
        return Err(SpecError::NameWithUnderscore {
            name: name.to_owned(),
            cut: cut.to_owned(),
            suggestion: name.replace('_', "-"),
        });
    }
    let ok_start = name.starts_with(|c: char| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ok_start || !ok_chars || name.len() > 200 {
        return Err(SpecError::BadName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

pub fn validate_version(name: &str, version: &str) -> Result<(), SpecError> {
    if version.trim().is_empty() {
        return Err(SpecError::EmptyVersion {
            name: name.to_owned(),
        });
    }
    let ok_start = version.starts_with(|c: char| c.is_ascii_alphanumeric());
    let ok_chars = version
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ".+~-_".contains(c));
    if !ok_start || !ok_chars || version.len() > 100 {
        return Err(SpecError::BadVersion {
            name: name.to_owned(),
            version: version.to_owned(),
        });
    }
    Ok(())
}

/// What a unit's name must be, said once for spec and packer alike.
pub const UNIT_NAME_RULE: &str = "a unit name must be a plain file name such as demo.service";

/// A unit is copied to `etc/systemd/system/NAME`: a name, not a path.
pub fn unit_name_is_plain(name: &str) -> bool {
    !(name.is_empty() || name.contains('/') || name.contains('\0') || name.starts_with('.'))
}

pub fn validate_unit_name(unit: &str, prefixes: &[String]) -> Result<(), SpecError> {
    if !unit_name_is_plain(unit) {
        return Err(SpecError::UnitNotPlain {
            unit: unit.to_owned(),
        });
    }
    let Some(suffix) = crate::names::unit_suffix(unit) else {
        return Err(SpecError::UnitSuffix {
            unit: unit.to_owned(),
        });
    };
    if prefixes.iter().any(|p| unit_matches_prefix(unit, p)) {
        return Ok(());
    }
    let prefix = prefixes.first().cloned().unwrap_or_default();
    let stem = unit.strip_suffix(suffix).unwrap_or(unit);
    let examples = format!(
        "'{prefix}{suffix}', '{prefix}-{stem}{suffix}' or '{prefix}@{suffix}' (any name that is the prefix, or starts with '{prefix}-', '{prefix}.' or '{prefix}@')"
    );
    Err(SpecError::UnitPrefix {
        unit: unit.to_owned(),
        prefix,
        examples,
    })
}

/// The one wording of [`symlink_path_ok`], for the spec's check and the
/// packer's.
pub const SYMLINK_PATH_RULE: &str = "a symlink's path must be absolute, name something below / and outside /nix/store (which holds the closure), and have no '.', '..' or empty components, e.g. /etc/ssl";

/// Where a spec's symlink may be put in the image. Empty components (`//`, a
/// trailing `/`) are refused rather than folded, so the path written is the
/// path the user wrote.
pub fn symlink_path_ok(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    !rest.is_empty()
        && rest.split('/').all(|c| !matches!(c, "" | "." | ".."))
        && rest != "nix/store"
        && !rest.starts_with("nix/store/")
}

fn validate_symlink(link: &Symlink, store_paths: &[PathBuf]) -> Result<(), SpecError> {
    if !symlink_path_ok(&link.path) {
        return Err(SpecError::SymlinkPath {
            path: link.path.clone(),
        });
    }
    if link.target.len() >= 256 {
        return Err(SpecError::SymlinkTooLong {
            path: link.path.clone(),
            len: link.target.len(),
        });
    }
    // Resolve the target lexically inside the image: climbing above the
    // image root means the link leaves the image.
    let mut stack: Vec<&str> = if link.target.starts_with('/') {
        Vec::new()
    } else {
        link.path
            .trim_start_matches('/')
            .split('/')
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, parent)| parent.to_vec())
            .unwrap_or_default()
    };
    for c in link.target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return Err(SpecError::SymlinkEscapes {
                        path: link.path.clone(),
                        target: link.target.clone(),
                    });
                }
            }
            c => stack.push(c),
        }
    }
    if stack.len() >= 3 && stack[0] == "nix" && stack[1] == "store" {
        let top = PathBuf::from(format!("/nix/store/{}", stack[2]));
        if !store_paths.contains(&top) {
            return Err(SpecError::SymlinkDangling {
                path: link.path.clone(),
                target: link.target.clone(),
            });
        }
    }
    Ok(())
}

/// Describes the image for `os-release`; what the user set in `osRelease`
/// wins over these defaults.
pub struct OsReleaseInput<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub description: Option<&'a str>,
    pub homepage: Option<&'a str>,
    pub id: Option<&'a str>,
    pub prefixes: Option<&'a [String]>,
    pub extra: &'a BTreeMap<String, String>,
}

pub fn os_release(input: &OsReleaseInput<'_>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let id = input.id.filter(|s| !s.is_empty()).unwrap_or("nixos");
    let pretty = input.description.filter(|s| !s.is_empty());
    m.insert("ID".into(), id.into());
    m.insert("VERSION_ID".into(), input.version.into());
    m.insert(
        "PRETTY_NAME".into(),
        format!("{} {}", pretty.unwrap_or(input.name), input.version),
    );
    m.insert("PORTABLE_ID".into(), input.name.into());
    m.insert(
        "PORTABLE_PRETTY_NAME".into(),
        pretty.unwrap_or(input.name).into(),
    );
    // Left out by default: `declare_unit_prefixes` fills it in once the
    // units are known and checked against the image name.
    if let Some(p) = input.prefixes.filter(|p| !p.is_empty()) {
        m.insert("PORTABLE_PREFIXES".into(), p.join(" "));
    }
    m.insert("IMAGE_ID".into(), input.name.into());
    m.insert("IMAGE_VERSION".into(), input.version.into());
    if let Some(h) = input.homepage.filter(|s| !s.is_empty()) {
        m.insert("HOME_URL".into(), h.into());
    }
    for (k, v) in input.extra {
        m.insert(k.clone(), v.clone());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_units(dir: &std::path::Path, units: &[&str]) -> ImageSpec {
        let units = units
            .iter()
            .map(|u| {
                let p = dir.join(u);
                std::fs::write(&p, "[Service]\nExecStart=/bin/true\n").unwrap();
                UnitFile {
                    name: (*u).to_owned(),
                    source: p,
                }
            })
            .collect();
        let extra = BTreeMap::new();
        ImageSpec {
            name: "demo".into(),
            version: "1.0".into(),
            units,
            symlinks: vec![],
            store_paths: vec![PathBuf::from("/nix/store/aaa-busybox")],
            os_release: os_release(&OsReleaseInput {
                name: "demo",
                version: "1.0",
                description: None,
                homepage: None,
                id: None,
                prefixes: None,
                extra: &extra,
            }),
        }
    }

    #[test]
    fn good_spec_passes() {
        let d = tempfile::tempdir().unwrap();
        let s = spec_with_units(
            d.path(),
            &["demo.service", "demo-tick.timer", "demo-tick.service"],
        );
        validate(&s).unwrap();
    }

    #[test]
    fn name_with_underscore_is_explained() {
        let e = validate_name("bad_name").unwrap_err();
        assert_eq!(
            e.to_string(),
            "image name 'bad_name' contains '_': portabled cuts the file name at the first '_' to find the unit prefix, so the units would have to start with 'bad'. Rename it, e.g. 'bad-name'"
        );
    }

    #[test]
    fn odd_names_and_versions() {
        assert!(matches!(validate_name(""), Err(SpecError::EmptyName)));
        assert!(matches!(
            validate_name("-x"),
            Err(SpecError::BadName { .. })
        ));
        assert!(matches!(
            validate_name("a/b"),
            Err(SpecError::BadName { .. })
        ));
        assert!(matches!(
            validate_version("d", ""),
            Err(SpecError::EmptyVersion { .. })
        ));
        assert!(matches!(
            validate_version("d", "1 0"),
            Err(SpecError::BadVersion { .. })
        ));
        assert!(matches!(
            validate_version("d", ".1"),
            Err(SpecError::BadVersion { .. })
        ));
        validate_version("d", "1.0-rc1+git~2").unwrap();
    }

    #[test]
    fn unit_rules() {
        let prefixes = ["demo".to_owned()];
        assert_eq!(
            validate_unit_name("demo-/x.service", &prefixes)
                .unwrap_err()
                .to_string(),
            format!("unit 'demo-/x.service' is refused: {UNIT_NAME_RULE}")
        );
        let d = tempfile::tempdir().unwrap();
        let s = spec_with_units(d.path(), &["other.service"]);
        let e = validate(&s).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("unit 'other.service' does not match the image's prefix 'demo'"),
            "{e}"
        );
        assert!(e.to_string().contains("'demo-other.service'"), "{e}");

        let s = spec_with_units(d.path(), &["demo.conf"]);
        assert!(matches!(validate(&s), Err(SpecError::UnitSuffix { .. })));

        let s = spec_with_units(d.path(), &[]);
        assert!(matches!(validate(&s), Err(SpecError::NoUnits { .. })));

        let mut s = spec_with_units(d.path(), &["demo.service"]);
        std::fs::write(&s.units[0].source, "").unwrap();
        assert!(matches!(validate(&s), Err(SpecError::UnitEmpty { .. })));
        s.units[0].source = d.path().to_owned();
        assert!(matches!(validate(&s), Err(SpecError::UnitNotAFile { .. })));
        s.units[0].source = d.path().join("missing");
        assert!(matches!(validate(&s), Err(SpecError::UnitNotAFile { .. })));
    }

    #[test]
    fn portable_prefixes_widen_the_rule() {
        let d = tempfile::tempdir().unwrap();
        let mut s = spec_with_units(d.path(), &["web.service"]);
        s.os_release
            .insert("PORTABLE_PREFIXES".into(), "demo web".into());
        validate(&s).unwrap();
    }

    #[test]
    fn symlink_rules() {
        let store = vec![PathBuf::from("/nix/store/aaa-busybox")];
        let l = |p: &str, t: &str| Symlink {
            path: p.into(),
            target: t.into(),
        };
        validate_symlink(&l("/bin/sh", "/nix/store/aaa-busybox/bin/sh"), &store).unwrap();
        validate_symlink(&l("/etc/ssl", "../nix/store/aaa-busybox"), &store).unwrap();
        assert!(matches!(
            validate_symlink(&l("bin/sh", "/x"), &store),
            Err(SpecError::SymlinkPath { .. })
        ));
        assert!(matches!(
            validate_symlink(&l("/a/../b", "/x"), &store),
            Err(SpecError::SymlinkPath { .. })
        ));
        assert!(matches!(
            validate_symlink(&l("/etc/x", "../../../etc/passwd"), &store),
            Err(SpecError::SymlinkEscapes { .. })
        ));
        assert!(matches!(
            validate_symlink(&l("/bin/sh", "/nix/store/zzz-other/bin/sh"), &store),
            Err(SpecError::SymlinkDangling { .. })
        ));
        let long = format!("/nix/store/aaa-busybox/{}", "x".repeat(240));
        assert!(matches!(
            validate_symlink(&l("/bin/sh", &long), &store),
            Err(SpecError::SymlinkTooLong { len: 263, .. })
        ));
    }

    #[test]
    fn symlink_paths_take_no_empty_components() {
        for ok in ["/etc/ssl", "/a/b/c", "/nix", "/nix/storex"] {
            assert!(symlink_path_ok(ok), "{ok}");
        }
        for bad in [
            "/etc//ssl",
            "//etc/ssl",
            "/etc/ssl/",
            "//",
            "/",
            "",
            "etc/ssl",
            "/etc/./ssl",
            "/etc/../ssl",
            "/nix/store",
            "/nix/store/aaa-busybox/x",
        ] {
            assert!(!symlink_path_ok(bad), "{bad}");
        }
        let store = vec![PathBuf::from("/nix/store/aaa-busybox")];
        let link = Symlink {
            path: "/etc//ssl".into(),
            target: "/nix/store/aaa-busybox/etc/ssl".into(),
        };
        let e = validate_symlink(&link, &store).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("symlink '/etc//ssl' is refused: {SYMLINK_PATH_RULE}")
        );
    }

    #[test]
    fn os_release_defaults_and_overrides() {
        let mut extra = BTreeMap::new();
        extra.insert("ID".to_owned(), "debian".to_owned());
        let m = os_release(&OsReleaseInput {
            name: "demo",
            version: "1.0",
            description: Some("Demo web server"),
            homepage: Some("https://example.org"),
            id: None,
            prefixes: None,
            extra: &extra,
        });
        assert_eq!(m["ID"], "debian");
        assert!(!m.contains_key("PORTABLE_PREFIXES"));
        assert_eq!(m["PORTABLE_PRETTY_NAME"], "Demo web server");
        assert_eq!(m["PRETTY_NAME"], "Demo web server 1.0");
        assert_eq!(m["VERSION_ID"], "1.0");
        assert_eq!(m["HOME_URL"], "https://example.org");
    }
}
