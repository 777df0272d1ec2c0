//! `attache publish` with the real nix and the real ssh-keygen, no guest:
//! the directory it writes is checked as a pull host checks it
//! (`sha256sum -c`, `ssh-keygen -Y verify`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use crate::deploy::inventory;
use crate::support::*;

/// A fresh ed25519 key pair without passphrase: (private key, public line).
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen runs");
    assert!(status.success(), "ssh-keygen: {status}");
    let public = std::fs::read_to_string(dir.join(format!("{name}.pub"))).unwrap();
    (key, public.trim().to_owned())
}

/// `sha256sum -c SHA256SUMS` in `dir`, as anyone can check a publish.
fn sums_check(dir: &Path) -> String {
    let out = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "sha256sum -c failed:\n{text}");
    text
}

/// `ssh-keygen -Y verify` exactly as a pull host runs it, with `public` as
/// the one allowed signer.
fn verifies(dir: &Path, public: &str) -> bool {
    let allowed = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        allowed.path(),
        format!("attache-publish namespaces=\"attache-publish\" {public}\n"),
    )
    .unwrap();
    Command::new("ssh-keygen")
        .args([
            "-Y",
            "verify",
            "-I",
            "attache-publish",
            "-n",
            "attache-publish",
            "-f",
        ])
        .arg(allowed.path())
        .arg("-s")
        .arg(dir.join("SHA256SUMS.sig"))
        .stdin(std::fs::File::open(dir.join("SHA256SUMS")).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn pull_hosts(demo: &str, public: &str) -> String {
    format!(
        r#"pkgs: {{
          p1 = {{
            services = [ pkgs.{demo} ];
            pull = {{ url = "http://127.0.0.1:1/attache"; publicKey = "{public}"; }};
          }};
          web1 = {{ services = [ pkgs.echo ]; }};
        }}"#
    )
}

fn mtimes(dir: &Path) -> Vec<(String, SystemTime)> {
    files_in(dir)
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(&f)).unwrap().modified().unwrap();
            (f, m)
        })
        .collect()
}

/// The pull hosts of an inventory, published 1.0 then 2.0: a directory
/// `sha256sum -c` and `ssh-keygen -Y verify` accept, pruned to --keep, not
/// touched by a publish that changes nothing or is refused.
#[test]
fn publish_signs_keeps_and_prunes() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keypair(keys.path(), "publish");
    let (other, other_public) = keypair(keys.path(), "other");
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("www");
    let dir_s = dir.to_str().unwrap();
    let key_s = key.to_str().unwrap();
    let (flake_dir, flake) = inventory(&pull_hosts("demo", &public));
    let hosts_nix = flake_dir.path().join("demo/hosts.nix");
    let publish = |extra: &[&str]| {
        attache_in(
            &repo(),
            cache.path(),
            &[&["publish", "--flake", &flake, "--to", dir_s], extra].concat(),
        )
    };

    // Neither a key nor the explicit choice to go unsigned: nothing written.
    let r = publish(&[]).fails(1);
    assert!(
        r.error()
            .starts_with("publish signs SHA256SUMS: give --key FILE"),
        "{}",
        r.stderr
    );
    assert!(!dir.exists());
    // p1 trusts `publish`, not `other`, and takes nothing unsigned.
    let r = publish(&["--key", other.to_str().unwrap()]).fails(1);
    assert!(
        r.error().starts_with("p1 trusts another key"),
        "{}",
        r.stderr
    );
    let r = publish(&["--insecure-unsigned"]).fails(1);
    assert!(
        r.error()
            .starts_with("p1 accepts only a SHA256SUMS signed by its pull.publicKey"),
        "{}",
        r.stderr
    );
    assert!(!dir.exists());

    // 1.0: only the pull host's service, signed.
    let r = publish(&["--key", key_s, "--json"]).ok();
    // web1 is no pull host, and no selector named it: not a word about it.
    assert!(!r.stderr.contains("web1"), "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["published"][0]["file"], "demo_1.0.raw");
    assert_eq!(j["published"][0]["copied"], true);
    assert_eq!(j["signed"], true);
    assert_eq!(
        files_in(&dir),
        [
            ".attache-publish.lock",
            "SHA256SUMS",
            "SHA256SUMS.sig",
            "demo_1.0.raw",
            "demo_1.0.raw.json"
        ]
    );
    assert_eq!(sums_check(&dir), "demo_1.0.raw: OK\n");
    let v1_sha = sha256_file(&dir.join("demo_1.0.raw"));
    assert_eq!(j["published"][0]["sha256"], v1_sha.as_str());
    assert_eq!(
        std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap(),
        format!("{v1_sha}  demo_1.0.raw\n")
    );
    assert!(verifies(&dir, &public));
    assert!(!verifies(&dir, &other_public));
    assert!(std::fs::read_to_string(dir.join("SHA256SUMS.sig"))
        .unwrap()
        .starts_with("-----BEGIN SSH SIGNATURE-----"));

    // 2.0 with --keep 1: 1.0 and its manifest go.
    std::fs::write(&hosts_nix, pull_hosts("demo-v2", &public)).unwrap();
    let j = publish(&["--key", key_s, "--keep", "1", "--json"])
        .ok()
        .json();
    assert_eq!(j["published"][0]["file"], "demo_2.0.raw");
    assert_eq!(j["pruned"], serde_json::json!(["demo_1.0.raw"]));
    assert_eq!(
        files_in(&dir),
        [
            ".attache-publish.lock",
            "SHA256SUMS",
            "SHA256SUMS.sig",
            "demo_2.0.raw",
            "demo_2.0.raw.json"
        ]
    );
    assert_eq!(sums_check(&dir), "demo_2.0.raw: OK\n");
    assert!(verifies(&dir, &public));
    assert!(!verifies(&dir, &other_public));

    // The same again changes nothing: not a byte, not a time stamp.
    let before = mtimes(&dir);
    std::thread::sleep(Duration::from_millis(20));
    let j = publish(&["--key", key_s, "--keep", "1", "--json"])
        .ok()
        .json();
    assert_eq!(j["published"][0]["copied"], false);
    assert_eq!(j["index_changed"], false);
    assert_eq!(j["pruned"], serde_json::json!([]));
    assert_eq!(mtimes(&dir), before);

    // A dry run of another version says what it would do and does nothing.
    std::fs::write(&hosts_nix, pull_hosts("demo", &public)).unwrap();
    let j = publish(&["--key", key_s, "--keep", "1", "--dry-run", "--json"])
        .ok()
        .json();
    assert_eq!(j["dry_run"], true);
    assert_eq!(j["published"][0]["file"], "demo_1.0.raw");
    assert_eq!(j["published"][0]["copied"], true);
    assert_eq!(mtimes(&dir), before);

    // Naming a push host is refused; with a pull host beside it, it is skipped.
    let r = publish(&["web1", "--key", key_s]).fails(1);
    assert_eq!(
        r.error(),
        "no pull host is selected (web1 is pushed to by attache deploy): select hosts with a pull section"
    );
    let r = publish(&["web1", "p1", "--key", key_s, "--keep", "1", "--dry-run"]).ok();
    assert!(
        r.stderr
            .contains("skipping web1: attache deploy pushes to it, publish is for pull hosts"),
        "{}",
        r.stderr
    );
}

/// Installables ad hoc, unsigned only when asked; hosts and installables
/// do not mix.
#[test]
fn publish_installables_unsigned() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("www");
    let dir_s = dir.to_str().unwrap();
    let run = |args: &[&str]| attache_in(&repo(), cache.path(), args);

    let r = run(&["publish", "./examples/demo#demo", "--to", dir_s]).fails(1);
    assert!(
        r.error().starts_with("publish signs SHA256SUMS"),
        "{}",
        r.stderr
    );
    let r = run(&[
        "publish",
        "./examples/demo#demo",
        "h1",
        "--to",
        dir_s,
        "--insecure-unsigned",
    ])
    .fails(1);
    assert!(
        r.error().starts_with("h1 is no installable"),
        "{}",
        r.stderr
    );
    assert!(!dir.exists());

    let j = run(&[
        "publish",
        "./examples/demo#demo",
        "./examples/demo#demo-v2",
        "--to",
        dir_s,
        "--insecure-unsigned",
        "--json",
    ])
    .ok()
    .json();
    assert_eq!(j["signed"], false);
    assert_eq!(j["indexed"], 2);
    assert_eq!(
        files_in(&dir),
        [
            ".attache-publish.lock",
            "SHA256SUMS",
            "demo_1.0.raw",
            "demo_1.0.raw.json",
            "demo_2.0.raw",
            "demo_2.0.raw.json"
        ]
    );
    assert_eq!(sums_check(&dir), "demo_1.0.raw: OK\ndemo_2.0.raw: OK\n");

    // 1.0 again with other content: published beside it, under its own name.
    let r = run(&[
        "publish",
        "./examples/demo#demo-rebuilt",
        "--to",
        dir_s,
        "--insecure-unsigned",
        "--json",
    ])
    .ok();
    let file = r.json()["published"][0]["file"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        file.starts_with("demo_1.0-") && file.ends_with(".raw"),
        "{file}"
    );
    assert!(
        r.stderr
            .contains("demo_1.0.raw is published with other content"),
        "{}",
        r.stderr
    );
    assert_eq!(sums_check(&dir).lines().count(), 3);
}

/// Ctrl-C while another publish holds the directory: nothing written, exit 3.
#[test]
fn publish_interrupted_while_waiting_writes_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let held = std::fs::File::create(out.path().join(".attache-publish.lock")).unwrap();
    held.lock().unwrap();
    let mut bg = attache_in_background(
        &repo(),
        cache.path(),
        &[
            "publish",
            "./examples/demo#demo",
            "--to",
            out.path().to_str().unwrap(),
            "--insecure-unsigned",
        ],
    );
    bg.expect_stderr("Waiting for another publish", Duration::from_secs(300));
    bg.interrupt();
    let r = bg.join().fails(3);
    assert!(
        r.error()
            .contains("while waiting for another publish; nothing was written"),
        "{}",
        r.stderr
    );
    assert_eq!(files_in(out.path()), [".attache-publish.lock"]);
}

/// A disk that fills up during the copy of 2.0 (a small tmpfs, mounted in
/// a mount namespace of the test's own): exit 2 with the system's reason,
/// no temporary file, and the index still lists 1.0, which still checks.
#[test]
fn publish_on_a_full_disk_keeps_the_last_index() {
    let cache = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    // 1.0 (about 900 KiB) fits, 2.0 beside it does not.
    let script = r#"
        set -u
        mount -t tmpfs -o size=1300k tmpfs "$MNT"
        "$ATTACHE" publish ./examples/demo#demo --to "$MNT/www" --insecure-unsigned -q >/dev/null || exit 10
        "$ATTACHE" publish ./examples/demo#demo-v2 --to "$MNT/www" --insecure-unsigned -q >/dev/null
        echo "exit $?"
        cd "$MNT/www" && ls -A && sha256sum -c SHA256SUMS
    "#;
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", script])
        .current_dir(repo())
        .env("MNT", mnt.path())
        .env("ATTACHE", attache_bin())
        .env("XDG_CACHE_HOME", cache.path())
        .env_remove("ATTACHE_NIX")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout,
        "exit 2\n.attache-publish.lock\nSHA256SUMS\ndemo_1.0.raw\ndemo_1.0.raw.json\ndemo_1.0.raw: OK\n",
        "{stderr}"
    );
    assert!(
        stderr.contains("demo_2.0.raw: No space left on device"),
        "{stderr}"
    );
}

/// Ctrl-C (a real SIGINT) in the middle of copying 2.0, and again between
/// placing 2.0 and writing the index: exit 3, no temporary file, and
/// SHA256SUMS lists 1.0 only, which still checks. A reader at either
/// moment sees the old index, whole.
#[test]
fn publish_interrupted_mid_way_keeps_the_last_index() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("www");
    let dir_s = dir.to_str().unwrap();
    let args = |installable| vec!["publish", installable, "--to", dir_s, "--insecure-unsigned"];
    attache_in(&repo(), cache.path(), &args("./examples/demo#demo")).ok();
    let index = || std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let v1_index = index();

    let mut bg = attache_spawn(
        &repo(),
        cache.path(),
        &args("./examples/demo#demo-v2"),
        &[("ATTACHE_TEST_PAUSE", "publish-copy")],
    );
    bg.expect_pause("publish-copy");
    assert!(
        files_in(&dir).contains(&".demo_2.0.raw.tmp".to_owned()),
        "{:?}",
        files_in(&dir)
    );
    assert_eq!(index(), v1_index);
    assert_eq!(sums_check(&dir), "demo_1.0.raw: OK\n");
    bg.interrupt();
    let r = bg.join().fails(3);
    assert!(
        r.error()
            .starts_with("interrupted while copying demo_2.0.raw"),
        "{}",
        r.stderr
    );
    assert_eq!(
        files_in(&dir),
        [
            ".attache-publish.lock",
            "SHA256SUMS",
            "demo_1.0.raw",
            "demo_1.0.raw.json"
        ]
    );
    assert_eq!(index(), v1_index);

    let mut bg = attache_spawn(
        &repo(),
        cache.path(),
        &args("./examples/demo#demo-v2"),
        &[("ATTACHE_TEST_PAUSE", "publish-index")],
    );
    bg.expect_pause("publish-index");
    // 2.0 is in place, its index is not: readers still get 1.0's.
    assert!(files_in(&dir).contains(&"demo_2.0.raw".to_owned()));
    assert_eq!(index(), v1_index);
    bg.interrupt();
    let r = bg.join().fails(3);
    assert!(
        r.error().contains("before SHA256SUMS was written"),
        "{}",
        r.stderr
    );
    assert!(
        !files_in(&dir).iter().any(|f| f.ends_with(".tmp")),
        "{:?}",
        files_in(&dir)
    );
    assert_eq!(index(), v1_index);
    assert_eq!(sums_check(&dir), "demo_1.0.raw: OK\n");

    // The next publish takes the 2.0 already there.
    let j = attache_in(
        &repo(),
        cache.path(),
        &[&args("./examples/demo#demo-v2")[..], &["--json"]].concat(),
    )
    .ok()
    .json();
    assert_eq!(j["published"][0]["copied"], false);
    assert_eq!(sums_check(&dir), "demo_1.0.raw: OK\ndemo_2.0.raw: OK\n");
}

/// The same images signed with another key, then unsigned: only the
/// signature changes (replaced, then removed), never the index itself.
#[test]
fn publish_resigns_without_rewriting_the_index() {
    let keys = tempfile::tempdir().unwrap();
    let (first, first_public) = keypair(keys.path(), "first");
    let (second, second_public) = keypair(keys.path(), "second");
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("www");
    let dir_s = dir.to_str().unwrap();
    let publish = |extra: &[&str]| {
        attache_in(
            &repo(),
            cache.path(),
            &[&["publish", "./examples/demo#demo", "--to", dir_s], extra].concat(),
        )
        .ok()
        .json()
    };
    let index_mtime = || {
        std::fs::metadata(dir.join("SHA256SUMS"))
            .unwrap()
            .modified()
            .unwrap()
    };

    publish(&["--key", first.to_str().unwrap(), "--json"]);
    assert!(verifies(&dir, &first_public));
    let before = index_mtime();
    std::thread::sleep(Duration::from_millis(20));

    let j = publish(&["--key", second.to_str().unwrap(), "--json"]);
    assert_eq!(j["index_changed"], true);
    assert!(verifies(&dir, &second_public));
    assert!(!verifies(&dir, &first_public));
    assert_eq!(index_mtime(), before);

    // A dry run says the same of dropping the signature, and keeps it.
    let j = publish(&["--insecure-unsigned", "--dry-run", "--json"]);
    assert_eq!(j["index_changed"], true);
    assert!(dir.join("SHA256SUMS.sig").exists());
    let j = publish(&["--insecure-unsigned", "--json"]);
    assert_eq!(j["index_changed"], true);
    assert!(!dir.join("SHA256SUMS.sig").exists());
    assert_eq!(index_mtime(), before);
    assert_eq!(sums_check(&dir), "demo_1.0.raw: OK\n");
}

/// A key with a passphrase, no KEY.pub beside it, and no terminal to type
/// the passphrase (setsid: none at all): refused before anything is built,
/// saying what to do.
#[test]
fn publish_with_a_locked_key_and_no_terminal_says_what_to_do() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("locked");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "secret", "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_file(keys.path().join("locked.pub")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("www");
    let run = Command::new("setsid")
        .arg("-w")
        .arg(attache_bin())
        .args(["publish", "./examples/demo#demo", "--to"])
        .arg(&dir)
        .arg("--key")
        .arg(&key)
        .current_dir(repo())
        .env("XDG_CACHE_HOME", cache.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "ssh-keygen cannot read the key {}: ",
            key.display()
        )) && stderr.contains(
            "(nobody can type a passphrase here: add the key to ssh-agent and pass --key KEY.pub)"
        ),
        "{stderr}"
    );
    assert!(!dir.exists());
}
