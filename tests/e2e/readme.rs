//! The READMEs' commands, run as written: every `attache build`,
//! `attache inspect` and `nix build` line of their shell blocks (picked by
//! pattern, so the READMEs carry no test markup), in order, with the
//! `attache` under test first on PATH. Lines that need a network or hosts
//! (`nix run github:…`, `attache deploy …`) are not picked.
//!
//! Each README runs where its reader would type it: the main README's
//! examples in a project of the reader's own (a flake with `demo`, a
//! `default.nix`, the offline package set as `./stub`, and
//! `examples/demo`), the examples' READMEs in a checkout of this repository.

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// The commands a reader can run offline, from the shell blocks of
/// `markdown`, continuation lines joined.
fn runnable_commands(markdown: &str) -> Vec<String> {
    let mut commands = Vec::new();
    // The info string of the fenced block we are in, if any.
    let mut block: Option<&str> = None;
    let mut pending = String::new();
    for line in markdown.lines() {
        if let Some(info) = line.strip_prefix("```") {
            block = match block {
                Some(_) => None,
                None => Some(info.trim()),
            };
            continue;
        }
        if !matches!(block, Some("" | "sh" | "bash")) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line);
                let command = std::mem::take(&mut pending).trim().to_owned();
                if ["attache build ", "attache inspect ", "nix build "]
                    .iter()
                    .any(|p| command.starts_with(p))
                {
                    commands.push(command);
                }
            }
        }
    }
    commands
}

/// Runs the runnable commands of the README at `readme` (relative to the
/// repository) in `dir`, in order, and returns them.
fn run_readme(readme: &str, dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join(readme)).expect("README");
    let commands = runnable_commands(&text);
    let bin = attache_bin();
    let path = format!(
        "{}:{}",
        bin.parent().expect("bin dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cache = tempfile::tempdir().expect("tempdir");
    for command in &commands {
        eprintln!("{readme}: {command}");
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", command])
            .current_dir(dir)
            .env("PATH", &path)
            .env("PWD", dir)
            .env("XDG_CACHE_HOME", cache.path())
            .env_remove("ATTACHE_NIX")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{readme}: `{command}` failed ({})\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    commands
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "`{script}` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The main README's `.#demo`, `default.nix` and `./stub` are a reader's
/// own project: here the demo flake, a `default.nix` with the same
/// packages, and the offline package set.
#[test]
fn main_readme_commands_run() {
    let project = tempfile::tempdir().expect("tempdir");
    let dir = project.path();
    copy_flake("examples/demo/.", dir);
    std::fs::create_dir(dir.join("examples")).unwrap();
    copy_flake("examples/demo", &dir.join("examples/demo"));
    copy_flake("examples/stub-nixpkgs", &dir.join("stub"));
    std::fs::write(
        dir.join("default.nix"),
        "{ }: (builtins.getFlake (toString ./.)).packages.${builtins.currentSystem}\n",
    )
    .unwrap();
    let ran = run_readme("README.md", dir);
    for expected in [
        "attache build ./examples/demo#demo",
        "attache build -f default.nix demo",
        "attache build --impure --expr",
        "attache build .#demo --override-input nixpkgs path:./stub",
        "attache build .#demo --out-dir images/",
        "attache inspect demo_1.0.raw",
    ] {
        assert!(
            ran.iter().any(|c| c.starts_with(expected)),
            "`{expected}…` not among the README's commands: {ran:#?}"
        );
    }
    assert!(dir.join("images/demo_1.0.raw").is_file());
}

/// The nixpkgs-style example's README runs from a checkout of attache (its
/// `$PWD` is the attache input): a copy of this working tree, so the
/// images it writes land there.
#[test]
fn nixpkgs_style_readme_commands_run() {
    let checkout = tempfile::tempdir().expect("tempdir");
    let dir = checkout.path();
    let repo = repo();
    sh(
        dir,
        &format!(
            "git -C '{r}' ls-files -z --cached --others --exclude-standard \
             | tar -C '{r}' --null --ignore-failed-read -T - -cf - | tar -xf -
             git init -q && git add -A \
             && git -c user.name=t -c user.email=t@t commit -q -m checkout",
            r = repo.display()
        ),
    );
    let ran = run_readme("examples/nixpkgs-style/README.md", dir);
    assert!(
        ran.iter().any(
            |c| c.starts_with("attache build ./examples/nixpkgs-style#default")
                && c.contains("--override-input nixpkgs")
        ),
        "{ran:#?}"
    );
    assert!(ran.iter().any(|c| c.starts_with("nix build")), "{ran:#?}");
    assert!(dir.join("hello-web_0.1.raw").is_file());
}
