//! The lab itself: each guest boots with systemd as PID 1, runs the expected
//! systemd, and attaches, runs and detaches a hand-made portable service; a
//! guest fetches from a server on this machine.

use attache_lab::{busybox_portable_image, Guest, FETCH_URL};

use crate::support::{lab_host, sha256_file};

const SMOKE_UNIT: &str = "[Unit]
Description=lab smoke service

[Service]
ExecStart=/bin/busybox httpd -f -p 127.0.0.1:8080 -h /etc
";

fn smoke(guest: Guest) {
    let host = lab_host(guest, &format!("smoke-{guest}"));

    let state = host.ssh("systemctl is-system-running --wait");
    let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
    if state == "degraded" {
        eprintln!(
            "{guest} is degraded; failed units:\n{}",
            host.ssh_ok("systemctl --failed --no-legend")
        );
    }
    assert!(
        state == "running" || state == "degraded",
        "{guest}: system state {state:?}\n{}",
        host.diagnostics(None)
    );
    assert_eq!(host.ssh_ok("hostname").trim(), format!("smoke-{guest}"));

    let version = host.ssh_ok("portablectl --version");
    let want = format!("systemd {} ", guest.systemd_version());
    assert!(
        version.starts_with(&want),
        "{guest}: portablectl --version: {version}"
    );

    let image = host.run_dir().join("smoke_1.0.raw");
    busybox_portable_image(&image, &[("smoke.service", SMOKE_UNIT)]).unwrap();
    host.ssh_ok("mkdir -p /var/lib/portables");
    host.copy_to(&image, "/var/lib/portables/smoke_1.0.raw")
        .unwrap();
    host.ssh_ok("portablectl attach --now --enable smoke_1.0");
    let active = host.ssh("systemctl is-active smoke.service");
    assert!(
        active.status.success(),
        "{guest}: smoke.service is {}\n{}",
        String::from_utf8_lossy(&active.stdout).trim(),
        host.diagnostics(Some("smoke.service"))
    );
    // Served from the image's own /etc, through the default profile.
    let page = host.ssh_ok(
        "for i in 1 2 3 4 5 6 7 8 9 10; do busybox wget -q -O - http://127.0.0.1:8080/os-release && exit 0; sleep 0.5; done; exit 1",
    );
    assert!(page.contains("ID=lab"), "{guest}: got {page:?}");

    host.ssh_ok("portablectl detach --now --enable smoke_1.0");
    let after = host.ssh("systemctl is-active smoke.service");
    assert!(
        !after.status.success(),
        "{guest}: smoke.service still active after detach"
    );
    let list = host.ssh_ok("portablectl list --no-legend");
    assert!(
        list.contains("detached"),
        "{guest}: portablectl list: {list}"
    );
}

#[test]
fn bookworm_runs_a_portable_service() {
    smoke(Guest::Bookworm);
}

#[test]
fn trixie_runs_a_portable_service() {
    smoke(Guest::Trixie);
}

/// The faults tests inject: a changed host key is refused until trusted, a
/// full disk fails writes, killed connections come back.
#[test]
fn lab_faults_work() {
    let host = lab_host(Guest::Bookworm, "faults");
    // A fresh connection, bypassing the helpers' shared one.
    let fresh = || {
        std::process::Command::new("ssh")
            .arg("-F")
            .arg(host.ssh_config_path())
            .args([host.name(), "true"])
            .output()
            .unwrap()
    };
    assert!(fresh().status.success());

    let key = host.change_host_key().unwrap();
    assert!(key.starts_with("ssh-ed25519 "), "{key}");
    let refused = fresh();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{stderr}"
    );
    host.trust_host_key().unwrap();
    assert!(fresh().status.success());

    host.fill_disk().unwrap();
    let write = host.ssh("echo data > /root/after-fill");
    assert!(!write.status.success());
    assert!(String::from_utf8_lossy(&write.stderr).contains("No space left"));
    host.free_disk().unwrap();
    host.ssh_ok("echo data > /root/after-fill");

    host.kill_connections().unwrap();
    assert_eq!(host.ssh_ok_as("deploy", "sudo -n whoami").trim(), "root");
    let pw = host.ssh_as("sudopw", "sudo -n true");
    assert!(String::from_utf8_lossy(&pw.stderr).contains("password is required"));
    let copied = host.run_dir().join("hostname");
    host.copy_from("/etc/hostname", &copied).unwrap();
    assert_eq!(std::fs::read_to_string(copied).unwrap().trim(), "faults");
}

/// A guest downloads through `systemd-pull` (the downloader pull hosts use)
/// from a lab server on this machine's loopback, which counts what it sent;
/// a stopped server is an origin that is down, and comes back.
#[test]
fn bookworm_fetches_from_a_lab_server() {
    let host = lab_host(Guest::Bookworm, "fetch");
    let dir = tempfile::tempdir().unwrap();
    let image: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("demo_1.0.raw"), &image).unwrap();
    let sum = sha256_file(&dir.path().join("demo_1.0.raw"));
    std::fs::write(
        dir.path().join("SHA256SUMS"),
        format!("{sum}  demo_1.0.raw\n"),
    )
    .unwrap();
    let mut server = host.serve(dir.path()).unwrap();

    let pull = |what: &str, to: &str| {
        host.ssh(&format!(
            "/usr/lib/systemd/systemd-pull raw --direct {what} {FETCH_URL}/demo_1.0.raw {to}"
        ))
    };
    let got = pull("--verify=checksum", "/var/lib/portables/.demo.tmp");
    assert!(
        got.status.success(),
        "systemd-pull: {}",
        String::from_utf8_lossy(&got.stderr)
    );
    let there = host.ssh_ok("sha256sum /var/lib/portables/.demo.tmp");
    assert!(there.starts_with(&sum), "{there}");
    let stats = server.stats();
    assert_eq!(stats.get("/demo_1.0.raw").requests, 1, "{stats:?}");
    assert_eq!(stats.get("/demo_1.0.raw").bytes, image.len() as u64);
    assert_eq!(stats.get("/SHA256SUMS").requests, 1, "{stats:?}");

    server.stop();
    let down = pull("--verify=no", "/var/lib/portables/.down.tmp");
    assert_eq!(down.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("Transfer failed"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );

    server.resume().unwrap();
    server.cut_after(Some(1000));
    let cut = pull("--verify=no", "/var/lib/portables/.cut.tmp");
    assert_eq!(cut.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&cut.stderr).contains("partial file"),
        "{}",
        String::from_utf8_lossy(&cut.stderr)
    );
    server.cut_after(None);
    server.reset_stats();
    let again = pull("--verify=no", "/var/lib/portables/.again.tmp");
    assert!(again.status.success());
    assert_eq!(server.stats().total().requests, 1);
}
