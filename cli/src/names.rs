//! portabled's names, in one place: image files (`NAME_VERSION.raw`, with an
//! optional `-SHA8` when a version was rebuilt with other content), unit
//! suffixes, an image's unit prefixes, and how a unit matches a prefix.
//!
//! Which service an attached unit belongs to is decided by the image file
//! its drop-in names ([`ImageFile::parse`]), never by the unit's name: a
//! unit `shop-admin-web.service` matches the prefix `shop` too.

use std::fmt;

/// Unit suffixes portabled attaches; anything else in the image is ignored.
pub const UNIT_SUFFIXES: &[&str] = &[".service", ".socket", ".target", ".timer", ".path"];

/// Where images live on a host; portabled looks there by name.
pub const PORTABLES: &str = "/var/lib/portables";

/// An image file name as portabled reads it: the part before the first `_`
/// is the service's name, the rest (without `.raw`) its version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageFile {
    name: String,
    version: Option<String>,
}

impl ImageFile {
    pub fn new(name: &str, version: &str) -> Self {
        ImageFile {
            name: name.to_owned(),
            version: (!version.is_empty()).then(|| version.to_owned()),
        }
    }

    /// The same version under a name of its own, for content that differs
    /// from an attached image of the same version: portabled cannot reattach
    /// a name that is already attached.
    pub fn with_content_tag(&self, sha256: &str) -> Self {
        let tag = sha256.get(..8).unwrap_or(sha256);
        ImageFile {
            name: self.name.clone(),
            version: Some(match &self.version {
                Some(v) => format!("{v}-{tag}"),
                None => tag.to_owned(),
            }),
        }
    }

    /// Reads a file name or a path (`/var/lib/portables/demo_1.0.raw`);
    /// `None` when it is not a `.raw` image name.
    pub fn parse(file_or_path: &str) -> Option<Self> {
        let stem = basename(file_or_path).strip_suffix(".raw")?;
        let image = ImageFile::cut(stem);
        (!image.name.is_empty()).then_some(image)
    }

    /// portabled's cut of a file name without `.raw`: the name ends at the
    /// first `_`. Unlike [`ImageFile::parse`] it refuses nothing, for
    /// `inspect`, which reports a bad name instead of failing on it.
    pub fn cut(stem: &str) -> Self {
        match stem.split_once('_') {
            Some((name, version)) => ImageFile {
                name: name.to_owned(),
                version: Some(version.to_owned()),
            },
            None => ImageFile {
                name: stem.to_owned(),
                version: None,
            },
        }
    }

    /// The service's name: the image name, also the default unit prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> &str {
        self.version.as_deref().unwrap_or("")
    }

    /// `NAME_VERSION.raw`.
    pub fn file_name(&self) -> String {
        format!("{self}.raw")
    }

    /// Where the image lives on a host.
    pub fn host_path(&self) -> String {
        format!("{PORTABLES}/{}", self.file_name())
    }
}

/// `NAME_VERSION`, the name portablectl takes.
impl fmt::Display for ImageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{}_{v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The last component of a path.
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The suffix portabled knows `unit` by, if any.
pub fn unit_suffix(unit: &str) -> Option<&'static str> {
    UNIT_SUFFIXES.iter().copied().find(|s| unit.ends_with(s))
}

/// The prefixes an image's units must match: the declared
/// `PORTABLE_PREFIXES=` when not blank, else the image name.
pub fn portable_prefixes(declared: Option<&str>, image_name: &str) -> Vec<String> {
    match declared {
        Some(p) if !p.trim().is_empty() => p.split_whitespace().map(str::to_owned).collect(),
        _ => vec![image_name.to_owned()],
    }
}

/// Whether `attach --enable` links and starts a unit: its `[Install]`
/// section names a `WantedBy=`, `RequiredBy=` or `UpheldBy=`.
pub fn unit_installs(text: &str) -> bool {
    let mut in_install = false;
    text.lines().any(|l| {
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
}

/// portabled's match rule: the unit's name without suffix is the prefix
/// itself, or the prefix followed by `-`, `.` or `@`.
pub fn unit_matches_prefix(unit: &str, prefix: &str) -> bool {
    let Some(rest) = unit.strip_prefix(prefix) else {
        return false;
    };
    // Every suffix starts with '.', so `demo.service` is covered too.
    rest.starts_with(['-', '.', '@'])
}

/// A unit's name without its suffix or template instance:
/// `shop-web.service` -> `shop-web`, `echo@.service` -> `echo`.
pub fn unit_stem(unit: &str) -> &str {
    let no_suffix = UNIT_SUFFIXES
        .iter()
        .find_map(|s| unit.strip_suffix(s))
        .unwrap_or(unit);
    no_suffix.split('@').next().unwrap_or(no_suffix)
}

/// The prefixes an image declares for its own units: their stems, so that
/// another image whose units start with this image's name (`shop` and
/// `shop-admin-web.service`) is never matched by it. Sorted, no repeats,
/// and none that another one already covers.
pub fn unit_prefixes<'a>(units: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut stems: Vec<String> = units.into_iter().map(|u| unit_stem(u).to_owned()).collect();
    stems.sort();
    stems.dedup();
    let all = stems.clone();
    stems.retain(|s| {
        !all.iter()
            .any(|other| other != s && unit_matches_prefix(&format!("{s}.service"), other))
    });
    stems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_files_round_trip() {
        let f = ImageFile::new("demo", "1.0");
        assert_eq!(f.file_name(), "demo_1.0.raw");
        assert_eq!(f.host_path(), "/var/lib/portables/demo_1.0.raw");
        assert_eq!(f.to_string(), "demo_1.0");
        assert_eq!(ImageFile::parse(&f.host_path()), Some(f.clone()));
        let tagged = f.with_content_tag("0123456789abcdef");
        assert_eq!(tagged.file_name(), "demo_1.0-01234567.raw");
        assert_eq!(ImageFile::parse("demo_1.0-01234567.raw"), Some(tagged));
        let bare = ImageFile::parse("/x/shop.raw").unwrap();
        assert_eq!((bare.name(), bare.version()), ("shop", ""));
        assert_eq!(bare.file_name(), "shop.raw");
        assert_eq!(ImageFile::parse("demo_1.0"), None);
        assert_eq!(ImageFile::parse("_1.raw"), None);
    }

    #[test]
    fn shared_prefixes_are_told_apart_by_file() {
        let admin = ImageFile::parse("/var/lib/portables/shop-admin_1.0.raw").unwrap();
        assert_eq!(admin.name(), "shop-admin");
        assert_ne!(admin.name(), "shop");
        // What portabled would do, and why names alone are not enough.
        assert!(unit_matches_prefix("shop-admin-web.service", "shop"));
        assert!(!unit_matches_prefix("shop-admin-web.service", "shop-web"));
    }

    #[test]
    fn prefix_rule() {
        for ok in [
            "demo.service",
            "demo-x.timer",
            "demo@.service",
            "demo@1.service",
            "demo.x.socket",
            "demo.socket",
        ] {
            assert!(unit_matches_prefix(ok, "demo"), "{ok}");
        }
        for bad in [
            "demox.service",
            "dem.service",
            "x-demo.service",
            "other.service",
            "demo_x.service",
        ] {
            assert!(!unit_matches_prefix(bad, "demo"), "{bad}");
        }
    }

    #[test]
    fn suffixes_and_declared_prefixes() {
        assert_eq!(unit_suffix("demo-tick.timer"), Some(".timer"));
        assert_eq!(unit_suffix("demo.mount"), None);
        assert_eq!(portable_prefixes(None, "demo"), ["demo"]);
        assert_eq!(portable_prefixes(Some("  "), "demo"), ["demo"]);
        assert_eq!(portable_prefixes(Some("a b"), "demo"), ["a", "b"]);
    }

    #[test]
    fn cut_refuses_nothing() {
        let odd = ImageFile::cut("_1");
        assert_eq!((odd.name(), odd.version()), ("", "1"));
        let plain = ImageFile::cut("demo.img");
        assert_eq!((plain.name(), plain.version()), ("demo.img", ""));
    }

    #[test]
    fn stems_as_prefixes() {
        assert_eq!(unit_stem("shop-web.service"), "shop-web");
        assert_eq!(unit_stem("echo@.service"), "echo");
        assert_eq!(unit_stem("echo.socket"), "echo");
        assert_eq!(
            unit_prefixes(["echo.socket", "echo@.service"]),
            ["echo".to_owned()]
        );
        assert_eq!(
            unit_prefixes(["demo.service", "demo-tick.timer", "demo-tick.service"]),
            ["demo".to_owned()]
        );
        assert_eq!(
            unit_prefixes(["shop-web.service", "shop-web-worker.service"]),
            ["shop-web".to_owned()]
        );
    }
}
