//! The publish stage: built images into a directory any static HTTP server
//! can serve to pull hosts, laid out as the pull contract says (images
//! `NAME_VERSION.raw` with their manifests `FILE.raw.json`, the index
//! `SHA256SUMS` and its signature `SHA256SUMS.sig`).
//!
//! A reader must never see a half-written file or an index that names a
//! missing one, whatever happens to the writer: every file is written under
//! a temporary name starting with `.` and renamed into place, images before
//! the signature, the signature before the index, old images pruned last.
//! A lock file keeps two publishes to one directory apart.

pub mod index;
pub mod sign;
pub mod version;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::names::ImageFile;
use crate::ui::Ui;
use index::{Entry, IndexError};
use sign::{PublicKey, SignError};

pub const INDEX: &str = "SHA256SUMS";
pub const SIGNATURE: &str = "SHA256SUMS.sig";
pub const LOCK: &str = ".attache-publish.lock";

/// A built image to publish.
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub version: String,
    /// Where it is now (the build cache).
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// Its manifest (`attache diff` reads it), if it has one.
    pub manifest: Option<Vec<u8>>,
}

/// How the index is vouched for.
#[derive(Debug, Clone)]
pub enum Signing {
    /// Signed with this private key (or public key, through the agent),
    /// whose public half is `public`.
    Key { key: PathBuf, public: PublicKey },
    /// No signature: only hosts with `insecureUnsigned` take it.
    Unsigned,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Versions kept per published service (at least 1).
    pub keep: usize,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} cannot be read: {why}; fix it, or move it away to start a new index")]
    Index { path: String, why: IndexError },
    #[error("{path} already exists with other content than {listed}: it was changed by hand; remove it (and its line in SHA256SUMS, if any) and publish again")]
    Changed { path: String, listed: String },
    #[error(
        "two images to publish are both named {file} but differ: give one of them another version"
    )]
    Twice { file: String },
    #[error("{path} is in the way: it is not a regular file (a directory?); move it away and publish again")]
    InTheWay { path: String },
    #[error("{file:?} cannot be published: it is not a plain NAME_VERSION.raw file name")]
    BadName { file: String },
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("the signature made with {key} does not verify with the public key taken for it ({public}): if {key}.pub is there, it is not {key}'s public half; fix or remove it")]
    WrongPublicHalf { key: String, public: String },
    #[error("interrupted {0}")]
    Interrupted(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PublishError {
    let what = what.into();
    move |source| PublishError::Io { what, source }
}

/// What a publish did (or, dry, would do): the `--json` result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    pub dir: PathBuf,
    pub dry_run: bool,
    pub signed: bool,
    pub published: Vec<Published>,
    /// Image files removed (with their manifests) to keep `--keep` versions.
    pub pruned: Vec<String>,
    /// Whether `SHA256SUMS` (or its signature) was written.
    pub index_changed: bool,
    /// The images the index lists now.
    pub indexed: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Published {
    pub service: String,
    pub version: String,
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    /// False when the directory had it already.
    pub copied: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

/// Each image's file in the directory, the index after the publish, and
/// what it prunes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub places: Vec<Place>,
    pub index: Vec<Entry>,
    pub prune: Vec<String>,
    /// Worth telling the user; nothing is wrong.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// Into the images given to [`plan`].
    pub image: usize,
    pub file: String,
    /// The directory lacks it.
    pub copy: bool,
}

/// Decides the plan from the index as it is (`listed`, entries whose file
/// exists) and `in_dir`, the sha256 of a file in the directory if it is
/// there. A version published before with other content gets its own name
/// (`NAME_VERSION-SHA8.raw`), as deploy names it on a host.
pub fn plan(
    images: &[Image],
    listed: &[Entry],
    in_dir: &mut dyn FnMut(&str) -> Result<Option<String>, PublishError>,
    keep: usize,
) -> Result<Plan, PublishError> {
    let mut places: Vec<Place> = Vec::new();
    let mut notes = Vec::new();
    let mut index: BTreeMap<String, Entry> =
        listed.iter().map(|e| (e.file.clone(), e.clone())).collect();
    let mut chosen: BTreeMap<String, String> = BTreeMap::new();
    for (i, img) in images.iter().enumerate() {
        let file = ImageFile::new(&img.name, &img.version);
        let plain = file.file_name();
        match chosen.get(&plain) {
            Some(sha) if *sha == img.sha256 => continue,
            Some(_) => return Err(PublishError::Twice { file: plain }),
            None => {}
        }
        chosen.insert(plain.clone(), img.sha256.clone());
        let changed = |path: &str, listed: &str| PublishError::Changed {
            path: path.to_owned(),
            listed: listed.to_owned(),
        };
        let listed_sha = |f: &str| index.get(f).map(|e| e.sha256.clone());
        let (target, copy) = match in_dir(&plain)? {
            None => (plain.clone(), true),
            Some(sha) if sha == img.sha256 => (plain.clone(), false),
            // Listed with what it holds: a rebuild of a published version.
            Some(sha) if listed_sha(&plain).as_ref() == Some(&sha) => {
                let tagged = file.with_content_tag(&img.sha256).file_name();
                notes.push(format!(
                    "{plain} is published with other content; publishing this one as {tagged} (bump the version next time)"
                ));
                match in_dir(&tagged)? {
                    None => (tagged, true),
                    Some(sha) if sha == img.sha256 => (tagged, false),
                    Some(_) => return Err(changed(&tagged, "its name says")),
                }
            }
            // No index names it, so no host was sent to it: what a publish
            // stopped before its index leaves (the user may have rebuilt
            // that version since).
            Some(_) if !index.contains_key(&plain) => {
                notes.push(format!(
                    "{plain} was in the directory but not in {INDEX} (a publish stopped before its index leaves it so): replacing it"
                ));
                (plain.clone(), true)
            }
            Some(_) => return Err(changed(&plain, "SHA256SUMS lists")),
        };
        index.insert(
            target.clone(),
            Entry::new(&target, &img.sha256).ok_or_else(|| PublishError::BadName {
                file: target.clone(),
            })?,
        );
        places.push(Place {
            image: i,
            file: target,
            copy,
        });
    }
    let just: BTreeSet<&str> = places.iter().map(|p| p.file.as_str()).collect();
    let services: BTreeSet<&str> = places
        .iter()
        .map(|p| images[p.image].name.as_str())
        .collect();
    let mut prune = Vec::new();
    for svc in services {
        let mut versions: Vec<&Entry> = index.values().filter(|e| e.name == svc).collect();
        // Newest first; the file name breaks a tie, so the order is total.
        versions.sort_by(|a, b| {
            version::compare(&b.version, &a.version).then_with(|| b.file.cmp(&a.file))
        });
        // Every pull host reading the directory takes the newest version.
        let wrote: Vec<&str> = versions
            .iter()
            .filter(|e| just.contains(e.file.as_str()))
            .map(|e| e.file.as_str())
            .collect();
        match versions.first() {
            Some(newest) if !just.contains(newest.file.as_str()) => notes.push(format!(
                "{svc}: {} is published and newer than what this publish wrote; pull hosts take the newest version",
                newest.file
            )),
            Some(newest) if wrote.len() > 1 => notes.push(format!(
                "{svc}: this publish wrote {}, and every pull host reading this directory takes the newest, {}: give hosts that must run another version a directory (pull.url) of their own",
                wrote.join(", "),
                newest.file
            )),
            _ => {}
        }
        prune.extend(
            versions
                .iter()
                .skip(keep.max(1))
                .filter(|e| !just.contains(e.file.as_str()))
                .map(|e| e.file.clone()),
        );
    }
    for f in &prune {
        index.remove(f);
    }
    Ok(Plan {
        places,
        index: index.into_values().collect(),
        prune,
        notes,
    })
}

/// Publishes `images` into `dir` (created if missing). `stop` says whether
/// the user asked to stop (Ctrl-C): the publish then ends at the next step,
/// its temporary files removed.
pub fn publish(
    dir: &Path,
    images: &[Image],
    signing: &Signing,
    opts: Options,
    stop: &dyn Fn() -> bool,
    ui: &Ui,
) -> Result<Report, PublishError> {
    let shown = dir.display().to_string();
    let interrupted = |when: &str| {
        PublishError::Interrupted(format!(
            "{when}: {shown}/{INDEX} lists what it listed before"
        ))
    };
    let _lock = if opts.dry_run {
        None
    } else {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {shown}")))?;
        let lock = lock(dir, stop, ui)?;
        clear_leftovers(dir)?;
        Some(lock)
    };
    let index_path = dir.join(INDEX);
    let old_text = match std::fs::read(&index_path) {
        Ok(bytes) => Some(String::from_utf8(bytes).map_err(|_| PublishError::Index {
            path: index_path.display().to_string(),
            why: IndexError::NotText,
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(format!("reading {}", index_path.display()))(e)),
    };
    let listed =
        index::parse(old_text.as_deref().unwrap_or("")).map_err(|why| PublishError::Index {
            path: index_path.display().to_string(),
            why,
        })?;
    let (listed, gone): (Vec<Entry>, Vec<Entry>) = listed
        .into_iter()
        .partition(|e| dir.join(&e.file).is_file());
    for e in gone {
        ui.warn(format!(
            "SHA256SUMS listed {}, which is not in {shown}: left out of the new index",
            e.file
        ));
    }
    let mut in_dir = |file: &str| sha256_in(&dir.join(file));
    let plan = plan(images, &listed, &mut in_dir, opts.keep)?;
    for note in &plan.notes {
        ui.warn(note);
    }
    let text = index::render(&plan.index);
    let unchanged = index_unchanged(dir, &text, signing, old_text.as_deref())?;
    let report = Report {
        dir: dir.to_owned(),
        dry_run: opts.dry_run,
        signed: matches!(signing, Signing::Key { .. }),
        published: plan
            .places
            .iter()
            .map(|p| {
                let img = &images[p.image];
                Published {
                    service: img.name.clone(),
                    version: img.version.clone(),
                    file: p.file.clone(),
                    sha256: img.sha256.clone(),
                    bytes: img.size,
                    copied: p.copy,
                    manifest: img.manifest.as_ref().map(|_| format!("{}.json", p.file)),
                }
            })
            .collect(),
        pruned: plan.prune.clone(),
        index_changed: !unchanged,
        indexed: plan.index.len(),
    };
    if opts.dry_run {
        for p in &report.published {
            let verb = if p.copied { "Would copy" } else { "Unchanged" };
            ui.status(verb, format!("{} into {shown}", p.file));
        }
        for f in &report.pruned {
            ui.status("Would prune", f);
        }
        return Ok(report);
    }
    // Signed first: a wrong passphrase ends the publish before anything
    // is copied, and the prompt comes before the long part.
    let next = if unchanged {
        ui.status("Unchanged", INDEX);
        None
    } else {
        Some(prepare_index(dir, &text, signing, old_text.as_deref(), ui)?)
    };
    for p in &plan.places {
        if stop() {
            return Err(interrupted("before every image was in place"));
        }
        let img = &images[p.image];
        let json = format!("{}.json", p.file);
        // In place after its image: a failed copy takes it along.
        let manifest = match &img.manifest {
            Some(m) => prepare_if_changed(dir, &json, m)?,
            None => None,
        };
        if p.copy {
            copy_in(dir, img, &p.file, stop, ui)?;
        } else {
            ui.status("Unchanged", format!("{} (already in {shown})", p.file));
        }
        if let Some((temp, f)) = manifest {
            temp.place(f, &dir.join(&json))?;
        }
    }
    test_pause("publish-index", stop);
    if stop() {
        return Err(interrupted("before SHA256SUMS was written"));
    }
    sync_dir(dir)?;
    if let Some(next) = next {
        next.place(dir, ui)?;
    }
    sync_dir(dir)?;
    // The index no longer names these: nobody is sent to them any more.
    for f in &plan.prune {
        ui.status("Pruning", f);
        for name in [f.clone(), format!("{f}.json")] {
            match std::fs::remove_file(dir.join(&name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(format!("removing {}", dir.join(&name).display()))(e))
                }
                _ => {}
            }
        }
    }
    sync_dir(dir)?;
    Ok(report)
}

/// A test-only hook, as deploy's: `ATTACHE_TEST_PAUSE=STEP` stops here for
/// `ATTACHE_TEST_PAUSE_SECS` (30) seconds, or until Ctrl-C, so that the e2e
/// suite can interrupt a publish at a known step.
#[allow(clippy::print_stderr)]
fn test_pause(step: &str, stop: &dyn Fn() -> bool) {
    if std::env::var("ATTACHE_TEST_PAUSE").ok().as_deref() != Some(step) {
        return;
    }
    let secs = std::env::var("ATTACHE_TEST_PAUSE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    eprintln!("attache-test: paused at {step}");
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < until && !stop() {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The directory's lock, waited for (Ctrl-C still stops the wait).
fn lock(dir: &Path, stop: &dyn Fn() -> bool, ui: &Ui) -> Result<File, PublishError> {
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                if !told {
                    ui.status(
                        "Waiting",
                        format!("for another publish to {} to end", dir.display()),
                    );
                    told = true;
                }
                if stop() {
                    return Err(PublishError::Interrupted(
                        "while waiting for another publish; nothing was written".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io(format!("locking {}", path.display()))(e))
            }
        }
    }
}

/// A temporary file of ours: `.FILE.tmp` (and ssh-keygen's `.FILE.tmp.sig`).
fn is_leftover(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some(file) = rest
        .strip_suffix(".tmp")
        .or_else(|| rest.strip_suffix(".tmp.sig"))
    else {
        return false;
    };
    file == INDEX || file.ends_with(".raw") || file.ends_with(".raw.json")
}

/// Removes what a publish killed outright (no chance to clean up) left.
/// Only under the lock: then no other publish is writing them.
fn clear_leftovers(dir: &Path) -> Result<(), PublishError> {
    let entries = std::fs::read_dir(dir).map_err(io(format!("reading {}", dir.display())))?;
    for entry in entries.flatten() {
        if is_leftover(&entry.file_name().to_string_lossy()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// A file being written: removed unless placed, whatever ends the publish.
struct Temp {
    path: PathBuf,
    placed: bool,
}

impl Temp {
    fn create(dir: &Path, file: &str) -> Result<(Temp, File), PublishError> {
        let temp = Temp {
            path: dir.join(format!(".{file}.tmp")),
            placed: false,
        };
        let _ = std::fs::remove_file(&temp.path);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp.path)
            .map_err(io(format!("creating {}", temp.path.display())))?;
        Ok((temp, f))
    }

    /// Flushed to disk, readable by the web server, and renamed.
    fn place(mut self, file: File, to: &Path) -> Result<(), PublishError> {
        use std::os::unix::fs::PermissionsExt;
        let what = format!("writing {}", to.display());
        file.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io(&what))?;
        file.sync_all().map_err(io(&what))?;
        drop(file);
        std::fs::rename(&self.path, to).map_err(io(&what))?;
        self.placed = true;
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), PublishError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", dir.display())))
}

/// The sha256 of an image file in the directory, `None` when there is
/// none. Anything else under its name (a directory; a FIFO, whose read
/// would never end) is in the way.
fn sha256_in(path: &Path) -> Result<Option<String>, PublishError> {
    let what = || format!("reading {}", path.display());
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(what())(e)),
    };
    if !meta.is_file() {
        return Err(PublishError::InTheWay {
            path: path.display().to_string(),
        });
    }
    let f = File::open(path).map_err(io(what()))?;
    crate::image::hash_file(&f, meta.len())
        .map(Some)
        .map_err(io(what()))
}

/// Copies an image in, checking on the way that it is still what was built.
fn copy_in(
    dir: &Path,
    img: &Image,
    file: &str,
    stop: &dyn Fn() -> bool,
    ui: &Ui,
) -> Result<(), PublishError> {
    let to = dir.join(file);
    ui.status("Copying", format!("{file} ({})", crate::ui::size(img.size)));
    let what = format!("copying {} to {}", img.path.display(), to.display());
    let mut from = File::open(&img.path).map_err(io(&what))?;
    let (temp, mut out) = Temp::create(dir, file)?;
    let bar = ui.bytes_bar(img.size, "Copying");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        if stop() {
            return Err(PublishError::Interrupted(format!(
                "while copying {file}; its partial copy was removed"
            )));
        }
        let n = from.read(&mut buf).map_err(io(&what))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(&what))?;
        if done == 0 {
            test_pause("publish-copy", stop);
        }
        done += n as u64;
        if let Some(b) = &bar {
            b.set_position(done);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let sha = hex::encode(h.finalize());
    if sha != img.sha256 {
        return Err(io(&what)(std::io::Error::other(format!(
            "{} changed since it was built (sha256 {sha}, built as {}); build again",
            img.path.display(),
            img.sha256
        ))));
    }
    temp.place(out, &to)
}

/// `bytes` written as the temporary of `file`, unless `file` holds them
/// already.
fn prepare_if_changed(
    dir: &Path,
    file: &str,
    bytes: &[u8],
) -> Result<Option<(Temp, File)>, PublishError> {
    let to = dir.join(file);
    match std::fs::metadata(&to) {
        // Read only when it can hold them (and cannot block, as a FIFO's read).
        Ok(m) if m.is_file() => {
            if m.len() == bytes.len() as u64 && std::fs::read(&to).is_ok_and(|b| b == bytes) {
                return Ok(None);
            }
        }
        Ok(_) => {
            return Err(PublishError::InTheWay {
                path: to.display().to_string(),
            })
        }
        Err(_) => {}
    }
    let (temp, mut f) = Temp::create(dir, file)?;
    f.write_all(bytes)
        .map_err(io(format!("writing {}", to.display())))?;
    Ok(Some((temp, f)))
}

/// The index and its signature as they will be placed, written and
/// signed under temporary names.
struct NextIndex {
    index: (Temp, File),
    /// The new signature; `None` for an unsigned index (then an old
    /// signature is removed).
    sig: Option<Temp>,
    /// The index's text is what the directory has; only the signature changes.
    same_text: bool,
}

impl NextIndex {
    /// The signature goes in place before the index, so that a reader
    /// between the two renames sees a pair that does not verify (and tries
    /// later) rather than a new index with no signature.
    fn place(self, dir: &Path, ui: &Ui) -> Result<(), PublishError> {
        let sig_path = dir.join(SIGNATURE);
        match self.sig {
            Some(sig) => {
                let f =
                    File::open(&sig.path).map_err(io(format!("reading {}", sig.path.display())))?;
                sig.place(f, &sig_path)?;
            }
            // An old signature must not stay beside an index it does not sign.
            None => match std::fs::remove_file(&sig_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(format!("removing {}", sig_path.display()))(e))
                }
                _ => {}
            },
        }
        if !self.same_text {
            ui.status("Writing", INDEX);
            let (temp, f) = self.index;
            temp.place(f, &dir.join(INDEX))?;
        }
        sync_dir(dir)
    }
}

/// Whether the directory has the index `text` already (its text is `old`),
/// with a good signature when signing, or none when not.
fn index_unchanged(
    dir: &Path,
    text: &str,
    signing: &Signing,
    old: Option<&str>,
) -> Result<bool, PublishError> {
    if old != Some(text) {
        return Ok(false);
    }
    let sig_path = dir.join(SIGNATURE);
    Ok(match signing {
        Signing::Unsigned => !sig_path.exists(),
        Signing::Key { public, .. } => {
            sig_path.is_file() && sign::verify(public, &dir.join(INDEX), &sig_path)?
        }
    })
}

/// Writes and signs the next index under temporary names (the directory
/// lacks it: see [`index_unchanged`]).
fn prepare_index(
    dir: &Path,
    text: &str,
    signing: &Signing,
    old: Option<&str>,
    ui: &Ui,
) -> Result<NextIndex, PublishError> {
    let index_path = dir.join(INDEX);
    let same_text = old == Some(text);
    let (temp, mut f) = Temp::create(dir, INDEX)?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", index_path.display())))?;
    let sig = match signing {
        Signing::Unsigned => None,
        Signing::Key { key, public } => {
            ui.status("Signing", format!("{INDEX} with {}", key.display()));
            let sig = Temp {
                path: sign::sign(key, &temp.path)?,
                placed: false,
            };
            if !sign::verify(public, &temp.path, &sig.path)? {
                return Err(PublishError::WrongPublicHalf {
                    key: key.display().to_string(),
                    public: public.short(),
                });
            }
            Some(sig)
        }
    };
    Ok(NextIndex {
        index: (temp, f),
        sig,
        same_text,
    })
}

/// A pull host as far as publishing cares: which key it trusts.
#[derive(Debug, Clone, Copy)]
pub struct Trust<'a> {
    pub host: &'a str,
    pub public_key: Option<&'a str>,
}

/// Refuses a publish its pull hosts would refuse: a signature by another
/// key than the one a host trusts, or no signature for a host that trusts
/// a key. Said before anything is built.
pub fn check_trust(hosts: &[Trust], signing: &Signing) -> Result<(), String> {
    for h in hosts {
        let Some(trusted) = h.public_key else {
            continue;
        };
        match signing {
            Signing::Unsigned => {
                return Err(format!(
                    "{} accepts only a SHA256SUMS signed by its pull.publicKey: publish with --key FILE (its private half), or set insecureUnsigned = true in its pull section instead of publicKey",
                    h.host
                ))
            }
            Signing::Key { key, public } => {
                if PublicKey::parse(trusted).as_ref() != Some(public) {
                    let shown = PublicKey::parse(trusted)
                        .map_or_else(|| trusted.to_owned(), |k| k.short());
                    return Err(format!(
                        "{} trusts another key ({shown}) than {} ({}): sign with the key whose public half is {}'s pull.publicKey, or put {}.pub's line there and run `attache deploy {}` so that the host trusts it",
                        h.host,
                        key.display(),
                        public.short(),
                        h.host,
                        key.display(),
                        h.host
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
