//! Shared helpers of the end-to-end suite: run the real `attache` binary and
//! read images back with the real squashfs tools.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
    let status = Command::new("cp")
        .arg("-rL")
        .arg(repo().join("examples/demo"))
        .arg(dest)
        .status()
        .unwrap();
    assert!(status.success(), "cp -rL examples/demo: {status}");
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

/// Runs `attache ARGS` in `cwd` with a private cache dir, so tests do not see
/// each other's build cache unless they share `cache`.
pub fn attache_in(cwd: &Path, cache: &Path, args: &[&str]) -> Run {
    let out = Command::new(attache_bin())
        .args(args)
        .current_dir(cwd)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("ATTACHE_NIX")
        .stdin(Stdio::null())
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
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            args: args.join(" "),
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
