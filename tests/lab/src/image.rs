//! Guest images, built once into the cache directory and reused while the
//! recipe (the scripts in `guest/`, the mirror, the lab key) is unchanged.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{vm, Context, Error, Guest, Lab, Result};

const DEBOOTSTRAP_SH: &str = include_str!("../guest/debootstrap.sh");
const IMAGE_SH: &str = include_str!("../guest/image.sh");

/// A guest ready to clone: the built image and a saved boot of it.
pub(crate) struct Template {
    pub guest: Guest,
    /// `base.qcow2`, `vmlinux`, `initrd.img`, `host_ed25519.pub`.
    pub image_dir: PathBuf,
    /// `template.qcow2` (an overlay of the base) and `state` (the saved VM).
    pub snap_dir: PathBuf,
    /// The guest's host key, as in `ssh-ed25519 AAAA… comment`.
    pub host_key: String,
}

impl Template {
    pub fn prepare(lab: &Lab, guest: Guest) -> Result<Template> {
        let dir = lab.dir();
        let _lock = lock(&dir.join("locks").join(format!("{guest}.lock")))?;
        let suite = guest.suite();

        let mirror = mirror();
        let k1 = hash(&[DEBOOTSTRAP_SH, suite, &mirror]);
        let stage1 = dir.join("stage1").join(format!("{suite}-{k1}.tar.zst"));
        if !stage1.exists() {
            need_root()?;
            let work = dir.join("stage1").join(format!("{suite}-{k1}.work"));
            let t = Instant::now();
            eprintln!("lab: debootstrap {suite} from {mirror} (about 1-2 min, once)");
            run_script(
                "debootstrap.sh",
                DEBOOTSTRAP_SH,
                &work,
                &[suite, &mirror, &path_str(&work)?, &path_str(&stage1)?],
            )?;
            remove_tree(&work)?;
            eprintln!("lab: {suite} debootstrap took {:.1} s", secs(t));
        }

        let pubkey_path = dir.join("key/id_ed25519.pub");
        let pubkey = fs::read_to_string(&pubkey_path)
            .context(|| format!("reading {}", pubkey_path.display()))?;
        let k2 = hash(&[&k1, IMAGE_SH, &pubkey]);
        let image_dir = dir.join("images").join(format!("{suite}-{k2}"));
        if !image_dir.join("done").exists() {
            need_root()?;
            let work = dir.join("images").join(format!("{suite}-{k2}.work"));
            let t = Instant::now();
            run_script(
                "image.sh",
                IMAGE_SH,
                &work,
                &[
                    &path_str(&stage1)?,
                    &path_str(&work)?,
                    &path_str(&pubkey_path)?,
                ],
            )?;
            fs::write(work.join("done"), "")?;
            remove_tree(&image_dir)?;
            fs::rename(&work, &image_dir)?;
            eprintln!("lab: {suite} image built in {:.1} s", secs(t));
        }
        let host_key = fs::read_to_string(image_dir.join("host_ed25519.pub"))?
            .trim()
            .to_string();

        let k3 = hash(&[&k2, &vm::signature(lab)?]);
        let snap_dir = image_dir.join(format!("snap-{k3}"));
        let template = Template {
            guest,
            image_dir,
            snap_dir,
            host_key,
        };
        if !template.snap_dir.join("state").exists() {
            vm::save_template(lab, &template)?;
        }
        // Mark both in use, then drop entries of other recipes.
        fs::write(template.image_dir.join("used"), "")?;
        fs::write(template.snap_dir.join("used"), "")?;
        prune(&dir.join("stage1"), &format!("{suite}-"), &stage1);
        prune(
            &dir.join("images"),
            &format!("{suite}-"),
            &template.image_dir,
        );
        prune(&template.image_dir, "snap-", &template.snap_dir);
        Ok(template)
    }
}

fn need_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::new(
            "building a lab guest image needs root (debootstrap, chroot, file ownership); \
             run as root, or set ATTACHE_LAB_DIR to a cache root has built",
        ));
    }
    Ok(())
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// An exclusive lock on `path`, held until the file is dropped.
pub(crate) fn lock(path: &Path) -> Result<File> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .context(|| format!("opening {}", path.display()))?;
    f.lock().context(|| format!("locking {}", path.display()))?;
    Ok(f)
}

/// The cache directory must be absolute, not `/`, and plain enough to go
/// unquoted into QEMU options and a shell command (`exec:cat …`).
pub(crate) fn check_dir(dir: &Path) -> Result<()> {
    let s = dir
        .to_str()
        .ok_or_else(|| Error::new(format!("lab dir {dir:?} is not UTF-8")))?;
    let plain = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c));
    if !dir.is_absolute() || dir.parent().is_none() || !plain || s.len() > 60 {
        return Err(Error::new(format!(
            "lab dir {s:?} must be an absolute path other than /, at most 60 characters of \
             [A-Za-z0-9/._+-] (set ATTACHE_LAB_DIR)"
        )));
    }
    Ok(())
}

pub(crate) fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::new(format!("{p:?} is not UTF-8")))
}

/// The lab's SSH key, made once.
pub(crate) fn ensure_key(dir: &Path) -> Result<()> {
    let key = dir.join("key/id_ed25519");
    if key.exists() && key.with_extension("pub").exists() {
        return Ok(());
    }
    let _lock = lock(&dir.join("locks/key.lock"))?;
    if key.exists() && key.with_extension("pub").exists() {
        return Ok(());
    }
    let tmp = dir.join("key/id_ed25519.tmp");
    let _ = fs::remove_file(&tmp);
    let _ = fs::remove_file(tmp.with_extension("tmp.pub"));
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "attache-lab", "-f"])
        .arg(&tmp)
        .output()
        .context(|| "running ssh-keygen".into())?;
    if !out.status.success() {
        return Err(Error::new(format!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    fs::rename(tmp.with_extension("tmp.pub"), key.with_extension("pub"))?;
    fs::rename(&tmp, &key)?;
    Ok(())
}

/// The Debian mirror: `ATTACHE_LAB_MIRROR`, else the first Debian archive the
/// host's apt sources name (read only), else deb.debian.org.
pub(crate) fn mirror() -> String {
    if let Ok(m) = std::env::var("ATTACHE_LAB_MIRROR") {
        if !m.is_empty() {
            return m;
        }
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        let name = f.to_string_lossy();
        let found = if name.ends_with(".sources") {
            mirror_deb822(&text)
        } else if name.ends_with(".list") {
            mirror_one_line(&text)
        } else {
            None
        };
        if let Some(m) = found {
            return m;
        }
    }
    "http://deb.debian.org/debian".to_string()
}

fn is_debian_archive(uri: &str) -> bool {
    let uri = uri.trim_end_matches('/');
    (uri.starts_with("http://") || uri.starts_with("https://"))
        && uri.ends_with("/debian")
        && !uri.contains("security")
}

fn mirror_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if field("Enabled") == Some("no") || !field("Types").is_some_and(|t| t.contains("deb")) {
            continue;
        }
        if let Some(uri) =
            field("URIs").and_then(|u| u.split_whitespace().find(|u| is_debian_archive(u)))
        {
            return Some(uri.trim_end_matches('/').to_string());
        }
    }
    None
}

fn mirror_one_line(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        if words.next() != Some("deb") {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            if !uri.ends_with(']') {
                words.find(|w| w.ends_with(']'))?;
            }
            uri = words.next()?;
        }
        is_debian_archive(uri).then(|| uri.trim_end_matches('/').to_string())
    })
}

/// FNV-1a over the parts: a stable cache key (not a security boundary).
pub(crate) fn hash(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")[..12].to_string()
}

/// Runs an embedded script from a fresh `work` directory; its output goes to
/// `work.log` beside it, whose tail is the error on failure.
fn run_script(name: &str, text: &str, work: &Path, args: &[&str]) -> Result<()> {
    remove_tree(work)?;
    let script = work.with_extension("sh");
    fs::write(&script, text)?;
    let log = work.with_extension("log");
    let log_file = File::create(&log)?;
    let status = Command::new("bash")
        .arg(&script)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context(|| format!("running {name}"))?;
    let _ = fs::remove_file(&script);
    if !status.success() {
        return Err(Error::new(format!(
            "{name} failed ({status}); log {}:\n{}",
            log.display(),
            vm::tail(&log, 30)
        )));
    }
    let _ = fs::remove_file(&log);
    Ok(())
}

/// Removes a directory the lab made, after unmounting anything a failed
/// build left mounted inside it (debootstrap mounts /proc and /sys in its
/// target): never recurse into a mounted host file system.
pub(crate) fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let prefix = format!("{}/", path_str(dir)?);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut inside: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    inside.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in &inside {
        let _ = Command::new("umount").arg("-l").arg(m).status();
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m.starts_with(&prefix))
    {
        return Err(Error::new(format!(
            "{} still has file systems mounted inside; not removing it",
            dir.display()
        )));
    }
    fs::remove_dir_all(dir).context(|| format!("removing {}", dir.display()))
}

/// Removes cache entries named `prefix…` in `dir` other than `current`
/// that no process used in the last hour (a process that started hosts
/// from an older recipe may still be running).
fn prune(dir: &Path, prefix: &str, current: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        let recent = fs::metadata(p.join("used"))
            .or_else(|_| fs::metadata(&p))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(3600));
        if recent
            || p == current
            || !name.starts_with(prefix)
            || name.ends_with(".work")
            || name.ends_with(".log")
        {
            continue;
        }
        if p.is_dir() {
            let _ = remove_tree(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_debian_archive_in_deb822() {
        let text = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\n\
                    Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_deb822(text).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let off = "Enabled: no\nTypes: deb\nURIs: http://a.example/debian/\n";
        assert_eq!(mirror_deb822(off), None);
    }

    #[test]
    fn finds_the_debian_archive_in_one_line_format() {
        let text = "# x\ndeb [signed-by=/k.gpg] http://m.example/debian/ bookworm main\n";
        assert_eq!(
            mirror_one_line(text).as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(
            mirror_one_line("deb https://packages.cloud.google.com/apt x main"),
            None
        );
    }

    #[test]
    fn hash_is_stable_and_separates_parts() {
        assert_eq!(hash(&["a", "b"]), hash(&["a", "b"]));
        assert_ne!(hash(&["ab", ""]), hash(&["a", "b"]));
        assert_eq!(hash(&["x"]).len(), 12);
    }

    #[test]
    fn refuses_root_and_relative_dirs() {
        assert!(check_dir(Path::new("/")).is_err());
        assert!(check_dir(Path::new("lab")).is_err());
        assert!(check_dir(Path::new("/var/tmp/a b")).is_err());
        assert!(check_dir(Path::new("/var/tmp/attache-lab")).is_ok());
    }
}
