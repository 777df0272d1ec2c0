//! Issue 11, "deploys you can trust on busy hosts": hosts that run more than
//! one service, among them two whose image names share a prefix (`shop` and
//! `shop-admin`, whose unit `shop-admin-web.service` portabled would match
//! with the prefix `shop`), and deploys interrupted at their worst moments
//! (connection cut, reboot, a second attache). The services come from
//! tests/fixtures/shop. Every assertion is about what the host shows over
//! ssh.

use std::path::Path;
use std::time::{Duration, Instant};

use attache_lab::Guest;

use crate::support::*;

const SHOP: &str = "shop-web.service";
const ADMIN: &str = "shop-admin-web.service";
const SHOP_PORT: u16 = 8081;
const ADMIN_PORT: u16 = 8082;

/// A lab host and a copy of the shop fixture flake to deploy from.
struct Shop {
    t: Target,
    dir: tempfile::TempDir,
    flake: String,
}

fn shop_host(guest: Guest, name: &str) -> Shop {
    let t = target(guest, name);
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("shop");
    copy_flake("tests/fixtures/shop", &copy);
    let flake = format!("path:{}", copy.display());
    Shop { t, dir, flake }
}

fn image(base: &str) -> String {
    format!("/var/lib/portables/{base}.raw")
}

impl Shop {
    fn name(&self) -> &str {
        self.t.host.name()
    }

    fn flake_dir(&self) -> &Path {
        self.flake.strip_prefix("path:").map(Path::new).unwrap()
    }

    /// `attache deploy --json --to HOST EXTRA… FLAKE#PKG…`
    fn deploy(&self, pkgs: &[&str], extra: &[&str]) -> Run {
        let installables: Vec<String> =
            pkgs.iter().map(|p| format!("{}#{p}", self.flake)).collect();
        let installables: Vec<&str> = installables.iter().map(String::as_str).collect();
        self.t.deploy(&installables, extra)
    }

    /// [`Shop::deploy`] in the background, paused `secs` seconds at `at`.
    #[track_caller]
    fn deploy_paused(&self, pkgs: &[&str], extra: &[&str], at: &str, secs: u64) -> Background {
        let installables: Vec<String> =
            pkgs.iter().map(|p| format!("{}#{p}", self.flake)).collect();
        let installables: Vec<&str> = installables.iter().map(String::as_str).collect();
        self.t.deploy_paused(&installables, extra, at, secs)
    }

    /// `attache rollback|detach|status HOST [SERVICE]`
    fn command(&self, verb: &str, service: Option<&str>) -> Run {
        let mut args = vec![verb, self.name()];
        if verb == "status" {
            args.insert(1, "--json");
        }
        args.extend(service);
        self.t.attache(&args)
    }

    /// `systemctl show -p InvocationID`: changes whenever the unit is
    /// (re)started, so an equal value means nobody touched it.
    fn invocation(&self, unit: &str) -> String {
        self.t
            .host
            .ssh_ok(&format!("systemctl show -p InvocationID --value {unit}"))
            .trim()
            .to_owned()
    }

    /// `unit` runs from `/var/lib/portables/BASE.raw`, is active, and its
    /// page on `port` has the heading `title`.
    #[track_caller]
    fn expect_serving(&self, unit: &str, port: u16, base: &str, title: &str, after: &Run) {
        let root = self.t.root_image(unit);
        let state = self.t.unit_state(unit);
        let page = self.t.page(port);
        assert!(
            root == image(base) && state == "active" && page.contains(&format!("<h1>{title}</h1>")),
            "after `attache {}`: expected {unit} active from {} serving {title:?}; \
             it is {state:?} from {root:?}, page {page:?}\n{}",
            after.args,
            image(base),
            self.t.diag(after, unit)
        );
    }

    #[track_caller]
    fn expect_shop(&self, base: &str, title: &str, after: &Run) {
        self.expect_serving(SHOP, SHOP_PORT, base, title, after);
    }

    /// shop-admin 1.0 runs, from the same start as `invocation`.
    #[track_caller]
    fn expect_admin_untouched(&self, invocation: &str, after: &Run) {
        self.expect_serving(ADMIN, ADMIN_PORT, "shop-admin_1.0", "shop-admin 1.0", after);
        assert_eq!(
            self.invocation(ADMIN),
            invocation,
            "after `attache {}`: {ADMIN} was restarted\n{}",
            after.args,
            self.t.diag(after, ADMIN)
        );
    }

    /// `unit` is attached from the image `base` right now (the pause
    /// points are reached, the deploy has not gone back yet).
    #[track_caller]
    fn expect_attached(&self, unit: &str, base: &str, during: &Background) {
        let root = self.t.root_image(unit);
        assert_eq!(
            root,
            image(base),
            "while attache paused:\n{}\n{}",
            during.stderr(),
            self.t.host.diagnostics(Some(unit))
        );
    }

    /// Waits until `unit` runs from `base` and serves `title` again on
    /// `port`, by the host's own doing; returns how long that took.
    #[track_caller]
    fn expect_reverted(
        &self,
        unit: &str,
        port: u16,
        base: &str,
        title: &str,
        limit: Duration,
    ) -> Duration {
        let start = Instant::now();
        let want = image(base);
        assert!(
            wait_for(
                &self.t.host,
                &format!("[ \"$(systemctl show -p RootImage --value {unit})\" = {want} ]"),
                limit,
                Duration::from_secs(1)
            ),
            "{unit} is not back on {want} after {limit:?}\n{}",
            self.t.host.diagnostics(Some(unit))
        );
        // The unit's RootImage changes before the reattach restarts it.
        assert!(
            wait_for(
                &self.t.host,
                &format!(
                    "busybox wget -q -O - http://127.0.0.1:{port}/ | grep -qF '<h1>{title}</h1>'"
                ),
                Duration::from_secs(120),
                Duration::from_secs(1)
            ),
            "{unit} runs from {want} but does not serve {title:?}\n{}",
            self.t.host.diagnostics(Some(unit))
        );
        start.elapsed()
    }

    /// shop 1.0 is back, by the host's own doing, within `window` seconds
    /// of `--rollback-after` and 120 s of slack; returns how long it took.
    #[track_caller]
    fn expect_shop_reverted(&self, window: u64) -> Duration {
        self.expect_reverted(
            SHOP,
            SHOP_PORT,
            "shop_1.0",
            "shop 1.0",
            Duration::from_secs(window + 120),
        )
    }

    /// The interrupted deploy failed, without a panic.
    #[track_caller]
    fn expect_gave_up(&self, r: &Run) {
        assert_ne!(r.code, 0, "{}", self.t.diag(r, SHOP));
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
}

/// A host `name` with shop 1.0, and an upgrade to `pkg` (image `base`) with
/// `--rollback-after WINDOW` paused `pause` seconds at `at`, where shop
/// runs from `base`.
#[track_caller]
fn paused_upgrade(
    guest: Guest,
    name: &str,
    pkg: &str,
    base: &str,
    at: &str,
    window: u64,
    pause: u64,
) -> (Shop, Background) {
    let s = shop_host(guest, name);
    let r = s.deploy(&["shop"], &[]);
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    let bg = s.deploy_paused(
        &[pkg],
        &["--rollback-after", &window.to_string()],
        at,
        pause,
    );
    s.expect_attached(SHOP, base, &bg);
    (s, bg)
}

/// Row 1: two services whose names share a prefix, on one host: what is done
/// to `shop` (upgrade, failed upgrade, rollback, detach) never touches
/// `shop-admin`, and status tells them apart.
fn shared_prefix(guest: Guest) {
    let started = Instant::now();
    let s = shop_host(guest, &format!("prefix-{guest}"));
    let name = s.name().to_owned();

    let r = s.deploy(&["shop", "shop-admin"], &[]);
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    s.expect_shop("shop_1.0", "shop 1.0", &r);
    s.expect_serving(ADMIN, ADMIN_PORT, "shop-admin_1.0", "shop-admin 1.0", &r);
    let admin = s.invocation(ADMIN);

    // A healthy upgrade of shop alone.
    let r = s.deploy(&["shop-v2"], &[]);
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, ADMIN));
    s.expect_shop("shop_2.0", "shop 2.0", &r);
    s.expect_admin_untouched(&admin, &r);

    // A broken shop goes back to 2.0; shop-admin is never part of it.
    let r = s.deploy(&["shop-broken"], &[]).fails(3);
    let h = host_report(&r);
    assert_eq!(h["outcome"], "rolled-back", "{}", s.t.diag(&r, SHOP));
    s.expect_shop("shop_2.0", "shop 2.0", &r);
    s.expect_admin_untouched(&admin, &r);

    // One image back: what 2.0 replaced.
    let r = s.command("rollback", Some("shop"));
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    s.expect_shop("shop_1.0", "shop 1.0", &r);
    s.expect_admin_untouched(&admin, &r);

    let r = s.command("status", None).ok();
    let services = r.json()["hosts"][0]["services"].clone();
    let find = |n: &str| {
        services
            .as_array()
            .unwrap()
            .iter()
            .find(|svc| svc["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("status lists no {n}: {services}"))
    };
    let (shop, shop_admin) = (find("shop"), find("shop-admin"));
    assert_eq!(services.as_array().unwrap().len(), 2, "{services}");
    assert_eq!(shop["image"], image("shop_1.0"), "{services}");
    assert_eq!(shop["version"], "1.0", "{services}");
    assert_eq!(shop["units"][SHOP], "active (running)", "{services}");
    assert!(shop["units"].get(ADMIN).is_none(), "{services}");
    assert_eq!(shop_admin["image"], image("shop-admin_1.0"), "{services}");
    assert_eq!(shop_admin["units"][ADMIN], "active (running)", "{services}");
    assert!(shop_admin["units"].get(SHOP).is_none(), "{services}");

    let r = s.command("detach", Some("shop"));
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, ADMIN));
    assert_ne!(s.t.unit_state(SHOP), "active", "{}", s.t.diag(&r, SHOP));
    assert!(
        !s.t.host
            .ssh(&format!("test -e /etc/systemd/system.attached/{SHOP}"))
            .status
            .success(),
        "{SHOP} is still attached"
    );
    s.expect_admin_untouched(&admin, &r);
    let r = s.command("status", None).ok();
    let services = &r.json()["hosts"][0]["services"];
    let names: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|svc| svc["name"].as_str())
        .collect();
    assert_eq!(names, ["shop-admin"], "{services}");
    eprintln!(
        "{name}: shared-prefix path in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn shared_prefix_bookworm() {
    shared_prefix(Guest::Bookworm);
}

#[test]
fn shared_prefix_trixie() {
    shared_prefix(Guest::Trixie);
}

/// Row 2: a check that can take longer than the dead-man timer would see
/// the host revert under it; attache refuses it before touching the host.
#[test]
fn check_slower_than_rollback_after_is_refused() {
    let s = shop_host(Guest::Bookworm, "slowcheck");
    let r = s.deploy(&["shop"], &[]);
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    // 10 tries of up to 10 s each: far more than the 5 s window.
    std::fs::write(
        s.flake_dir().join("hosts.nix"),
        r#"pkgs: {
          slowcheck = {
            services = { shop = pkgs.shop-v2; };
            checks.shop = [ { type = "http"; url = "http://127.0.0.1:8081/"; retries = 10; timeout = 10; } ];
          };
        }"#,
    )
    .unwrap();
    let r =
        s.t.attache(&[
            "deploy",
            "--json",
            "--flake",
            &s.flake,
            "--rollback-after",
            "5",
            "slowcheck",
        ])
        .fails(1);
    assert!(r.stderr.contains("--rollback-after"), "{}", r.stderr);
    s.expect_shop("shop_1.0", "shop 1.0", &r);
    assert_eq!(s.t.portables(), ["shop_1.0.raw"]);
}

/// Row 3: the connection is cut after the new version failed its check and
/// before attache could put the previous one back. The host does it alone.
fn cut_before_rollback(guest: Guest) {
    let started = Instant::now();
    // attache sleeps longer than the window: whatever reverts the host
    // within it is the host's own timer. That timer runs from when attache
    // arms it: the reattach, the settle time and the failed check all come
    // before the pause, so the window leaves room for them under load.
    let window = 60;
    let (s, bg) = paused_upgrade(
        guest,
        &format!("cut-{guest}"),
        "shop-broken",
        "shop_2.1",
        "before-rollback",
        window,
        90,
    );
    s.t.host.kill_connections().unwrap();
    let took = s.expect_shop_reverted(window);
    let r = bg.join();
    s.expect_gave_up(&r);
    eprintln!(
        "{guest}: reverted by the host {:.0} s after the cut; test took {:.0} s",
        took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn connection_cut_before_rollback_reverts_by_itself_bookworm() {
    cut_before_rollback(Guest::Bookworm);
}

#[test]
fn connection_cut_before_rollback_reverts_by_itself_trixie() {
    cut_before_rollback(Guest::Trixie);
}

/// Row 4: the host reboots after the new version was attached and before
/// anyone confirmed it; the revert must survive the reboot.
#[test]
fn reboot_mid_activation_reverts() {
    let started = Instant::now();
    let window = 60;
    // attache wakes while the guest is still rebooting (about 25 s here).
    let (mut s, bg) = paused_upgrade(
        Guest::Bookworm,
        "reboot",
        "shop-v2",
        "shop_2.0",
        "after-activate",
        window,
        15,
    );
    s.t.host.reboot().unwrap();
    let r = bg.join();
    s.expect_gave_up(&r);
    let took = s.expect_shop_reverted(window);
    eprintln!(
        "reverted {:.0} s after the guest was back; test took {:.0} s",
        took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Row 5: pruning never removes the image a rollback would go back to.
#[test]
fn keep_one_still_keeps_the_previous_image() {
    let s = shop_host(Guest::Bookworm, "keep");
    let r = s.deploy(&["shop"], &[]);
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    let r = s.deploy(&["shop-v2"], &["--keep", "1"]);
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    s.expect_shop("shop_2.0", "shop 2.0", &r);
    assert_eq!(s.t.portables(), ["shop_1.0.raw", "shop_2.0.raw"]);
    let r = s.command("rollback", Some("shop"));
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    s.expect_shop("shop_1.0", "shop 1.0", &r);
}

/// Row 6: one deploy changes two services on a host; one fails, so the
/// host goes back as a whole.
#[test]
fn two_services_one_fails_both_roll_back() {
    let s = shop_host(Guest::Bookworm, "pair");
    let r = s.deploy(&["shop", "shop-admin"], &[]);
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    // shop-admin first: it is healthy before shop fails.
    let r = s.deploy(&["shop-admin-v2", "shop-broken"], &[]).fails(3);
    let h = host_report(&r);
    assert_eq!(h["outcome"], "rolled-back", "{}", s.t.diag(&r, SHOP));
    let services = h["services"].as_array().unwrap();
    let mut outcomes: Vec<(&str, &str)> = services
        .iter()
        .map(|svc| {
            (
                svc["name"].as_str().unwrap_or_default(),
                svc["outcome"].as_str().unwrap_or("(none)"),
            )
        })
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        [("shop", "rolled-back"), ("shop-admin", "rolled-back")],
        "{h}"
    );
    s.expect_shop("shop_1.0", "shop 1.0", &r);
    s.expect_serving(ADMIN, ADMIN_PORT, "shop-admin_1.0", "shop-admin 1.0", &r);
}

/// Row 7: rollback and detach while a deploy holds the host are refused,
/// and change nothing.
#[test]
fn rollback_and_detach_wait_for_a_running_deploy() {
    let s = shop_host(Guest::Bookworm, "busy");
    let r = s.deploy(&["shop"], &[]);
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    // Both are refused within seconds (4 s seen); the pause leaves room for a
    // slow ssh login under TCG on a busy machine, and the test checks it did.
    let pause = Duration::from_secs(60);
    let bg = s.deploy_paused(&["shop-v2"], &[], "after-activate", pause.as_secs());
    let paused = Instant::now();
    s.expect_attached(SHOP, "shop_2.0", &bg);
    for verb in ["rollback", "detach"] {
        let r = s.command(verb, Some("shop")).fails(2);
        assert!(
            r.stderr.contains("another attache is deploying"),
            "{}",
            r.stderr
        );
        assert_eq!(s.t.root_image(SHOP), image("shop_2.0"), "after {verb}");
        assert_eq!(s.t.unit_state(SHOP), "active", "after {verb}");
    }
    assert!(
        paused.elapsed() < pause,
        "rollback and detach took longer than the deploy's pause: the lock may have been free"
    );
    eprintln!(
        "rollback and detach refused within {:.0} s of the pause",
        paused.elapsed().as_secs_f64()
    );
    let r = bg.join();
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    s.expect_shop("shop_2.0", "shop 2.0", &r);
}

/// Row 8: a host whose shop was attached by hand, the way attache attached
/// until now (the image declares `PORTABLE_PREFIXES=shop`; no prefix given
/// to portablectl). attache upgrades it and can go back to it.
#[test]
fn upgrade_from_and_rollback_to_an_old_style_image() {
    let s = shop_host(Guest::Bookworm, "oldstyle");
    let out = s.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let installable = format!("{}#shop-old", s.flake);
    attache_in(
        &repo(),
        s.t.cache.path(),
        &["build", "-o", &out.display().to_string(), &installable],
    )
    .ok();
    let raw = out.join("shop_1.0.raw");
    let os_release = unsquashfs_cat(&raw, "etc/os-release");
    assert!(
        os_release.lines().any(|l| l == "PORTABLE_PREFIXES=shop"),
        "{os_release}"
    );
    s.t.host.ssh_ok("mkdir -p /var/lib/portables");
    s.t.host
        .copy_to(&raw, "/var/lib/portables/shop_1.0.raw")
        .unwrap();
    s.t.host.ssh_ok(
        "portablectl attach --now --enable --profile default /var/lib/portables/shop_1.0.raw",
    );
    let by_hand = Run {
        code: 0,
        stdout: String::new(),
        stderr: String::new(),
        args: "(by hand) portablectl attach --now --enable shop_1.0.raw".into(),
    };
    s.expect_shop("shop_1.0", "shop 1.0 old-style", &by_hand);

    let r = s.deploy(&["shop-v2"], &[]);
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    assert_eq!(host_report(&r)["outcome"], "healthy");
    s.expect_shop("shop_2.0", "shop 2.0", &r);

    let r = s.command("rollback", Some("shop"));
    assert_eq!(r.code, 0, "{}", s.t.diag(&r, SHOP));
    s.expect_shop("shop_1.0", "shop 1.0 old-style", &r);
}
