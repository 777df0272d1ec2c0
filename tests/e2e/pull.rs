//! Pull hosts on real guests: `attache publish` writes a directory served
//! from this machine's loopback (the guest's `http://10.0.2.100/`),
//! `attache deploy` sets the host up, and from then on the host fetches,
//! verifies and switches by itself (`deploy --now` and `systemctl start
//! attache-pull.service` only say "now" instead of waiting for the timer).
//! One guest per Debian version walks the whole story.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;

use attache_lab::{shared, Guest, Host, Server, FETCH_URL};

use crate::support::*;

struct Pull {
    host: Host,
    server: RefCell<Server>,
    dir: tempfile::TempDir,
    cfg: String,
    flake: String,
    cache: tempfile::TempDir,
    key: PathBuf,
    agent: PathBuf,
}

/// The static attache `scripts/test` builds for nix_build, without its
/// debug info (a quicker upload).
fn agent_binary(dir: &Path) -> PathBuf {
    let bin = crate::nix_build::static_attache();
    let out = dir.join("attache-agent");
    let st = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bin)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "objcopy --strip-debug failed");
    out
}

fn keygen(path: &Path) -> String {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read_to_string(path.with_extension("pub"))
        .unwrap()
        .trim()
        .to_owned()
}

impl Pull {
    fn new(guest: Guest, name: &str) -> Pull {
        let lab = shared();
        let host = lab.host(guest, name).unwrap_or_else(|e| panic!("lab: {e}"));
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ssh_config");
        lab.write_ssh_config(&cfg, &[&host]).unwrap();
        let publish = dir.path().join("publish");
        std::fs::create_dir(&publish).unwrap();
        let server = host.serve(&publish).unwrap();
        let key = dir.path().join("key");
        let public = keygen(&key);
        let demo = dir.path().join("demo");
        copy_demo(&demo);
        std::fs::write(
            demo.join("hosts.nix"),
            format!(
                r#"pkgs: {{
                  {name} = {{
                    services = [ pkgs.demo ];
                    pull = {{ url = "{FETCH_URL}"; interval = "1h"; publicKey = "{public}"; }};
                    checks.demo = [ {{ type = "http"; url = "http://127.0.0.1:8080/"; retries = 5; timeout = 3; }} ];
                    settings.demo."demo.service".Service.Environment = [ "PULL_E2E=1" ];
                  }};
                }}"#
            ),
        )
        .unwrap();
        let agent = agent_binary(dir.path());
        Pull {
            host,
            server: RefCell::new(server),
            cfg: cfg.display().to_string(),
            flake: format!("path:{}", demo.display()),
            cache: tempfile::tempdir().unwrap(),
            key,
            agent,
            dir,
        }
    }

    fn publish_dir(&self) -> PathBuf {
        self.dir.path().join("publish")
    }

    /// `attache VERB --json --ssh-config … --flake … EXTRA…` with the agent.
    fn attache(&self, verb: &str, extra: &[&str]) -> Run {
        let mut args = inventory_args(verb, &self.cfg, &self.flake, &["--json"]);
        args.extend_from_slice(extra);
        attache_spawn(
            &repo(),
            self.cache.path(),
            &args,
            &[("ATTACHE_AGENT", self.agent.to_str().unwrap())],
        )
        .join()
    }

    /// `attache publish INSTALLABLE --to DIR --key KEY`.
    fn publish(&self, installable: &str) {
        let publish = self.publish_dir();
        let args = [
            "publish",
            installable,
            "--to",
            publish.to_str().unwrap(),
            "--key",
            self.key.to_str().unwrap(),
        ];
        attache_in(&repo(), self.cache.path(), &args).ok();
    }

    /// Signs the served SHA256SUMS again with `key`.
    fn sign_with(&self, key: &Path) {
        let sums = self.publish_dir().join("SHA256SUMS");
        let sig = self.publish_dir().join("SHA256SUMS.sig");
        let _ = std::fs::remove_file(&sig);
        let st = Command::new("ssh-keygen")
            .args(["-q", "-Y", "sign", "-n", "attache-publish", "-f"])
            .arg(key)
            .arg(&sums)
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_str(&self.host.ssh_ok("cat /var/lib/attache/pull/state.json")).unwrap()
    }

    fn page(&self) -> String {
        let out = self.host.ssh(
            "for i in $(seq 1 20); do busybox wget -q -O - http://127.0.0.1:8080/ && exit 0; sleep 0.5; done; exit 1",
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn environment(&self) -> String {
        self.host
            .ssh_ok("systemctl show -p Environment --value demo.service")
    }

    fn portables(&self) -> String {
        self.host.ssh_ok("ls -A /var/lib/portables")
    }

    /// Waits out a run of the service already under way: a `systemctl
    /// start` during one joins it, and it may have read the index before
    /// the last publish (the full suite once saw 1.0 served after 2.0 was
    /// published and the service started).
    fn idle(&self) {
        self.host.ssh_ok(
            "for i in $(seq 1 300); do [ \"$(systemctl show -p ActiveState --value attache-pull.service)\" = activating ] || exit 0; sleep 0.5; done; exit 1",
        );
    }

    fn now(&self, code: i32) -> serde_json::Value {
        self.idle();
        let name = self.host.name().to_owned();
        let r = self.attache("deploy", &["--now", &name]);
        assert_eq!(
            r.code,
            code,
            "{}\n{}\n{}",
            r.stdout,
            r.stderr,
            self.host.diagnostics(Some("attache-pull.service"))
        );
        r.json()["pull_hosts"][0]["now"].clone()
    }
}

fn story(guest: Guest) {
    let p = Pull::new(guest, &format!("pull-{guest}"));
    let name = p.host.name().to_owned();

    // Publish 1.0; deploy sets the host up (no image pushed), --now runs it.
    p.publish("./examples/demo#demo");
    let r = p.attache("deploy", &[&name]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let setup = &r.json()["pull_hosts"][0]["setup"];
    assert_eq!(setup["agent"], true, "{setup}");
    assert_eq!(setup["enable"], true, "{setup}");
    assert_eq!(
        p.host
            .ssh_ok("systemctl is-enabled attache-pull.timer")
            .trim(),
        "enabled"
    );
    // From here the story starts the timer's service itself: the timer's
    // own first run (a minute after setup, plus up to a tenth of the
    // interval) could come at any step and race it (the full suite once
    // saw it take the lock while `--now` staged settings). It stays
    // enabled, as setup left it.
    p.host.ssh_ok("systemctl stop attache-pull.timer");
    p.idle();
    // Set up again: nothing rewritten.
    let again = p.attache("deploy", &["--dry-run", &name]).ok();
    let setup = &again.json()["pull_hosts"][0]["setup"];
    assert_eq!(setup["agent"], false, "{setup}");
    assert_eq!(setup["files"], serde_json::json!([]), "{setup}");
    let r = p.attache("deploy", &["--now", &name]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let host = &r.json()["pull_hosts"][0];
    // The timer's own first run (a minute after setup) may have come first.
    assert!(
        matches!(
            host["now"]["outcome"].as_str(),
            Some("switched" | "unchanged")
        ),
        "{host}"
    );
    assert_eq!(p.state()["attached"]["demo"], "1.0");
    assert!(p.page().contains("attache demo 1.0"));
    // Settings stay push-only: staged by deploy through the push
    // transaction once the host has attached the service.
    assert_eq!(
        host["settings"],
        serde_json::json!(["demo: demo.service: new settings"]),
        "{host}"
    );
    assert!(p.environment().contains("PULL_E2E=1"));

    // Publish 2.0: the host's own run (the timer's service) switches. What
    // it costs the origin: the index, its signature, the one new image.
    p.publish("./examples/demo#demo-v2");
    p.idle();
    p.server.borrow().reset_stats();
    let started = std::time::Instant::now();
    p.host.ssh_ok("systemctl start attache-pull.service");
    let wall = started.elapsed();
    assert!(p.page().contains("attache demo 2.0"), "{}", p.state());
    let stats = p.server.borrow().stats();
    let size = |f: &str| std::fs::metadata(p.publish_dir().join(f)).unwrap().len();
    assert_eq!(stats.total().requests, 3, "{stats:?}");
    assert_eq!(
        stats.total().bytes,
        size("SHA256SUMS") + size("SHA256SUMS.sig") + size("demo_2.0.raw"),
        "{stats:?}"
    );
    let cpu = p
        .host
        .ssh_ok("systemctl show -p CPUUsageNSec --value attache-pull.service");
    eprintln!(
        "{guest}: an upgrade pull: {} requests, {} bytes from the origin; {:.1} s wall, {} ns CPU on the host",
        stats.total().requests,
        stats.total().bytes,
        wall.as_secs_f64(),
        cpu.trim()
    );
    let st = p.state();
    assert_eq!(st["attached"]["demo"], "2.0", "{st}");
    // The agent left the settings as they were.
    assert!(p.environment().contains("PULL_E2E=1"));
    assert_eq!(st["last"]["outcome"], "switched", "{st}");

    // A broken release: back to 2.0, remembered, and status says why.
    p.publish("./examples/demo#demo-broken");
    let last = p.now(3);
    assert_eq!(last["outcome"], "rolled-back", "{last}");
    assert!(p.page().contains("attache demo 2.0"));
    let status = p.attache("status", &[&name]).ok();
    let pull = &status.json()["hosts"][0]["pull"];
    assert_eq!(pull["failed"]["demo"], "2.1", "{pull}");
    assert_eq!(pull["attached"]["demo"], "2.0", "{pull}");
    assert!(
        pull["last"]["why"]
            .as_str()
            .unwrap()
            .contains("demo_2.1.raw is not healthy"),
        "{pull}"
    );
    // Not tried again until a newer one is published; a run with nothing
    // new fetches only the index and its signature.
    p.server.borrow().reset_stats();
    let last = p.now(0);
    assert_eq!(last["outcome"], "unchanged", "{last}");
    let stats = p.server.borrow().stats();
    assert_eq!(stats.total().requests, 2, "{stats:?}");
    eprintln!(
        "{guest}: a pull with nothing new: {} requests, {} bytes from the origin",
        stats.total().requests,
        stats.total().bytes
    );

    // A tampered SHA256SUMS: its signature no longer matches.
    let sums = p.publish_dir().join("SHA256SUMS");
    let good = std::fs::read_to_string(&sums).unwrap();
    let flipped = if good.starts_with('0') { "1" } else { "0" };
    std::fs::write(&sums, format!("{flipped}{}", &good[1..])).unwrap();
    let last = p.now(3);
    assert_eq!(last["outcome"], "refused", "{last}");
    assert!(p.page().contains("attache demo 2.0"));
    std::fs::write(&sums, &good).unwrap();

    // A tampered image: listed with its true sha256, served with other bytes.
    let img = p.publish_dir().join("demo_9.0.raw");
    std::fs::copy(p.publish_dir().join("demo_2.0.raw"), &img).unwrap();
    let sum = sha256_file(&img);
    std::fs::write(&sums, format!("{good}{sum}  demo_9.0.raw\n")).unwrap();
    p.sign_with(&p.key);
    let mut bytes = std::fs::read(&img).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&img, bytes).unwrap();
    let last = p.now(3);
    assert_eq!(last["outcome"], "refused", "{last}");
    assert!(
        last["why"].as_str().unwrap().contains("demo_9.0.raw"),
        "{last}"
    );
    assert!(p.page().contains("attache demo 2.0"));
    let left = p.portables();
    assert!(!left.contains("9.0"), "{left}");

    // A signature from another key.
    std::fs::remove_file(&img).unwrap();
    std::fs::write(&sums, &good).unwrap();
    let other = p.dir.path().join("other");
    keygen(&other);
    p.sign_with(&other);
    let last = p.now(3);
    assert_eq!(last["outcome"], "refused", "{last}");
    p.sign_with(&p.key);

    // The server down: the host keeps its version and says so; it works
    // again once the server is back.
    p.server.borrow_mut().stop();
    let last = p.now(2);
    assert_eq!(last["outcome"], "unreachable", "{last}");
    assert!(p.page().contains("attache demo 2.0"));
    p.server.borrow_mut().resume().unwrap();
    let last = p.now(0);
    assert_eq!(last["outcome"], "unchanged", "{last}");
}

#[test]
fn pull_host_story_trixie() {
    story(Guest::Trixie);
}

#[test]
fn pull_host_story_bookworm() {
    story(Guest::Bookworm);
}
