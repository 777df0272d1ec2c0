//! Issue 12, part A: faults met in the middle of a deploy (a disk that fills
//! during the upload, a corrupted upload, Ctrl-C, a stale lock, a host
//! without flock). Each ends with one true sentence, the exit code that
//! says what happened, the host on its last good service and nothing left
//! over on the host or in the local cache.

use std::time::Duration;

use attache_lab::Guest;

use crate::support::*;

const DEMO: &str = "demo.service";

/// A host running demo 1.0, the way every row starts.
fn demo_host(name: &str) -> Target {
    let t = target(Guest::Bookworm, name);
    let r = t.deploy(&["./examples/demo#demo"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, DEMO));
    t
}

/// demo 1.0 still serves, from its image, and /var/lib/portables holds
/// nothing but the images of finished deploys.
#[track_caller]
fn expect_demo_1(t: &Target, after: &Run, images: &[&str]) {
    assert_eq!(
        t.root_image(DEMO),
        "/var/lib/portables/demo_1.0.raw",
        "{}",
        t.diag(after, DEMO)
    );
    assert!(
        t.page(8080).contains("attache demo 1.0"),
        "{}",
        t.diag(after, DEMO)
    );
    assert_eq!(t.portables(), images, "{}", t.diag(after, DEMO));
}

/// Row 1: the disk fills after the preflight found room, while the image
/// streams in: the host's own reason, the partial file gone, 1.0 running.
#[test]
fn disk_filling_during_upload() {
    let t = demo_host("fillup");
    let bg = t.deploy_paused(&["./examples/demo#demo-v2"], &[], "before-push", 5);
    t.host.fill_disk().unwrap();
    let r = bg.join();
    t.host.free_disk().unwrap();
    let r = r.fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(
        err.starts_with("fillup: the host could not store demo_2.0.raw (")
            && err.contains("No space left on device")
            && err.contains("the partial file was removed and nothing was changed"),
        "{err}"
    );
    expect_demo_1(&t, &r, &["demo_1.0.raw"]);
}

/// Row 2: the bytes that arrived are not the image's: refused before the
/// file gets its name, removed, 1.0 running.
#[test]
fn corrupted_upload_is_refused() {
    let t = demo_host("corrupt");
    let r = t
        .deploy_with_env(
            &["./examples/demo#demo-v2"],
            &[],
            &[("ATTACHE_TEST_FAULT", "corrupt-upload")],
        )
        .fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(
        err.starts_with("corrupt: the uploaded demo_2.0.raw has sha256")
            && err.contains("nothing was changed"),
        "{err}"
    );
    expect_demo_1(&t, &r, &["demo_1.0.raw"]);
    // The fault was the transfer's: the next run goes through.
    let r = t.deploy(&["./examples/demo#demo-v2"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, DEMO));
}

/// Row 3: an attache that stopped answering (a partitioned laptop, here a
/// stopped process) keeps the host's lock as long as its SSH session lives.
/// The next deploy says who holds it, from which host process and since
/// when; `attache unlock` ends that process only, after consent.
#[test]
fn stale_lock_then_unlock() {
    let t = demo_host("stale");
    let name = t.host.name().to_owned();
    let vanished = t.deploy_paused(&["./examples/demo#demo-v2"], &[], "before-push", 600);
    vanished.signal("STOP");
    std::thread::sleep(std::time::Duration::from_secs(2));

    let r = t.deploy(&["./examples/demo#demo-v2"], &[]).fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    let holder_pid = t
        .host
        .ssh_ok("sed -n 's/^pid\t//p' /run/attache/lock.holder");
    assert!(
        err.starts_with("stale: another attache is deploying to this host (")
            && err.contains(&format!(" pid {}", vanished.pid()))
            && err.contains(&format!("; host process {}, held for ", holder_pid.trim()))
            && err.contains("`attache unlock stale`"),
        "{err}"
    );
    expect_demo_1(&t, &r, &["demo_1.0.raw"]);

    // No terminal to ask on, no --yes: nothing is ended.
    let r = t.attache(&["unlock", &name]).fails(1);
    assert!(r.error().contains("--yes"), "{}", r.stderr);
    assert!(t
        .host
        .ssh(&format!("kill -0 {}", holder_pid.trim()))
        .status
        .success());

    let r = t.attache(&["unlock", "--json", &name, "--yes"]).ok();
    assert_eq!(
        r.json()["ended_pids"][0].to_string(),
        holder_pid.trim(),
        "{}",
        r.stdout
    );
    // The host is free at once, and demo 1.0 was never touched.
    let r = t.deploy(&["./examples/demo#demo-v2"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, DEMO));
    assert!(t.page(8080).contains("attache demo 2.0"));
    let r = t.attache(&["unlock", &name]).ok();
    assert!(r.stdout.contains("the deploy lock is free"), "{}", r.stdout);
    drop(vanished);
}

/// Row 4: a host without flock is refused before anything on it changes.
#[test]
fn host_without_flock_is_refused_up_front() {
    let t = target(Guest::Bookworm, "noflock");
    t.host
        .ssh_ok("mount --bind /dev/null \"$(command -v flock)\"");
    let r = t.deploy(&["./examples/demo#demo"], &[]).fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    assert!(
        err.starts_with("noflock: flock is missing, and attache needs it"),
        "{err}"
    );
    assert!(!err.contains("not found"), "{err}");
    assert_eq!(t.portables(), Vec::<String>::new());
    assert!(!t.host.ssh("test -e /run/attache").status.success());
}

/// After an interrupted deploy: no ssh master of attache's talks to the
/// host any more, no file in the local cache is a temporary one, and the
/// host's lock is free, so the next deploy goes through at once.
#[track_caller]
fn expect_nothing_left(t: &Target, tmp: &std::path::Path) {
    assert_eq!(t.ssh_left_behind(), Vec::<String>::new());
    let mut temps = Vec::new();
    let mut dirs = vec![t.cache.path().to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.to_string_lossy().ends_with(".tmp") {
                temps.push(p);
            }
        }
    }
    assert_eq!(temps, Vec::<std::path::PathBuf>::new());
    // The GC roots of the build live in TMPDIR.
    assert_eq!(files_in(tmp), Vec::<String>::new());
}

/// Row 5: Ctrl-C while the image is built: nothing reaches the host, the
/// cache keeps no temporary file and no GC root is left.
#[test]
fn interrupt_during_build() {
    let t = target(Guest::Bookworm, "intbuild");
    let tmp = tempfile::tempdir().unwrap();
    let tmp_s = tmp.path().display().to_string();
    let mut bg =
        t.deploy_in_background_with_env(&["./examples/demo#demo"], &[], &[("TMPDIR", &tmp_s)]);
    bg.expect_stderr("Building", Duration::from_secs(300));
    bg.signal("INT");
    let r = bg.join().fails(3);
    assert!(
        r.error().starts_with(
            "interrupted during the build of ./examples/demo#demo; no host was changed"
        ),
        "{}",
        r.stderr
    );
    assert_eq!(t.portables(), Vec::<String>::new());
    // The host was locked while the image built, and is free again.
    t.host.ssh_ok("flock -n /run/attache/lock true");
    assert!(!t.host.ssh("test -e /var/lib/attache").status.success());
    expect_nothing_left(&t, tmp.path());
    let r = t.deploy(&["./examples/demo#demo"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, DEMO));
}

/// Row 6: Ctrl-C while the image streams to the host: the upload stops,
/// its partial file goes, demo 1.0 runs on untouched.
#[test]
fn interrupt_during_upload() {
    let t = demo_host("intupload");
    let tmp = tempfile::tempdir().unwrap();
    let tmp_s = tmp.path().display().to_string();
    let bg = t.deploy_in_background_with_env(
        &["./examples/demo#demo-v2"],
        &[],
        &[("ATTACHE_TEST_FAULT", "stall-upload"), ("TMPDIR", &tmp_s)],
    );
    assert!(
        wait_for(
            &t.host,
            "test -s /var/lib/portables/.demo_2.0.raw.attache-partial",
            Duration::from_secs(300),
            Duration::from_millis(500)
        ),
        "the upload never started:\n{}",
        bg.stderr()
    );
    bg.signal("INT");
    let r = bg.join().fails(3);
    let h = host_report(&r);
    assert_eq!(h["outcome"], "interrupted", "{}", t.diag(&r, DEMO));
    assert!(
        h["error"]
            .as_str()
            .unwrap()
            .starts_with("intupload: interrupted (Ctrl-C or SIGTERM) before the image was in place (its partial file was removed); the host runs what it ran before"),
        "{h}"
    );
    expect_demo_1(&t, &r, &["demo_1.0.raw"]);
    expect_nothing_left(&t, tmp.path());
    let r = t.deploy(&["./examples/demo#demo-v2"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, DEMO));
    assert_eq!(t.portables(), ["demo_1.0.raw", "demo_2.0.raw"]);
}

/// Row 7: SIGTERM (what Ctrl-C does, from a supervisor) after the new
/// version was attached: attache finishes its checks and confirms, as it
/// would have, and says it is stopping.
#[test]
fn interrupt_during_activation_finishes_it() {
    let t = demo_host("intactive");
    let bg = t.deploy_paused(&["./examples/demo#demo-v2"], &[], "after-activate", 10);
    bg.signal("TERM");
    let r = bg.join();
    assert_eq!(r.code, 0, "{}", t.diag(&r, DEMO));
    assert!(r.stderr.contains("warning: stopping:"), "{}", r.stderr);
    assert_eq!(host_report(&r)["outcome"], "healthy");
    assert!(t.page(8080).contains("attache demo 2.0"));
    assert!(!t
        .host
        .ssh("test -e /var/lib/attache/revert.sh")
        .status
        .success());
    assert_eq!(t.ssh_left_behind(), Vec::<String>::new());
    let r = t.deploy(&["./examples/demo#demo-v2"], &[]).ok();
    assert_eq!(host_report(&r)["services"][0]["action"], "unchanged");
    assert_eq!(t.portables(), ["demo_1.0.raw", "demo_2.0.raw"]);
}

/// Row 8: a second Ctrl-C leaves at once, says when the host's own timer
/// reverts it, and the host does so; the lock is free at once.
#[test]
fn second_interrupt_leaves_it_to_the_host() {
    let t = demo_host("intagain");
    let mut bg = t.deploy_paused(
        &["./examples/demo#demo-v2"],
        &["--rollback-after", "40"],
        "after-activate",
        600,
    );
    bg.signal("INT");
    bg.expect_stderr("warning: stopping:", Duration::from_secs(30));
    bg.signal("INT");
    let r = bg.join().fails(3);
    let err = r.error();
    assert!(
        err.starts_with("interrupted twice: attache left at once; intagain was left mid-activation: its automatic rollback puts back its previous services at ")
            && err.contains(" UTC (in "),
        "{}",
        r.stderr
    );
    let json = r.json();
    assert_eq!(json["interrupted"], true, "{json}");
    assert_eq!(json["pending_reverts"][0]["host"], "intagain", "{json}");
    assert_eq!(t.ssh_left_behind(), Vec::<String>::new());
    assert!(
        wait_for(
            &t.host,
            "[ \"$(systemctl show -p RootImage --value demo.service)\" = /var/lib/portables/demo_1.0.raw ] && busybox wget -q -O - http://127.0.0.1:8080/ | grep -q 'attache demo 1.0'",
            Duration::from_secs(160),
            Duration::from_secs(1)
        ),
        "{}",
        t.host.diagnostics(Some(DEMO))
    );
    let r = t.deploy(&["./examples/demo#demo-v2"], &[]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, DEMO));
    assert_eq!(t.portables(), ["demo_1.0.raw", "demo_2.0.raw"]);
}
