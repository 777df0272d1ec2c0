//! What changes between two images, from their manifests: packages added,
//! removed, upgraded or rebuilt, with NAR size deltas, like `nix store
//! diff-closures`; and units added, removed or changed. Pure: `attache
//! diff` and `deploy --dry-run` feed it manifests from images and hosts.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::image::{Manifest, StorePath};

/// The difference between two images (either may be missing: nothing
/// attached yet, or nothing to deploy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClosureDiff {
    /// Image file names, `None` for no image.
    pub old: Option<String>,
    pub new: Option<String>,
    /// Sorted by package name.
    pub packages: Vec<PackageChange>,
    pub units: Vec<UnitChange>,
    /// Sum of the NAR sizes of each side's store paths.
    pub old_size: u64,
    pub new_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageChange {
    /// The store path's name without hash and version (`openssl`).
    pub name: String,
    /// Versions on each side, sorted; empty when the package is absent
    /// there; `""` for a path without a version.
    pub old_versions: Vec<String>,
    pub new_versions: Vec<String>,
    /// The store paths of this package only one side has.
    pub removed: Vec<StorePath>,
    pub added: Vec<StorePath>,
    pub size_delta: i64,
}

impl PackageChange {
    /// Same versions on both sides, other store paths: rebuilt.
    pub fn rebuilt(&self) -> bool {
        self.old_versions == self.new_versions
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitChange {
    pub name: String,
    pub change: Change,
}

impl ClosureDiff {
    /// Nothing in the closure nor the units differs.
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty() && self.units.is_empty()
    }

    pub fn size_delta(&self) -> i64 {
        self.new_size as i64 - self.old_size as i64
    }
}

/// `HASH-name-1.2` -> (`name`, `1.2`), the way Nix splits a derivation
/// name: the version starts at the first `-` not followed by a letter.
pub fn split_name(store_path: &str) -> (String, String) {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    let name = match base.split_once('-') {
        Some((hash, rest)) if hash.len() == 32 => rest,
        _ => base,
    };
    let bytes = name.as_bytes();
    for i in 0..bytes.len() {
        if bytes[i] == b'-' && bytes.get(i + 1).is_some_and(|c| !c.is_ascii_alphabetic()) {
            return (name[..i].to_owned(), name[i + 1..].to_owned());
        }
    }
    (name.to_owned(), String::new())
}

/// Compares two manifests.
pub fn diff(old: Option<&Manifest>, new: Option<&Manifest>) -> ClosureDiff {
    let paths = |m: Option<&Manifest>| -> BTreeMap<String, StorePath> {
        m.map(|m| {
            m.store_paths
                .iter()
                .map(|p| (p.path.clone(), p.clone()))
                .collect()
        })
        .unwrap_or_default()
    };
    let (a, b) = (paths(old), paths(new));
    // package -> (old paths, new paths)
    let mut by_name: BTreeMap<String, (Vec<&StorePath>, Vec<&StorePath>)> = BTreeMap::new();
    for p in a.values() {
        by_name.entry(split_name(&p.path).0).or_default().0.push(p);
    }
    for p in b.values() {
        by_name.entry(split_name(&p.path).0).or_default().1.push(p);
    }
    let mut packages = Vec::new();
    for (name, (olds, news)) in by_name {
        let removed: Vec<StorePath> = olds
            .iter()
            .filter(|p| !b.contains_key(&p.path))
            .map(|p| (*p).clone())
            .collect();
        let added: Vec<StorePath> = news
            .iter()
            .filter(|p| !a.contains_key(&p.path))
            .map(|p| (*p).clone())
            .collect();
        if removed.is_empty() && added.is_empty() {
            continue;
        }
        let versions = |v: &[&StorePath]| -> Vec<String> {
            let set: BTreeSet<String> = v.iter().map(|p| split_name(&p.path).1).collect();
            set.into_iter().collect()
        };
        let sum = |v: &[StorePath]| v.iter().map(|p| p.nar_size as i64).sum::<i64>();
        packages.push(PackageChange {
            name,
            old_versions: versions(&olds),
            new_versions: versions(&news),
            size_delta: sum(&added) - sum(&removed),
            removed,
            added,
        });
    }
    let units_of = |m: Option<&Manifest>| -> BTreeMap<String, String> {
        m.map(|m| {
            m.units
                .iter()
                .map(|u| (u.name.clone(), u.sha256.clone()))
                .collect()
        })
        .unwrap_or_default()
    };
    let (ua, ub) = (units_of(old), units_of(new));
    let names: BTreeSet<&String> = ua.keys().chain(ub.keys()).collect();
    let units = names
        .into_iter()
        .filter_map(|n| {
            let change = match (ua.get(n), ub.get(n)) {
                (None, Some(_)) => Change::Added,
                (Some(_), None) => Change::Removed,
                (Some(x), Some(y)) if x != y => Change::Changed,
                _ => return None,
            };
            Some(UnitChange {
                name: n.clone(),
                change,
            })
        })
        .collect();
    ClosureDiff {
        old: old.map(Manifest::file_name),
        new: new.map(Manifest::file_name),
        packages,
        units,
        old_size: old.map_or(0, Manifest::nar_size),
        new_size: new.map_or(0, Manifest::nar_size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ManifestUnit;

    const H: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    fn manifest(version: &str, paths: &[(&str, u64)], unit_sha: &str) -> Manifest {
        Manifest {
            attache_manifest: 1,
            name: "shop".into(),
            version: version.into(),
            os_release: BTreeMap::new(),
            units: vec![ManifestUnit {
                name: "shop-web.service".into(),
                sha256: unit_sha.into(),
            }],
            symlinks: Vec::new(),
            store_paths: paths
                .iter()
                .map(|(p, s)| StorePath {
                    path: format!("/nix/store/{p}"),
                    nar_size: *s,
                })
                .collect(),
        }
    }

    #[test]
    fn names_split_like_nix() {
        let s = |p: &str| split_name(&format!("/nix/store/{H}-{p}"));
        assert_eq!(s("openssl-3.0.1"), ("openssl".into(), "3.0.1".into()));
        assert_eq!(
            s("shop-web.service"),
            ("shop-web.service".into(), "".into())
        );
        assert_eq!(
            s("python3-3.11.4-env"),
            ("python3".into(), "3.11.4-env".into())
        );
        assert_eq!(s("index.html"), ("index.html".into(), "".into()));
    }

    #[test]
    fn identical_closures_make_an_empty_diff() {
        let m = manifest("1.0", &[("aaaa-busybox-1.36", 1000)], "u1");
        let d = diff(Some(&m), Some(&m));
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d.size_delta(), 0);
    }

    #[test]
    fn upgrades_additions_removals_and_rebuilds() {
        let h = |c: char| c.to_string().repeat(32);
        let old = manifest(
            "1.0",
            &[
                (&format!("{}-busybox-1.36", h('a')), 1000),
                (&format!("{}-index.html", h('b')), 184),
                (&format!("{}-openssl-3.0", h('c')), 5000),
                (&format!("{}-shop-1.0", h('d')), 300),
            ],
            "u1",
        );
        let new = manifest(
            "2.0",
            &[
                (&format!("{}-busybox-1.36", h('a')), 1000),
                (&format!("{}-index.html", h('f')), 184),
                (&format!("{}-curl-8.1", h('g')), 700),
                (&format!("{}-shop-2.0", h('h')), 310),
            ],
            "u2",
        );
        let d = diff(Some(&old), Some(&new));
        let names: Vec<&str> = d.packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["curl", "index.html", "openssl", "shop"]);
        assert!(d.packages[0].old_versions.is_empty() && d.packages[0].size_delta == 700);
        assert!(d.packages[1].rebuilt() && d.packages[1].size_delta == 0);
        assert_eq!(d.packages[1].added[0].nar_size, 184);
        assert!(d.packages[2].new_versions.is_empty() && d.packages[2].size_delta == -5000);
        assert_eq!(
            (
                d.packages[3].old_versions.clone(),
                d.packages[3].new_versions.clone()
            ),
            (vec!["1.0".to_owned()], vec!["2.0".to_owned()])
        );
        assert_eq!(d.units[0].change, Change::Changed);
        assert_eq!(d.size_delta(), 700 - 5000 + 10);
        assert_eq!(d.old.as_deref(), Some("shop_1.0.raw"));
        // Nothing attached yet: everything is added.
        let first = diff(None, Some(&new));
        assert!(first.packages.iter().all(|p| p.old_versions.is_empty()));
        assert_eq!(first.units[0].change, Change::Added);
    }
}
