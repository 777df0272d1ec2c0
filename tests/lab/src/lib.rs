//! The test-host lab: throwaway Debian guests with systemd as PID 1, under
//! QEMU, reachable over SSH on a loopback port.
//!
//! ```no_run
//! let lab = attache_lab::shared(); // or attache_lab::Lab::new()?
//! let host = lab.host(attache_lab::Guest::Bookworm, "h1")?;
//! host.ssh_ok("systemctl is-system-running --wait || true");
//! // `ssh -F <file> h1` (root) or `ssh -F <file> deploy@h1`:
//! let config: std::path::PathBuf = host.ssh_config_path();
//! # let _ = config;
//! # Ok::<(), attache_lab::Error>(())
//! ```
//!
//! * Guest images are built once (debootstrap, then a tuned qcow2 disk, a
//!   PVH-bootable kernel and a tiny initrd) into a cache directory,
//!   `/var/tmp/attache-lab` unless `ATTACHE_LAB_DIR` says otherwise, keyed by
//!   a hash of the recipe in `guest/`. Builds are serialised by file locks.
//! * The first host of a guest type is cold-booted once and saved (QMP
//!   `migrate` to a state file); every host starts from that state on its own
//!   overlay disk in a few seconds, then gets the right clock and hostname.
//! * A guest's `http://10.0.2.100/` ([`FETCH_URL`]) leads to its host's
//!   loopback port on this machine, where a [`Server`] serves a directory.
//! * Hosts stop when their [`Host`] is dropped, and QEMU is tied to the test
//!   process (`PR_SET_PDEATHSIG`), so a panic, Ctrl-C or kill leaks nothing;
//!   the next [`Lab::new`] also sweeps what a dead process left behind.
//!   `ATTACHE_LAB_KEEP=1` keeps hosts running for debugging instead
//!   (`cargo run -p attache-lab -- down` stops them).
#![allow(clippy::print_stderr)]

mod host;
mod image;
mod portable;
mod server;
mod vm;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

pub use host::{shell_quote, Host, USERS};
pub use portable::busybox_portable_image;
pub use server::{Served, Server, Stats, FETCH_URL};

/// The password `sudopw` must give to sudo.
pub const SUDO_PASSWORD: &str = "lab-password";

/// A guest operating system the lab can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Guest {
    /// Debian 12, systemd 252.
    Bookworm,
    /// Debian 13, systemd 257.
    Trixie,
}

impl Guest {
    /// Every guest, oldest first.
    pub const ALL: [Guest; 2] = [Guest::Bookworm, Guest::Trixie];

    /// The Debian suite name, also the guest's name on the lab's command line.
    pub fn suite(self) -> &'static str {
        match self {
            Guest::Bookworm => "bookworm",
            Guest::Trixie => "trixie",
        }
    }

    /// The systemd major version the guest runs.
    pub fn systemd_version(self) -> u32 {
        match self {
            Guest::Bookworm => 252,
            Guest::Trixie => 257,
        }
    }

    /// Parses a suite name (`bookworm`, `trixie`; also `debian12`, `debian13`).
    pub fn from_name(name: &str) -> Option<Guest> {
        match name {
            "bookworm" | "debian12" | "12" => Some(Guest::Bookworm),
            "trixie" | "debian13" | "13" => Some(Guest::Trixie),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Guest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suite())
    }
}

/// What went wrong in the lab, as one readable message.
#[derive(Debug)]
pub struct Error(String);

impl Error {
    pub(crate) fn new(msg: impl Into<String>) -> Error {
        Error(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what was being done to an error.
pub(crate) trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

/// The lab: a cache directory, the guest templates in it, and the hosts
/// started from them.
pub struct Lab {
    dir: PathBuf,
    keep: bool,
    accel: vm::Accel,
    templates: [Mutex<Option<Arc<image::Template>>>; 2],
    counter: AtomicU32,
}

/// One lab per test process, shared by every test in it: the image build and
/// the saved boot happen once. Hosts are still per test and stop when dropped.
///
/// Panics when the lab cannot be set up (no QEMU, unusable cache directory).
pub fn shared() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| Lab::new().unwrap_or_else(|e| panic!("attache-lab: {e}")))
}

impl Lab {
    /// A lab in `ATTACHE_LAB_DIR` (default `/var/tmp/attache-lab`).
    /// `ATTACHE_LAB_KEEP=1` leaves hosts running after they are dropped.
    pub fn new() -> Result<Lab> {
        let dir = std::env::var_os("ATTACHE_LAB_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/attache-lab"));
        let keep = std::env::var("ATTACHE_LAB_KEEP").is_ok_and(|v| !v.is_empty() && v != "0");
        Lab::at(dir, keep)
    }

    /// A lab in `dir`; with `keep`, dropped hosts keep running.
    pub fn at(dir: impl Into<PathBuf>, keep: bool) -> Result<Lab> {
        let dir = dir.into();
        image::check_dir(&dir)?;
        for sub in ["runs", "locks", "images", "stage1", "key"] {
            std::fs::create_dir_all(dir.join(sub))
                .context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        vm::check_tools()?;
        let lab = Lab {
            accel: vm::Accel::detect(),
            dir,
            keep,
            templates: Default::default(),
            counter: AtomicU32::new(0),
        };
        vm::sweep(&lab.dir.join("runs"), false);
        image::ensure_key(&lab.dir)?;
        Ok(lab)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether dropped hosts keep running (`ATTACHE_LAB_KEEP=1`).
    pub fn keeps_hosts(&self) -> bool {
        self.keep
    }

    /// The private key every lab user logs in with.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key/id_ed25519")
    }

    /// Builds the guest's image and saved boot now, if they are not cached.
    /// `host` does this by itself; call it to time or warm the cache.
    pub fn prepare(&self, guest: Guest) -> Result<()> {
        self.template(guest).map(|_| ())
    }

    /// [`Lab::prepare`] for several guests at once (a cold cache builds
    /// faster so: debootstrap waits on the network and the disk too).
    pub fn prepare_all(&self, guests: &[Guest]) -> Result<()> {
        std::thread::scope(|s| {
            let jobs: Vec<_> = guests
                .iter()
                .map(|&g| s.spawn(move || self.prepare(g)))
                .collect();
            jobs.into_iter()
                .try_for_each(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })
    }

    fn template(&self, guest: Guest) -> Result<Arc<image::Template>> {
        let mut slot = self.templates[guest.index()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(t) = &*slot {
            return Ok(t.clone());
        }
        let t = Arc::new(image::Template::prepare(self, guest)?);
        *slot = Some(t.clone());
        Ok(t)
    }

    /// Starts a host named `name` (its hostname and its alias in the SSH
    /// config) from the guest's saved boot, with a clean disk.
    pub fn host(&self, guest: Guest, name: &str) -> Result<Host> {
        host::check_name(name)?;
        let template = self.template(guest)?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let run_dir = self
            .dir
            .join("runs")
            .join(format!("{}-{n}-{name}", std::process::id()));
        let started = Instant::now();
        let host = Host::start_clone(self, &template, name, run_dir)?;
        eprintln!(
            "lab: {name} ({guest}) up in {:.1} s: ssh -F {} {name}",
            started.elapsed().as_secs_f64(),
            host.ssh_config_path().display()
        );
        Ok(host)
    }

    /// Starts several hosts of one guest at once.
    pub fn hosts(&self, guest: Guest, names: &[&str]) -> Result<Vec<Host>> {
        self.template(guest)?;
        std::thread::scope(|s| {
            let jobs: Vec<_> = names
                .iter()
                .map(|name| s.spawn(move || self.host(guest, name)))
                .collect();
            jobs.into_iter()
                .map(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// Writes one SSH config with a root entry for each host (`NAME`; other
    /// users as `USER@NAME`), usable as `ssh -F path NAME`.
    pub fn write_ssh_config(&self, path: &Path, hosts: &[&Host]) -> Result<()> {
        let text: String = hosts.iter().map(|h| h.ssh_config()).collect();
        std::fs::write(path, text).context(|| format!("writing {}", path.display()))
    }

    /// Stops every host a finished process left, kept ones included.
    /// Hosts of running processes are left alone.
    pub fn stop_leftovers(&self) {
        vm::sweep(&self.dir.join("runs"), true);
    }
}
