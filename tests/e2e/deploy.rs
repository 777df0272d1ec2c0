//! `attache deploy`, `status`, `rollback` and `detach` against real systemd
//! guests from the lab. Every assertion is about what the host shows over
//! ssh: what the service answers, its `RootImage`, the files in
//! /var/lib/portables.

use std::time::{Duration, Instant};

use attache_lab::{shared, Guest};

use crate::support::*;

/// The main path, on one guest: first deploy, unchanged redeploy, upgrade,
/// a broken release that rolls back, status, rollback, detach.
fn main_path(guest: Guest) {
    let t = target(guest, &format!("main-{guest}"));
    let started = Instant::now();

    // First deploy: attach.
    let r = t.deploy(&["./examples/demo#demo"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, "demo.service"));
    let h = host_report(&r);
    assert_eq!(h["outcome"], "healthy");
    assert_eq!(h["services"][0]["action"], "attach");
    assert!(h["bytes_sent"].as_u64().unwrap() > 0);
    let first_trips = round_trips(&h);
    assert_eq!(first_trips, FIRST_TRIPS, "{h}");
    // The confirm is one round-trip, timed in its own stage.
    let confirm = h["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["stage"] == "confirm")
        .unwrap_or_else(|| panic!("no confirm stage: {h}"));
    assert_eq!(
        (&confirm["round_trips"], &confirm["ok"]),
        (&1.into(), &true.into()),
        "{h}"
    );
    assert!(t.page(8080).contains("attache demo 1.0"));
    assert_eq!(
        t.root_image("demo.service"),
        "/var/lib/portables/demo_1.0.raw"
    );
    assert_eq!(t.portables(), ["demo_1.0.raw"]);
    // The timer attach enabled is running too.
    assert_eq!(
        t.host.ssh_ok("systemctl is-active demo-tick.timer").trim(),
        "active"
    );

    // Unchanged: nothing uploaded, nothing reattached, still checked.
    let r = t.deploy(&["./examples/demo#demo"], &[]).ok();
    let h = host_report(&r);
    assert_eq!(h["bytes_sent"], 0);
    assert_eq!(h["services"][0]["action"], "unchanged");
    assert_eq!(h["outcome"], "healthy");
    let unchanged_trips = round_trips(&h);
    assert!(unchanged_trips <= UNCHANGED_TRIPS, "{h}");

    // Upgrade: reattach, new content served.
    let r = t.deploy(&["./examples/demo#demo-v2"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, "demo.service"));
    let h = host_report(&r);
    assert_eq!(h["services"][0]["action"], "reattach");
    assert_eq!(
        h["services"][0]["previous"],
        "/var/lib/portables/demo_1.0.raw"
    );
    let upgrade_trips = round_trips(&h);
    assert_eq!(upgrade_trips, UPGRADE_TRIPS, "{h}");
    eprintln!("{guest}: round-trips: first deploy {first_trips}, unchanged {unchanged_trips}, upgrade {upgrade_trips}");
    assert!(t.page(8080).contains("attache demo 2.0"));
    assert_eq!(
        t.root_image("demo.service"),
        "/var/lib/portables/demo_2.0.raw"
    );
    // Confirmed: the automatic rollback is disarmed.
    let armed = t.host.ssh("systemctl is-active attache-deadman-demo.timer");
    assert!(!armed.status.success(), "the dead-man timer is still armed");

    // A broken release: the unit fails, 2.0 comes back, exit code 3.
    let r = t.deploy(&["./examples/demo#demo-broken"], &[]).fails(3);
    let h = host_report(&r);
    assert_eq!(
        h["outcome"],
        "rolled-back",
        "{}",
        t.diag(&r, "demo.service")
    );
    assert!(
        h["error"]
            .as_str()
            .unwrap()
            .contains("demo_2.1.raw is not healthy: demo.service is failed"),
        "{h}"
    );
    assert!(t.page(8080).contains("attache demo 2.0"));
    assert_eq!(
        t.root_image("demo.service"),
        "/var/lib/portables/demo_2.0.raw"
    );
    // Pruned to the two newest, the attached one kept.
    assert!(t.portables().len() <= 3, "{:?}", t.portables());

    // status reads the truth from the drop-ins.
    let name = t.host.name().to_owned();
    let s = t.attache(&["status", "--json", &name]).ok().json();
    let svc = &s["hosts"][0]["services"][0];
    assert_eq!(svc["name"], "demo");
    assert_eq!(svc["version"], "2.0");
    assert_eq!(svc["image"], "/var/lib/portables/demo_2.0.raw");
    assert_eq!(svc["units"]["demo.service"], "active (running)");

    // rollback goes back to what 2.0 replaced.
    t.attache(&["rollback", &name, "demo"]).ok();
    assert!(t.page(8080).contains("attache demo 1.0"));
    assert_eq!(
        t.root_image("demo.service"),
        "/var/lib/portables/demo_1.0.raw"
    );

    // detach: nothing of demo is left attached.
    t.attache(&["detach", &name, "demo"]).ok();
    let active = t.host.ssh("systemctl is-active demo.service");
    assert!(!active.status.success());
    let s = t.attache(&["status", "--json", &name]).ok().json();
    assert_eq!(s["hosts"][0]["services"], serde_json::json!([]));
    eprintln!(
        "{guest}: main deploy path in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// At most this many commands run on the host for an unchanged redeploy:
/// connect, lock and read the host, hash its image, check the service
/// (units and checks at once, no settle time: it was running and nothing
/// changed).
const UNCHANGED_TRIPS: u64 = 4;

/// A first deploy on a host with no image: connect, lock and read, push,
/// activate (and take the first sample), settle and check, confirm
/// (disarm, check nothing moved, record and prune).
const FIRST_TRIPS: u64 = 6;

/// An upgrade: a first deploy's, and reading the signatures of the
/// images a delta can start from.
const UPGRADE_TRIPS: u64 = 7;

/// The host's round-trips, every one of them inside a stage.
fn round_trips(h: &serde_json::Value) -> u64 {
    let total = h["round_trips"].as_u64().unwrap();
    let staged: u64 = h["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| st["round_trips"].as_u64().unwrap())
        .sum();
    assert!(staged == total && total > 0, "{h}");
    total
}

#[test]
fn main_path_bookworm() {
    main_path(Guest::Bookworm);
}

#[test]
fn main_path_trixie() {
    main_path(Guest::Trixie);
}

/// The host is connected to, locked and read while the image builds; a
/// build that fails says so, and leaves neither the lock nor a connection
/// behind: the next deploy goes through.
#[test]
fn build_failure_releases_the_early_lock() {
    let t = target(Guest::Bookworm, "buildfail");
    t.host.ssh_ok("rm -f /run/attache/lock.holder");
    let r = t.deploy(&["./examples/demo#notadrv"], &[]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("is a string, not a derivation"),
        "{}",
        r.stderr
    );
    // Taken while building (its holder is recorded), and free now.
    t.host.ssh_ok("test -s /run/attache/lock.holder");
    t.host.ssh_ok("flock -n /run/attache/lock true");
    let r = t.deploy(&["./examples/demo#demo"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, "demo.service"));
    let h = host_report(&r);
    assert_eq!(h["outcome"], "healthy");
    assert_eq!(round_trips(&h), FIRST_TRIPS, "{h}");
}

#[test]
fn socket_activated_service_with_template() {
    let t = target(Guest::Bookworm, "sock");
    let r = t.deploy(&["./examples/demo#echo"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, "echo.socket"));
    assert_eq!(host_report(&r)["outcome"], "healthy");
    assert!(
        !r.stderr.contains("missing the instance name"),
        "{}",
        r.stderr
    );
    let answer = t.host.ssh_ok(
        "for i in $(seq 1 10); do a=$(echo hello | busybox nc -w 3 127.0.0.1 7777) && [ -n \"$a\" ] && { echo \"$a\"; exit 0; }; sleep 0.5; done; exit 1",
    );
    assert_eq!(answer.trim(), "echo: hello");
    assert_eq!(
        t.host.ssh_ok("systemctl is-active echo.socket").trim(),
        "active"
    );
}

/// A copy of the demo flake with an inventory for lab hosts.
pub fn inventory(hosts_nix: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    copy_demo(&demo);
    std::fs::write(demo.join("hosts.nix"), hosts_nix).unwrap();
    let flake = format!("path:{}", demo.display());
    (dir, flake)
}

#[test]
fn failing_http_check_rolls_back() {
    let t = target(Guest::Bookworm, "httpchk");
    t.deploy(&["./examples/demo#demo"], &[]).ok();
    let (_dir, flake) = inventory(
        r#"pkgs: {
          httpchk = {
            services = { demo = pkgs.demo-v2; };
            checks.demo = [ { type = "http"; url = "http://127.0.0.1:9999/"; retries = 2; timeout = 3; } ];
          };
        }"#,
    );
    let r = t.attache(&["deploy", "--json", "--flake", &flake]).fails(3);
    let h = host_report(&r);
    assert_eq!(
        h["outcome"],
        "rolled-back",
        "{}",
        t.diag(&r, "demo.service")
    );
    assert!(h["error"]
        .as_str()
        .unwrap()
        .contains("HTTP check http://127.0.0.1:9999/ failed"));
    assert!(t.page(8080).contains("attache demo 1.0"));
    assert_eq!(
        t.root_image("demo.service"),
        "/var/lib/portables/demo_1.0.raw"
    );
}

/// par0 cannot be reached (nothing listens on port 1); par1 and par2 are
/// lab hosts.
#[test]
fn three_hosts_one_unreachable_keep_going_and_canary() {
    let lab = shared();
    let hosts = lab.hosts(Guest::Bookworm, &["par1", "par2"]).unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("ssh_config");
    lab.write_ssh_config(&cfg, &hosts.iter().collect::<Vec<_>>())
        .unwrap();
    let (_dir, flake) = inventory(
        r#"pkgs: {
          par0 = { host = "127.0.0.1"; port = 1; tags = [ "web" ]; services = [ pkgs.demo ]; };
          par1 = { tags = [ "web" ]; services = [ pkgs.demo ]; };
          par2 = { tags = [ "web" ]; services = [ pkgs.demo ]; };
        }"#,
    );
    let cache = tempfile::tempdir().unwrap();
    let cfg_s = cfg.display().to_string();
    let r = attache_in(
        &repo(),
        cache.path(),
        &[
            "deploy",
            "--json",
            "--ssh-config",
            &cfg_s,
            "--flake",
            &flake,
            "--keep-going",
            "@web",
        ],
    )
    .fails(3);
    let j = r.json();
    let outcome = |i: usize| j["hosts"][i]["outcome"].as_str().unwrap().to_owned();
    assert_eq!(j["hosts"][0]["host"], "par0");
    assert_eq!(outcome(0), "failed");
    assert_eq!(outcome(1), "healthy", "{}", r.stdout);
    assert_eq!(outcome(2), "healthy", "{}", r.stdout);
    let err = j["hosts"][0]["error"].as_str().unwrap();
    assert!(err.starts_with("par0: cannot connect over SSH:"), "{err}");
    // Three hosts run one derivation: it is evaluated and built once.
    assert_eq!(r.stderr.matches("Building").count(), 1, "{}", r.stderr);
    for h in &hosts {
        assert_eq!(
            h.ssh_ok("systemctl show -p RootImage --value demo.service")
                .trim(),
            "/var/lib/portables/demo_1.0.raw"
        );
    }
    // A failed canary stops the rest before they start.
    let r = attache_in(
        &repo(),
        cache.path(),
        &[
            "deploy",
            "--json",
            "--ssh-config",
            &cfg_s,
            "--flake",
            &flake,
            "--canary",
            "1",
        ],
    )
    .fails(3);
    let j = r.json();
    let outcomes: Vec<&str> = (0..3)
        .map(|i| j["hosts"][i]["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["failed", "skipped", "skipped"], "{}", r.stdout);
    // An unknown host or tag names the known ones.
    let r = attache_in(
        &repo(),
        cache.path(),
        &["deploy", "--ssh-config", &cfg_s, "--flake", &flake, "nope"],
    )
    .fails(1);
    assert_eq!(
        r.error(),
        "no host or tag matches 'nope'. Known hosts: par0, par1, par2; tags: @web"
    );
}

#[test]
fn changed_host_key_is_refused() {
    let t = target(Guest::Bookworm, "hostkey");
    t.deploy(&["./examples/demo#demo"], &[]).ok();
    t.host.change_host_key().unwrap();
    let r = t.deploy(&["./examples/demo#demo-v2"], &[]).fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(
        err.starts_with("hostkey: the host key has changed (the host now offers SHA256:"),
        "{err}"
    );
    // Nothing changed on the host.
    assert_eq!(
        t.root_image("demo.service"),
        "/var/lib/portables/demo_1.0.raw"
    );
}

#[test]
fn non_root_users() {
    let t = target(Guest::Bookworm, "sudo");
    let dest = format!("deploy@{}", t.host.name());
    let r = t.attache(&[
        "deploy",
        "--json",
        "--sudo",
        "--to",
        &dest,
        "./examples/demo#demo",
    ]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, "demo.service"));
    assert!(t.page(8080).contains("attache demo 1.0"));

    let dest = format!("sudopw@{}", t.host.name());
    let r = t
        .attache(&[
            "deploy",
            "--json",
            "--sudo",
            "--to",
            &dest,
            "./examples/demo#demo-v2",
        ])
        .fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(
        err.contains("sudo needs a password for user sudopw; attache runs sudo non-interactively"),
        "{err}"
    );
    let dest = format!("nosudo@{}", t.host.name());
    let r = t
        .attache(&["deploy", "--json", "--to", &dest, "./examples/demo#demo-v2"])
        .fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(err.contains("who is not root, and sudo is off"), "{err}");
    assert_eq!(
        t.root_image("demo.service"),
        "/var/lib/portables/demo_1.0.raw"
    );
}

/// `ProxyJump` from the user's ssh config is followed: the host is reached
/// through itself (its sshd forwards to its own 127.0.0.1:22), the only
/// second hop a lab guest has, with the host key checked at both hops.
#[test]
fn through_a_jump_host() {
    let t = target(Guest::Bookworm, "jump");
    let name = t.host.name().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let known = std::fs::read_to_string(t.host.known_hosts_path()).unwrap();
    let inner_known = dir.path().join("known_hosts");
    let key = known
        .split_once(' ')
        .map(|(_, key)| key.to_owned())
        .unwrap();
    std::fs::write(&inner_known, format!("127.0.0.1 {key}")).unwrap();
    let outer = t.host.ssh_config();
    let inner = outer
        .replace(&format!("Host {name}\n"), "Host behind\n")
        .replace(&format!("Port {}\n", t.host.port()), "Port 22\n")
        .replace(
            &t.host.known_hosts_path().display().to_string(),
            &inner_known.display().to_string(),
        )
        .replace("\n\n", &format!("\n  ProxyJump {name}\n\n"));
    let cfg = dir.path().join("ssh_config");
    std::fs::write(&cfg, format!("{outer}{inner}")).unwrap();
    let cfg = cfg.display().to_string();
    let r = attache_in(
        &repo(),
        t.cache.path(),
        &[
            "deploy",
            "--ssh-config",
            &cfg,
            "--json",
            "--to",
            "behind",
            "./examples/demo#demo",
        ],
    );
    assert_eq!(
        r.code,
        0,
        "{}\nconfig:\n{outer}{inner}",
        t.diag(&r, "demo.service")
    );
    assert_eq!(host_report(&r)["outcome"], "healthy", "{}", r.stdout);
    assert!(t.page(8080).contains("attache demo 1.0"));
}

#[test]
fn connection_killed_during_upload() {
    let t = target(Guest::Bookworm, "cut");
    t.deploy(&["./examples/demo#demo"], &[]).ok();
    // Build first, so the deploy below spends its time uploading.
    let out = tempfile::tempdir().unwrap();
    let o = out.path().display().to_string();
    attache_in(
        &repo(),
        t.cache.path(),
        &["build", "-o", &o, "./examples/demo#big"],
    )
    .ok();

    let deployer = t.deploy_in_background(&["./examples/demo#big"], &[]);
    assert!(
        wait_for(
            &t.host,
            "ls /var/lib/portables/.*.attache-partial",
            Duration::from_secs(120),
            // The partial file lives only while the upload runs.
            Duration::from_millis(100)
        ),
        "the upload never started"
    );
    t.host.kill_connections().unwrap();
    let r = deployer.join().fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(err.contains("the SSH connection was lost"), "{err}");
    // The old service runs; no half-written image is where portabled looks.
    assert!(t.page(8080).contains("attache demo 1.0"));
    assert!(
        !t.portables().iter().any(|f| f.starts_with("big")),
        "{:?}",
        t.portables()
    );
    // The next deploy cleans up the partial upload and succeeds.
    let r = t.deploy(&["./examples/demo#big"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, "big.service"));
    assert!(!t
        .portables()
        .iter()
        .any(|f| f.ends_with(".attache-partial")));
}

#[test]
fn concurrent_deploys_to_one_host() {
    let t = target(Guest::Bookworm, "lock");
    // The first deploy holds the lock, paused just before its upload, for
    // as long as the second needs: no race between two starts decides
    // which one loses (under load, the two can miss each other).
    let a = t.deploy_paused(&["./examples/demo#demo"], &[], "before-push", 40);
    let loser = t.deploy(&["./examples/demo#demo"], &[]).fails(3);
    let err = host_report(&loser)["error"].as_str().unwrap().to_owned();
    assert!(
        err.contains("another attache is deploying to this host") && err.contains(" pid "),
        "{err}"
    );
    a.join().ok();
    assert_eq!(
        t.root_image("demo.service"),
        "/var/lib/portables/demo_1.0.raw"
    );
}

#[test]
fn dry_run_and_full_disk_change_nothing() {
    let t = target(Guest::Bookworm, "dry");
    let r = t.deploy(&["./examples/demo#demo"], &["--dry-run"]).ok();
    let h = host_report(&r);
    assert_eq!(h["outcome"], "planned");
    assert_eq!(h["services"][0]["upload"], true);
    assert_eq!(h["services"][0]["action"], "attach");
    assert_eq!(t.portables(), Vec::<String>::new());

    t.host.fill_disk().unwrap();
    let r = t.deploy(&["./examples/demo#demo"], &[]).fails(3);
    t.host.free_disk().unwrap();
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(
        err.contains("not enough space in /var/lib/portables"),
        "{err}"
    );
    assert!(!t.portables().iter().any(|f| f.ends_with(".raw")));
}

#[test]
fn connection_lost_during_activation_reverts_by_itself() {
    let t = target(Guest::Bookworm, "deadman");
    t.deploy(&["./examples/demo#demo"], &[]).ok();
    // A long settle time keeps attache busy after the reattach, so the cut
    // lands before it could confirm the new version.
    let deployer = t.deploy_in_background(
        &["./examples/demo#demo-v2"],
        // 30 s allowance + twice the settle time fits in 125 s.
        &["--settle", "45", "--rollback-after", "125"],
    );
    assert!(
        wait_for(
            &t.host,
            "[ \"$(systemctl show -p RootImage --value demo.service)\" = /var/lib/portables/demo_2.0.raw ]",
            Duration::from_secs(180),
            Duration::from_secs(1)
        ),
        "2.0 was never attached"
    );
    t.host.kill_connections().unwrap();
    let r = deployer.join().fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(err.contains("the SSH connection was lost"), "{err}");
    // Nobody confirmed 2.0: the host's own timer brings 1.0 back.
    assert!(
        wait_for(
            &t.host,
            "[ \"$(systemctl show -p RootImage --value demo.service)\" = /var/lib/portables/demo_1.0.raw ]",
            Duration::from_secs(180),
            Duration::from_secs(1)
        ),
        "{}",
        t.host.diagnostics(Some("attache-revert-now.service"))
    );
    // The unit's RootImage changes before the reattach restarts it.
    assert!(
        wait_for(
            &t.host,
            "busybox wget -q -O - http://127.0.0.1:8080/ | grep -q 'attache demo 1.0'",
            Duration::from_secs(120),
            Duration::from_secs(1)
        ),
        "{}",
        t.host.diagnostics(Some("demo.service"))
    );
}

/// An attache killed after the switch leaves the host armed; the next
/// deploy finishes that one first (after its build: nothing changes on the
/// host while the image builds), then deploys and ends healthy.
#[test]
fn next_deploy_finishes_an_unconfirmed_one() {
    let t = target(Guest::Bookworm, "pending");
    t.deploy(&["./examples/demo#demo"], &[]).ok();
    let bg = t.deploy_in_background(
        &["./examples/demo#demo-v2"],
        &["--settle", "90", "--rollback-after", "600"],
    );
    assert!(
        wait_for(
            &t.host,
            "[ \"$(systemctl show -p RootImage --value demo.service)\" = /var/lib/portables/demo_2.0.raw ]",
            Duration::from_secs(180),
            Duration::from_secs(1)
        ),
        "2.0 was never attached"
    );
    bg.signal("KILL");
    t.host.kill_connections().unwrap();
    let _ = bg.join();
    t.host.ssh_ok("test -e /var/lib/attache/revert.sh");
    let r = t.deploy(&["./examples/demo#demo-v2"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, "demo.service"));
    assert!(
        r.stderr.contains("an earlier deploy was never confirmed"),
        "{}",
        r.stderr
    );
    let h = host_report(&r);
    assert_eq!(h["services"][0]["action"], "reattach", "{h}");
    assert_eq!(
        t.root_image("demo.service"),
        "/var/lib/portables/demo_2.0.raw"
    );
    assert!(!t
        .host
        .ssh("test -e /var/lib/attache/revert.sh")
        .status
        .success());
}

#[test]
fn unknown_host_key_needs_consent() {
    let t = target(Guest::Bookworm, "newkey");
    // The same host, seen from a machine that has never met it.
    let dir = tempfile::tempdir().unwrap();
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, "").unwrap();
    let cfg = dir.path().join("ssh_config");
    let text = t.host.ssh_config().replace(
        &t.host.known_hosts_path().display().to_string(),
        &known.display().to_string(),
    );
    std::fs::write(&cfg, text).unwrap();
    let cfg_s = cfg.display().to_string();
    let name = t.host.name().to_owned();
    let run = |extra: &[&str]| {
        let mut args = vec!["deploy", "--json", "--ssh-config", &cfg_s, "--to", &name];
        args.extend_from_slice(extra);
        args.push("./examples/demo#demo");
        attache_in(&repo(), t.cache.path(), &args)
    };
    let r = run(&[]).fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(err.starts_with("newkey: the host key is unknown"), "{err}");
    assert_eq!(t.portables(), Vec::<String>::new());

    let r = run(&["--accept-new-host-keys"]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, "demo.service"));
    assert!(std::fs::read_to_string(&known)
        .unwrap()
        .contains("ssh-ed25519"));
    // Known now: strict checking passes without the flag.
    run(&[]).ok();
}

#[test]
fn same_version_other_content_gets_its_own_name() {
    let t = target(Guest::Bookworm, "rebuilt");
    t.deploy(&["./examples/demo#demo"], &[]).ok();
    let r = t.deploy(&["./examples/demo#demo-rebuilt"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, "demo.service"));
    let h = host_report(&r);
    let image = h["services"][0]["image"].as_str().unwrap().to_owned();
    let sha = h["services"][0]["sha256"].as_str().unwrap().to_owned();
    assert_eq!(
        image,
        format!("/var/lib/portables/demo_1.0-{}.raw", &sha[..8])
    );
    assert_eq!(h["services"][0]["action"], "reattach");
    assert!(
        r.stderr.contains("is attached with other content"),
        "{}",
        r.stderr
    );
    assert_eq!(t.root_image("demo.service"), image);
    assert!(t.page(8080).contains("attache demo 1.0-rebuilt"));
    // The first 1.0 was never written over.
    let first = t.host.ssh_ok("sha256sum /var/lib/portables/demo_1.0.raw");
    assert!(!first.starts_with(&sha));
}
