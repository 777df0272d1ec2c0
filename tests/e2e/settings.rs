//! Per-host settings and secrets on real guests: one image, other settings
//! per host; a settings-only change restarts and rolls back like an
//! upgrade; a rotated secret reaches the service and its bytes are found
//! nowhere they must not be. The fixture (tests/fixtures/settings) prints
//! its settings and the SHA-256 of its credential `db` over HTTP.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use attache_lab::{shared, Guest, Host};

use crate::support::*;

const UNIT: &str = "conf.service";
const DROPIN: &str = "/etc/systemd/system/conf.service.d/attache.conf";
const CRED: &str = "/var/lib/attache/settings/live/conf/credentials/db.cred";

/// Lab hosts, an ssh config for them, a copy of the fixture flake, a
/// private build cache and a directory of secret files outside the flake.
struct Fleet {
    hosts: Vec<Host>,
    _dir: tempfile::TempDir,
    cfg: String,
    flake_dir: PathBuf,
    flake: String,
    cache: tempfile::TempDir,
    secrets: PathBuf,
}

impl Fleet {
    fn new(guest: Guest, names: &[&str]) -> Fleet {
        let lab = shared();
        let hosts = lab
            .hosts(guest, names)
            .unwrap_or_else(|e| panic!("lab: {e}"));
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ssh_config");
        lab.write_ssh_config(&cfg, &hosts.iter().collect::<Vec<_>>())
            .unwrap();
        let flake_dir = dir.path().join("conf");
        copy_flake("tests/fixtures/settings", &flake_dir);
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        Fleet {
            hosts,
            cfg: cfg.display().to_string(),
            flake: format!("path:{}", flake_dir.display()),
            flake_dir,
            cache: tempfile::tempdir().unwrap(),
            secrets,
            _dir: dir,
        }
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name() == name).unwrap()
    }

    fn inventory(&self, hosts_nix: &str) {
        std::fs::write(self.flake_dir.join("hosts.nix"), hosts_nix).unwrap();
    }

    /// Writes the secret `name` (a file outside the flake); returns its path.
    fn secret(&self, name: &str, value: &str) -> String {
        let p = self.secrets.join(name);
        std::fs::write(&p, value).unwrap();
        p.display().to_string()
    }

    fn args<'a>(&'a self, verb: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = inventory_args(verb, &self.cfg, &self.flake, &["--json"]);
        a.extend_from_slice(extra);
        a
    }

    fn attache(&self, verb: &str, extra: &[&str]) -> Run {
        attache_in(&repo(), self.cache.path(), &self.args(verb, extra))
    }

    fn page(&self, host: &str, port: u16) -> String {
        let out = self.host(host).ssh(&format!(
            "for i in $(seq 1 20); do busybox wget -q -O - http://127.0.0.1:{port}/ && exit 0; sleep 0.5; done; exit 1"
        ));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn invocation(&self, host: &str) -> String {
        self.host(host)
            .ssh_ok(&format!("systemctl show -p InvocationID --value {UNIT}"))
            .trim()
            .to_owned()
    }

    fn diag(&self, r: &Run, host: &str) -> String {
        format!(
            "attache {}\nstdout:\n{}\nstderr:\n{}\n{}",
            r.args,
            r.stdout,
            r.stderr,
            self.host(host).diagnostics(Some(UNIT))
        )
    }
}

/// One host's inventory entry: the fixture with `env` and the secret file.
fn entry(name: &str, port: u16, env: &[&str], secret: Option<&str>, extra: &str) -> String {
    let env: Vec<String> = env.iter().map(|e| format!("\"{e}\"")).collect();
    let secret = secret
        .map(|f| format!("secrets.conf.db = {{ file = \"{f}\"; }};"))
        .unwrap_or_default();
    format!(
        r#"{name} = {{
            services = [ pkgs.conf ];
            settings.conf."conf.service".Service.Environment = [ {} ];
            {secret}
            {extra}
            checks.conf = [ {{ type = "http"; url = "http://127.0.0.1:{port}/"; retries = 5; timeout = 3; }} ];
          }};"#,
        env.join(" ")
    )
}

fn sha256_hex(s: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A value no file on any machine holds by chance.
fn fresh_secret(tag: &str) -> String {
    format!(
        "attache-e2e-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn store_paths() -> BTreeSet<String> {
    std::fs::read_dir("/nix/store")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The files under `paths` that contain `needle` (grep -r, text or not).
fn files_containing(needle: &str, paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return String::new();
    }
    let out = Command::new("grep")
        .args(["-rlaF", "--", needle])
        .args(paths)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `run` while watching the argument lists of every process, locally
/// and on `host`; returns its result and all the watch saw (local, host).
fn watching_ps(host: &Host, run: impl FnOnce() -> Run) -> (Run, String, String) {
    use std::sync::atomic::{AtomicBool, Ordering};
    host.ssh_ok("rm -f /run/attache-e2e-ps-stop");
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let local = sc.spawn(|| {
            let mut seen = String::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(o) = Command::new("ps").args(["-eww", "-o", "args"]).output() {
                    seen += &String::from_utf8_lossy(&o.stdout);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        let remote = sc.spawn(|| {
            let out = host.ssh(
                "i=0; while [ ! -e /run/attache-e2e-ps-stop ] && [ $i -lt 3000 ]; do ps -eww -o args; i=$((i+1)); sleep 0.05; done",
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        });
        let r = run();
        stop.store(true, Ordering::Relaxed);
        host.ssh_ok("touch /run/attache-e2e-ps-stop");
        (r, local.join().unwrap(), remote.join().unwrap())
    })
}

fn report_of<'a>(j: &'a serde_json::Value, host: &str) -> &'a serde_json::Value {
    j["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .unwrap_or_else(|| panic!("no report for {host}: {j}"))
}

/// Two Debian 12 hosts, one image, their own settings and secret.
#[test]
fn settings_and_secrets_bookworm() {
    let f = Fleet::new(Guest::Bookworm, &["set1", "set2"]);
    let store_before = store_paths();
    let (s1, s2) = (fresh_secret("one"), fresh_secret("two"));
    let (f1, f2) = (f.secret("db1", &s1), f.secret("db2", &s2));
    let inventory = |greeting1: &str, port1: &str| {
        format!(
            "pkgs: {{\n{}\n{}\n}}",
            entry(
                "set1",
                8091,
                &["PORT=8091", &format!("GREETING={greeting1}"), port1],
                Some(&f1),
                ""
            ),
            entry(
                "set2",
                8092,
                &["PORT=8092", "GREETING=hello-set2"],
                Some(&f2),
                ""
            ),
        )
    };
    f.inventory(&inventory("hello-set1", "X=1"));

    // Both hosts, one image: the same sha256, each its own settings.
    let r = f.attache("deploy", &[]);
    assert_eq!(r.code, 0, "{}", f.diag(&r, "set1"));
    let j = r.json();
    let (h1, h2) = (report_of(&j, "set1"), report_of(&j, "set2"));
    assert_eq!(
        h1["services"][0]["sha256"], h2["services"][0]["sha256"],
        "{j}"
    );
    assert_eq!(r.stderr.matches("Building").count(), 1, "{}", r.stderr);
    assert_eq!(h1["services"][0]["action"], "attach");
    let what = h1["services"][0]["settings"].to_string();
    assert!(what.contains("conf.service: new settings"), "{what}");
    assert!(what.contains("secret db: new"), "{what}");
    assert_eq!(
        f.page("set1", 8091),
        format!(
            "greeting=hello-set1 port=8091 db-sha256={}",
            sha256_hex(&s1)
        )
    );
    assert_eq!(
        f.page("set2", 8092),
        format!(
            "greeting=hello-set2 port=8092 db-sha256={}",
            sha256_hex(&s2)
        )
    );

    // The same inventory again touches nothing.
    let before = f.invocation("set1");
    let r = f.attache("deploy", &["set1"]);
    assert_eq!(r.code, 0, "{}", f.diag(&r, "set1"));
    assert_eq!(host_report(&r)["services"][0]["action"], "unchanged");
    assert_eq!(f.invocation("set1"), before);

    // A changed setting alone: no upload, no reattach, a restart.
    f.inventory(&inventory("hi-again", "X=1"));
    let dry = f.attache("deploy", &["--dry-run", "set1"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(
        dry.json()
            .to_string()
            .contains("conf.service: settings changed"),
        "{}",
        dry.stdout
    );
    assert_eq!(f.invocation("set1"), before, "--dry-run changed nothing");
    let r = f.attache("deploy", &["set1"]);
    assert_eq!(r.code, 0, "{}", f.diag(&r, "set1"));
    let h = host_report(&r);
    assert_eq!(h["services"][0]["action"], "restart", "{h}");
    assert_eq!(h["services"][0]["upload"], false);
    assert_eq!(h["bytes_sent"], 0);
    assert_ne!(f.invocation("set1"), before);
    assert!(f
        .page("set1", 8091)
        .starts_with("greeting=hi-again port=8091"));
    assert_eq!(
        f.host("set1")
            .ssh_ok("systemctl show -p RootImage --value conf.service")
            .trim(),
        "/var/lib/portables/conf_1.0.raw"
    );

    // A broken setting (the port the check asks is no longer served)
    // rolls back to the settings before it.
    let good_dropin = f.host("set1").ssh_ok(&format!("cat {DROPIN}"));
    f.inventory(&inventory("broken", "PORT=8099"));
    let r = f.attache("deploy", &["set1"]);
    assert_eq!(r.code, 3, "{}", f.diag(&r, "set1"));
    assert_eq!(host_report(&r)["outcome"], "rolled-back");
    assert!(f
        .page("set1", 8091)
        .starts_with("greeting=hi-again port=8091"));
    assert_eq!(f.host("set1").ssh_ok(&format!("cat {DROPIN}")), good_dropin);

    // A rotated secret reaches the service; its bytes are seen nowhere.
    let s1b = fresh_secret("rotated");
    f.secret("db1", &s1b);
    f.inventory(&inventory("hi-again", "X=1"));
    let (r, local_ps, host_ps) = watching_ps(f.host("set1"), || f.attache("deploy", &["set1"]));
    assert_eq!(r.code, 0, "{}", f.diag(&r, "set1"));
    let h = host_report(&r);
    assert_eq!(h["services"][0]["action"], "restart", "{h}");
    assert_eq!(h["services"][0]["settings"][0], "secret db: rotated", "{h}");
    assert_eq!(
        f.page("set1", 8091),
        format!("greeting=hi-again port=8091 db-sha256={}", sha256_hex(&s1b))
    );
    assert!(
        host_ps.contains("ps -eww -o args"),
        "the watch ran: {host_ps}"
    );
    for secret in [&s1, &s1b, &s2] {
        assert!(!local_ps.contains(secret.as_str()), "local ps shows it");
        assert!(!host_ps.contains(secret.as_str()), "host ps shows it");
        assert!(!r.stdout.contains(secret.as_str()) && !r.stderr.contains(secret.as_str()));
        let new_paths: Vec<PathBuf> = store_paths()
            .difference(&store_before)
            .map(|p| Path::new("/nix/store").join(p))
            .collect();
        assert_eq!(files_containing(secret, &new_paths), "", "in the Nix store");
        assert_eq!(
            files_containing(secret, &[f.cache.path().to_owned()]),
            "",
            "in the local cache"
        );
        for host in ["set1", "set2"] {
            let count = f.host(host).ssh_ok(&format!(
                "journalctl --no-pager -o cat | grep -cF -- {} || true",
                attache_lab::shell_quote(secret)
            ));
            assert_eq!(count.trim(), "0", "the journal of {host} has it");
            let count = f.host(host).ssh_ok(&format!(
                "grep -rlaF -- {} /var/lib/attache /etc/systemd /var/lib/portables | wc -l",
                attache_lab::shell_quote(secret)
            ));
            assert_eq!(count.trim(), "0", "attache's files on {host} have it");
        }
    }
    // The credential is encrypted, root's only, and handed over encrypted.
    let set1 = f.host("set1");
    assert_eq!(set1.ssh_ok(&format!("stat -c %a {CRED}")).trim(), "600");
    assert_eq!(
        set1.ssh_ok("stat -c %a /var/lib/attache/settings").trim(),
        "700"
    );
    assert!(set1
        .ssh_ok(&format!("cat {DROPIN}"))
        .contains(&format!("LoadCredentialEncrypted=db:{CRED}")));

    // status: name, size and age only.
    let r = f.attache("status", &["set1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let st = r.json();
    let secret = &st["hosts"][0]["services"][0]["secrets"][0];
    assert_eq!(secret["name"], "db", "{st}");
    assert_eq!(secret["size"], s1b.len(), "{st}");
    assert!(!r.stdout.contains(&s1b));

    // rollback undoes the last deploy, a settings-only one: the secret
    // before the rotation is back.
    let r = f.attache("rollback", &["set1", "conf"]);
    assert_eq!(r.code, 0, "{}", f.diag(&r, "set1"));
    assert_eq!(
        f.page("set1", 8091),
        format!("greeting=hi-again port=8091 db-sha256={}", sha256_hex(&s1))
    );

    // Detach takes the drop-in and the credentials along.
    let r = f.attache("detach", &["set1", "conf"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        set1.ssh_ok(&format!(
            "ls {DROPIN} /var/lib/attache/settings/live/conf 2>/dev/null | wc -l"
        ))
        .trim(),
        "0"
    );
}

/// Through sudo: secrets reach root's stdin as they do without it.
const DEPLOY: &str = r#"user = "deploy";"#;

/// A Debian 13 host without systemd-creds: refused before anything
/// changes, unless the inventory asks for plain credentials. attache logs
/// in as a user that deploys through sudo.
#[test]
fn host_that_cannot_encrypt_trixie() {
    let f = Fleet::new(Guest::Trixie, &["nocreds"]);
    let h = f.host("nocreds");
    h.ssh_ok("mv /usr/bin/systemd-creds /usr/bin/systemd-creds.hidden");
    let s = fresh_secret("plain");
    let file = f.secret("db", &s);
    f.inventory(&format!(
        "pkgs: {{\n{}\n}}",
        entry("nocreds", 8093, &["PORT=8093"], Some(&file), DEPLOY)
    ));
    let r = f.attache("deploy", &[]);
    assert_eq!(r.code, 3, "{}", f.diag(&r, "nocreds"));
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(
        err.contains("cannot encrypt credentials (systemd-creds is missing)")
            && err.contains("unencryptedSecrets = true;"),
        "{err}"
    );
    assert_eq!(
        h.ssh_ok(
            "ls -A /var/lib/portables /var/lib/attache/settings 2>/dev/null | grep -c raw || true"
        )
        .trim(),
        "0",
        "nothing was changed"
    );

    f.inventory(&format!(
        "pkgs: {{\n{}\n}}",
        entry(
            "nocreds",
            8093,
            &["PORT=8093"],
            Some(&file),
            &format!("{DEPLOY} unencryptedSecrets = true;")
        )
    ));
    let r = f.attache("deploy", &[]);
    assert_eq!(r.code, 0, "{}", f.diag(&r, "nocreds"));
    assert_eq!(
        f.page("nocreds", 8093),
        format!("greeting=default port=8093 db-sha256={}", sha256_hex(&s))
    );
    assert_eq!(h.ssh_ok(&format!("stat -c %a {CRED}")).trim(), "600");
    assert!(h
        .ssh_ok(&format!("cat {DROPIN}"))
        .contains(&format!("LoadCredential=db:{CRED}")));
    h.ssh_ok("mv /usr/bin/systemd-creds.hidden /usr/bin/systemd-creds");

    // A settings change whose deploy is cut off after the switch: the
    // host's own revert puts the settings (and the plain credential) back.
    f.inventory(&format!(
        "pkgs: {{\n{}\n}}",
        entry(
            "nocreds",
            8093,
            &["PORT=8093", "GREETING=away"],
            Some(&file),
            DEPLOY
        )
    ));
    let mut args = f.args("deploy", &["--rollback-after", "90"]);
    args.push("nocreds");
    let mut bg = attache_spawn(
        &repo(),
        f.cache.path(),
        &args,
        &[
            ("ATTACHE_TEST_PAUSE", "after-activate"),
            ("ATTACHE_TEST_PAUSE_SECS", "600"),
        ],
    );
    bg.expect_pause("after-activate");
    assert!(f
        .page("nocreds", 8093)
        .starts_with("greeting=away port=8093"));
    assert!(h
        .ssh_ok(&format!("cat {DROPIN}"))
        .contains(&format!("LoadCredentialEncrypted=db:{CRED}")));
    drop(bg);
    assert!(
        wait_for(
            h,
            "busybox wget -q -O - http://127.0.0.1:8093/ | grep -q greeting=default",
            Duration::from_secs(90 + 120),
            Duration::from_secs(2)
        ),
        "the host did not put the settings back\n{}",
        h.diagnostics(Some(UNIT))
    );
    assert_eq!(
        f.page("nocreds", 8093),
        format!("greeting=default port=8093 db-sha256={}", sha256_hex(&s))
    );
    assert!(h
        .ssh_ok(&format!("cat {DROPIN}"))
        .contains(&format!("LoadCredential=db:{CRED}")));
}

/// A Nix path as a secret would be copied into the store by evaluation:
/// the inventory refuses it, before anything is built or contacted.
#[test]
fn nix_path_literal_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let flake_dir = dir.path().join("conf");
    copy_flake("tests/fixtures/settings", &flake_dir);
    std::fs::write(flake_dir.join("db"), "not-for-the-store").unwrap();
    std::fs::write(
        flake_dir.join("hosts.nix"),
        "pkgs: { h1 = { services = [ pkgs.conf ]; secrets.conf.db = { file = ./db; }; }; }",
    )
    .unwrap();
    let flake = format!("path:{}", flake_dir.display());
    let r = attache(&["deploy", "--dry-run", "--flake", &flake]).fails(1);
    assert!(
        r.stderr.contains("h1.secrets.conf.db.file is a Nix path, and evaluating it would copy the secret into the world-readable Nix store; write it as a string instead"),
        "{}",
        r.stderr
    );
}
