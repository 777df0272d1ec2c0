//! Reading an image back: what is in it, and what portabled would refuse.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Component, Path, PathBuf};

use backhand::{FilesystemReader, InnerNode, Node, SquashfsFileReader};

use super::bounds;
use super::error::ImageError;
use super::layout::{parse_os_release, BASE_DIRS, EMPTY_FILES};
use super::sqfs::{self, SUPERBLOCK_SIZE};
use crate::names::{portable_prefixes, unit_installs, unit_matches_prefix, unit_suffix, ImageFile};

/// What [`inspect`] found in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// From the file name `NAME_VERSION.raw`: the unit prefix portabled uses.
    pub name: String,
    /// From the file name; empty for `NAME.raw`.
    pub version: String,
    pub os_release: BTreeMap<String, String>,
    /// Unit files in `etc/systemd/system`, sorted by name.
    pub units: Vec<UnitInfo>,
    /// Top-level entries of `/nix/store`, as `/nix/store/…` paths, sorted.
    pub store_paths: Vec<String>,
    /// File size in bytes.
    pub size: u64,
    /// `zstd`, `xz`, `gzip`, …
    pub compression: String,
    pub block_size: u32,
    /// sha256 of the file, lower-case hex.
    pub sha256: String,
    /// Why `portablectl attach` (or the service start) would fail; empty if none.
    pub problems: Vec<String>,
}

/// A unit file of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitInfo {
    pub name: String,
    /// The `ExecStart=` values, one per line, in order.
    pub exec_start: Vec<String>,
    /// Has an `[Install]` section, so `attach --enable` links and starts it.
    pub install: bool,
}

/// Files bigger than this are not read by `inspect` (os-release, units).
const MAX_TEXT: u64 = 1 << 20;

/// Reads the image at `path` and reports what portabled would see.
pub fn inspect(path: &Path) -> Result<Inspection, ImageError> {
    let read_err = |source| ImageError::Read {
        path: path.to_owned(),
        source,
    };
    let (file, size) = checked(path)?;
    let sha256 = super::pack::hash_file(&file, size).map_err(read_err)?;
    let fs = open(path, file)?;
    let result = panic::catch_unwind(AssertUnwindSafe(|| read_image(path, &fs, size, sha256)));
    result.unwrap_or_else(|_| {
        Err(ImageError::Corrupt {
            path: path.to_owned(),
            reason: "the reader crashed on it".into(),
        })
    })
}

/// The squashfs image at `path`, its size, and its tables checked against
/// the file (`bounds`), rewound: what every reader must do before backhand
/// sees the file, since backhand trusts the tables it reads.
pub(super) fn checked(path: &Path) -> Result<(File, u64), ImageError> {
    let read_err = |source| ImageError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let mut magic = [0u8; 4];
    if size < SUPERBLOCK_SIZE as u64
        || file.read_exact(&mut magic).is_err()
        || magic != sqfs::MAGIC.to_le_bytes()
    {
        return Err(ImageError::NotSquashfs {
            path: path.to_owned(),
        });
    }
    bounds::check(&mut file, size, bounds::LIMITS).map_err(|reason| ImageError::Corrupt {
        path: path.to_owned(),
        reason,
    })?;
    file.rewind().map_err(read_err)?;
    Ok((file, size))
}

/// backhand's reader over a file [`checked`] gave; its panics become errors.
pub(super) fn open(path: &Path, file: File) -> Result<FilesystemReader<'static>, ImageError> {
    let corrupt = |reason: String| ImageError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let opened = panic::catch_unwind(AssertUnwindSafe(|| {
        FilesystemReader::from_reader(BufReader::new(file)).map_err(|e| corrupt(e.to_string()))
    }));
    match opened {
        Ok(r) => r,
        Err(_) => Err(corrupt("the reader crashed on it".into())),
    }
}

fn read_image(
    path: &Path,
    fs: &FilesystemReader<'_>,
    size: u64,
    sha256: String,
) -> Result<Inspection, ImageError> {
    let corrupt = |reason: String| ImageError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let nodes: HashMap<&Path, &Node<SquashfsFileReader>> =
        fs.files().map(|n| (n.fullpath.as_path(), n)).collect();
    let mut problems = Vec::new();

    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let image = ImageFile::cut(file_name.strip_suffix(".raw").unwrap_or(&file_name));
    let (name, version) = (image.name().to_owned(), image.version().to_owned());
    if !file_name.ends_with(".raw") {
        problems.push(format!(
            "the file name {file_name:?} does not end in .raw; portabled only finds NAME_VERSION.raw images"
        ));
    }

    // os-release
    let mut os_release = BTreeMap::new();
    let mut found = None;
    for candidate in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Some(node) = resolve(&nodes, Path::new(candidate)) {
            if let InnerNode::File(f) = &node.inner {
                found = Some((candidate, read_text(fs, f).map_err(&corrupt)?));
                break;
            }
        }
    }
    match found {
        None => problems.push(
            "no /etc/os-release or /usr/lib/os-release: portabled refuses the image (\"lacks os-release data\")".into(),
        ),
        Some((_, text)) => {
            os_release = parse_os_release(&text);
            if os_release.get("ID").is_none_or(|v| v.is_empty()) {
                problems.push("os-release has no ID=: portabled (systemd >= 251) refuses the image".into());
            }
        }
    }

    let prefixes = portable_prefixes(
        os_release.get("PORTABLE_PREFIXES").map(String::as_str),
        &name,
    );

    // Units
    let unit_dir = Path::new("/etc/systemd/system");
    let mut units = Vec::new();
    let mut matching = 0;
    let mut entries: Vec<&Node<SquashfsFileReader>> = fs
        .files()
        .filter(|n| n.fullpath.parent() == Some(unit_dir))
        .collect();
    entries.sort_by(|a, b| a.fullpath.cmp(&b.fullpath));
    for node in entries {
        let unit_name = node
            .fullpath
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(suffix) = unit_suffix(&unit_name) else {
            continue;
        };
        let matches = prefixes.iter().any(|p| unit_matches_prefix(&unit_name, p));
        let mut exec_start = Vec::new();
        let mut install = false;
        match &node.inner {
            InnerNode::File(f) => {
                let text = read_text(fs, f).map_err(&corrupt)?;
                if text.trim().is_empty() {
                    problems.push(format!("unit {unit_name} is empty: portabled ignores it"));
                } else if matches {
                    matching += 1;
                }
                exec_start = exec_starts(&text);
                install = unit_installs(&text);
            }
            InnerNode::Symlink(_) => problems.push(format!(
                "unit {unit_name} is a symlink: portabled resolves it outside the image; make it a regular file"
            )),
            _ => problems.push(format!("unit {unit_name} is not a regular file")),
        }
        if !matches {
            problems.push(format!(
                "unit {unit_name} does not match the unit prefix {}: portabled ignores it \
                 (name it PREFIX{suffix}, PREFIX-…{suffix}, PREFIX.…{suffix} or PREFIX@…{suffix})",
                prefixes.join(" or ")
            ));
        }
        units.push(UnitInfo {
            name: unit_name,
            exec_start,
            install,
        });
    }
    if matching == 0 {
        problems.push(format!(
            "no usable unit file matching {} in /etc/systemd/system: portabled refuses the image",
            prefixes.join(" or ")
        ));
    }

    // Mount points and root.
    let root_mode = fs.root.root().header.permissions & 0o7777;
    if root_mode != 0o755 {
        problems.push(format!(
            "the root directory has mode {root_mode:04o}, not 0755: services fail with status=200/CHDIR"
        ));
    }
    for (dir, mode) in BASE_DIRS
        .iter()
        .filter(|(d, _)| matches!(*d, "/proc" | "/sys" | "/dev" | "/run" | "/tmp" | "/var/tmp"))
    {
        match nodes.get(Path::new(dir)) {
            Some(n) if matches!(n.inner, InnerNode::Dir(_)) => {
                let m = n.header.permissions & 0o7777;
                if *mode == 0o1777 && m != 0o1777 {
                    problems.push(format!("{dir} has mode {m:04o}, not 1777"));
                }
            }
            _ => problems.push(format!(
                "missing mount point directory {dir}: services fail with status=226/NAMESPACE"
            )),
        }
    }
    for file in EMPTY_FILES {
        match nodes.get(Path::new(file)) {
            Some(n) if matches!(n.inner, InnerNode::File(_)) => {}
            _ => problems.push(format!(
                "missing mount point file {file}: services fail with status=226/NAMESPACE"
            )),
        }
    }

    let mut store_paths: Vec<String> = fs
        .files()
        .filter(|n| n.fullpath.parent() == Some(Path::new("/nix/store")))
        .map(|n| n.fullpath.to_string_lossy().into_owned())
        .collect();
    store_paths.sort();

    let compression = match fs.compressor {
        Some(c) => format!("{c:?}").to_lowercase(),
        None => "none".into(),
    };
    Ok(Inspection {
        name,
        version,
        os_release,
        units,
        store_paths,
        size,
        compression,
        block_size: fs.block_size,
        sha256,
        problems,
    })
}

/// Follows symlinks inside the image (at most 16), relative to the link.
fn resolve<'a>(
    nodes: &HashMap<&Path, &'a Node<SquashfsFileReader>>,
    path: &Path,
) -> Option<&'a Node<SquashfsFileReader>> {
    let mut current = PathBuf::from(path);
    for _ in 0..16 {
        let node = *nodes.get(current.as_path())?;
        let InnerNode::Symlink(link) = &node.inner else {
            return Some(node);
        };
        let base = current.parent().unwrap_or(Path::new("/")).to_owned();
        let joined = if link.link.is_absolute() {
            link.link.clone()
        } else {
            base.join(&link.link)
        };
        let mut clean = PathBuf::from("/");
        for c in joined.components() {
            match c {
                Component::Normal(n) => clean.push(n),
                Component::ParentDir => {
                    clean.pop();
                }
                _ => {}
            }
        }
        current = clean;
    }
    None
}

fn read_text(fs: &FilesystemReader<'_>, f: &SquashfsFileReader) -> Result<String, String> {
    let mut buf = Vec::new();
    fs.file(f)
        .reader()
        .take(MAX_TEXT)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// `ExecStart=` values of a unit file (continuation lines joined).
fn exec_starts(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut logical = String::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(cont) = line.strip_suffix('\\') {
            logical.push_str(cont);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let l = logical.trim();
        if let Some(v) = l.strip_prefix("ExecStart=") {
            out.push(v.trim().to_owned());
        }
        logical.clear();
    }
    out
}
