//! Shared helpers of the end-to-end suite: run the real `attache` binary,
//! read images back with the real squashfs tools, and look at lab hosts.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attache_lab::{Guest, Host};

/// The repository root (the e2e suite is compiled as part of `cli/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_owned()
}

/// Copies the demo flake to `dest` with its symlinks followed (a `path:`
/// flake cannot follow the links into the repository), for `path:DEST`.
pub fn copy_demo(dest: &Path) {
    copy_flake("examples/demo", dest);
}

/// Copies the flake at `src` (relative to the repository) to `dest` with
/// its symlinks followed, for `path:DEST`.
pub fn copy_flake(src: &str, dest: &Path) {
    let status = Command::new("cp")
        .arg("-rL")
        .arg(repo().join(src))
        .arg(dest)
        .status()
        .unwrap();
    assert!(status.success(), "cp -rL {src}: {status}");
}

/// A host from the shared lab; the test fails with the lab's error if it
/// cannot be had.
pub fn lab_host(guest: attache_lab::Guest, name: &str) -> attache_lab::Host {
    attache_lab::shared()
        .host(guest, name)
        .unwrap_or_else(|e| panic!("lab: {e}"))
}

pub fn attache_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_attache"))
}

/// `attache ARGS` in `cwd` with the cache dir `cache`, the environment's
/// `ATTACHE_NIX` removed and nothing on stdin.
fn attache_command(cwd: &Path, cache: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(attache_bin());
    cmd.args(args)
        .current_dir(cwd)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("ATTACHE_NIX")
        .stdin(Stdio::null());
    cmd
}

/// Runs `attache ARGS` in `cwd` with a private cache dir, so tests do not see
/// each other's build cache unless they share `cache`.
pub fn attache_in(cwd: &Path, cache: &Path, args: &[&str]) -> Run {
    let out = attache_command(cwd, cache, args)
        .output()
        .expect("attache runs");
    Run::from(out, args)
}

pub fn attache(args: &[&str]) -> Run {
    let cache = tempfile::tempdir().expect("tempdir");
    attache_in(&repo(), cache.path(), args)
}

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub args: String,
}

impl Run {
    fn from(out: Output, args: &[&str]) -> Run {
        Run::from_parts(out.status.code(), &out.stdout, &out.stderr, &args.join(" "))
    }

    fn from_parts(code: Option<i32>, stdout: &[u8], stderr: &[u8], args: &str) -> Run {
        Run {
            code: code.unwrap_or(-1),
            stdout: String::from_utf8_lossy(stdout).into_owned(),
            stderr: String::from_utf8_lossy(stderr).into_owned(),
            args: args.to_owned(),
        }
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "attache {} failed\nstdout:\n{}\nstderr:\n{}",
            self.args, self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn fails(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "attache {}: expected exit code {code}\nstdout:\n{}\nstderr:\n{}",
            self.args, self.stdout, self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "attache panicked:\n{}",
            self.stderr
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }

    /// The `error: …` line(s) attache ended with.
    pub fn error(&self) -> String {
        let i = self
            .stderr
            .find("error: ")
            .unwrap_or_else(|| panic!("no error line in:\n{}", self.stderr));
        self.stderr[i + "error: ".len()..].trim_end().to_owned()
    }
}

/// `unsquashfs -lln`: one line per entry with mode, owner, size, mtime, path.
pub fn unsquashfs_list(image: &Path) -> Vec<String> {
    let out = Command::new("unsquashfs")
        .args(["-lln", "-d", ""])
        .arg(image)
        .output()
        .expect("unsquashfs runs (scripts/setup installs squashfs-tools)");
    assert!(
        out.status.success(),
        "unsquashfs -lln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `unsquashfs -cat`: the content of one file in the image.
pub fn unsquashfs_cat(image: &Path, path: &str) -> String {
    let out = Command::new("unsquashfs")
        .arg("-cat")
        .arg(image)
        .arg(path)
        .output()
        .expect("unsquashfs runs");
    assert!(
        out.status.success(),
        "unsquashfs -cat {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Files in `dir`, to prove a failed build left nothing behind.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// An `attache` running in the background, its output read as it comes:
/// for tests that act on a host at a given moment of a deploy. Dropping it
/// kills the process if it still runs, so a failed test leaves no deploy
/// going on behind it.
pub struct Background {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    args: String,
}

/// [`attache_in`], started in the background.
pub fn attache_in_background(cwd: &Path, cache: &Path, args: &[&str]) -> Background {
    attache_spawn(cwd, cache, args, &[])
}

/// [`attache_in`], started in the background with extra environment.
pub fn attache_spawn(cwd: &Path, cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Background {
    let mut child = attache_command(cwd, cache, args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("attache runs");
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = vec![
        pump(child.stdout.take().unwrap(), stdout.clone()),
        pump(child.stderr.take().unwrap(), stderr.clone()),
    ];
    Background {
        child,
        stdout,
        stderr,
        readers,
        args: args.join(" "),
    }
}

fn pump(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

impl Background {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Waits until attache's stdout contains `needle`: false when attache
    /// ended, or `limit` passed, first.
    pub fn wait_stdout(&mut self, needle: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while !self.stdout().contains(needle) {
            let ended = self.child.try_wait().ok().flatten().is_some();
            if ended || start.elapsed() > limit {
                std::thread::sleep(Duration::from_millis(200));
                return self.stdout().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// Sends SIGINT, as Ctrl-C would.
    pub fn interrupt(&self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-INT", &pid]).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -INT {pid}");
    }

    /// Waits until attache's stderr contains `needle`: false when attache
    /// ended, or `limit` passed, first.
    fn wait_stderr(&mut self, needle: &str, limit: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.stderr().contains(needle) {
                return true;
            }
            let ended = self.child.try_wait().ok().flatten().is_some();
            if ended || start.elapsed() > limit {
                // The readers may still hold the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return self.stderr().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until attache's stderr contains `needle`; panics with what
    /// it printed if it never does.
    #[track_caller]
    pub fn expect_stderr(&mut self, needle: &str, limit: Duration) {
        if !self.wait_stderr(needle, limit) {
            let _ = self.child.kill();
            let run = self.finish();
            panic!(
                "attache never printed {needle:?} (exit code {})\nstdout:\n{}\nstderr:\n{}",
                run.code, run.stdout, run.stderr
            );
        }
    }

    /// Waits until attache says it paused at `at` (its `ATTACHE_TEST_PAUSE`
    /// hook); panics with what it printed if it never does.
    #[track_caller]
    pub fn expect_pause(&mut self, at: &str) {
        let line = format!("attache-test: paused at {at}");
        if !self.wait_stderr(&line, Duration::from_secs(600)) {
            let _ = self.child.kill();
            let run = self.finish();
            panic!(
                "attache never printed {line:?} (exit code {})\nstdout:\n{}\nstderr:\n{}",
                run.code, run.stdout, run.stderr
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends attache the signal `sig` (`INT`, `TERM`, `STOP`, …).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} {}", self.child.id());
    }

    /// Waits for attache to end.
    pub fn join(mut self) -> Run {
        self.finish()
    }

    fn finish(&mut self) -> Run {
        let status = self.child.wait().expect("waiting for attache");
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        Run::from_parts(status.code(), &stdout, &stderr, &self.args)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A lab host plus a private build cache and an ssh config for it.
pub struct Target {
    pub host: Host,
    pub cache: tempfile::TempDir,
    pub config: PathBuf,
}

pub fn target(guest: Guest, name: &str) -> Target {
    let host = lab_host(guest, name);
    let cache = tempfile::tempdir().unwrap();
    let config = host.ssh_config_path();
    Target {
        host,
        cache,
        config,
    }
}

/// An inventory command's arguments: `VERB --ssh-config CFG --flake FLAKE
/// EXTRA…` (the first of `extra` may be `--json`).
pub fn inventory_args<'a>(
    verb: &'a str,
    cfg: &'a str,
    flake: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![verb, "--ssh-config", cfg, "--flake", flake];
    v.extend_from_slice(extra);
    v
}

impl Target {
    /// `attache ARGS` with this host's ssh config.
    pub fn attache(&self, args: &[&str]) -> Run {
        attache_in(&repo(), self.cache.path(), &self.args(args))
    }

    /// ARGS with this host's options after the subcommand.
    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = args.to_vec();
        full.insert(1, "--ssh-config");
        full.insert(2, utf8(&self.config));
        // The repository's own flake needs the network to evaluate: host
        // commands read no inventory from a directory without a flake.
        if matches!(
            args.first(),
            Some(&("status" | "rollback" | "detach" | "unlock"))
        ) {
            full.insert(3, "--flake");
            full.insert(4, utf8(self.cache.path()));
        }
        full
    }

    fn deploy_args<'a>(&'a self, installables: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["deploy", "--json", "--to", self.host.name()];
        args.extend_from_slice(extra);
        args.extend_from_slice(installables);
        args
    }

    /// `attache deploy --json --to NAME EXTRA… INSTALLABLE…`
    pub fn deploy(&self, installables: &[&str], extra: &[&str]) -> Run {
        self.attache(&self.deploy_args(installables, extra))
    }

    /// [`Target::deploy`] with extra environment (attache's test hooks).
    pub fn deploy_with_env(
        &self,
        installables: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Run {
        self.spawn(&self.deploy_args(installables, extra), env)
            .join()
    }

    /// `attache ARGS` in the background, with extra environment.
    fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Background {
        attache_spawn(&repo(), self.cache.path(), &self.args(args), env)
    }

    /// The same deploy as [`Target::deploy`], in the background, for tests
    /// that act on the host while it runs.
    pub fn deploy_in_background(&self, installables: &[&str], extra: &[&str]) -> Background {
        self.spawn(&self.deploy_args(installables, extra), &[])
    }

    /// `attache ARGS` (this host's options added) in the background.
    pub fn attache_in_background(&self, args: &[&str]) -> Background {
        self.spawn(args, &[])
    }

    /// [`Target::deploy_in_background`] with extra environment.
    pub fn deploy_in_background_with_env(
        &self,
        installables: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Background {
        self.spawn(&self.deploy_args(installables, extra), env)
    }

    /// Processes on this machine that still talk to this host through its
    /// ssh config (a control master left behind), as their command lines.
    pub fn ssh_left_behind(&self) -> Vec<String> {
        let needle = self.config.display().to_string();
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.starts_with("ssh ") && cmd.contains(&needle) && cmd.contains(" -M") {
                left.push(cmd);
            }
        }
        left
    }

    /// [`Target::deploy_in_background`], pausing `secs` seconds at the point
    /// `at` (attache's `ATTACHE_TEST_PAUSE` hook); returns once it paused.
    #[track_caller]
    pub fn deploy_paused(
        &self,
        installables: &[&str],
        extra: &[&str],
        at: &str,
        secs: u64,
    ) -> Background {
        let secs = secs.to_string();
        let mut bg = self.spawn(
            &self.deploy_args(installables, extra),
            &[
                ("ATTACHE_TEST_PAUSE", at),
                ("ATTACHE_TEST_PAUSE_SECS", &secs),
            ],
        );
        bg.expect_pause(at);
        bg
    }

    /// What the web server on `port` answers on the host (empty if nothing
    /// answers for 10 s).
    pub fn page(&self, port: u16) -> String {
        let out = self.host.ssh(&format!(
            "for i in $(seq 1 20); do busybox wget -q -O - http://127.0.0.1:{port}/ && exit 0; sleep 0.5; done; exit 1"
        ));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn root_image(&self, unit: &str) -> String {
        self.host
            .ssh_ok(&format!("systemctl show -p RootImage --value {unit}"))
            .trim()
            .to_owned()
    }

    /// `systemctl is-active UNIT`: `active`, `failed`, `inactive`, …
    pub fn unit_state(&self, unit: &str) -> String {
        let out = self.host.ssh(&format!("systemctl is-active {unit}"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn portables(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .host
            .ssh_ok("ls -A /var/lib/portables 2>/dev/null || true")
            .lines()
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }

    /// A failed run's output and the host's state around `unit`.
    pub fn diag(&self, r: &Run, unit: &str) -> String {
        format!(
            "attache {}\nstdout:\n{}\nstderr:\n{}\n{}",
            r.args,
            r.stdout,
            r.stderr,
            self.host.diagnostics(Some(unit))
        )
    }
}

/// A path handed to attache as an argument (the lab's and the temporary
/// directories' paths are UTF-8).
fn utf8(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("not UTF-8: {}", p.display()))
}

/// The report of the first (only) host of a deploy run with `--json`.
pub fn host_report(r: &Run) -> serde_json::Value {
    r.json()["hosts"][0].clone()
}

/// Polls `cmd` on the host every `every` (each poll is an ssh session:
/// 100 ms only to catch a short-lived state, 1 s for long waits) until it
/// succeeds; false after `limit`.
pub fn wait_for(host: &Host, cmd: &str, limit: Duration, every: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if host.ssh(cmd).status.success() {
            return true;
        }
        std::thread::sleep(every);
    }
    false
}
