//! Issue 13, delta upgrades, on real guests: an upgrade sends only what the
//! host lacks and the attached image is byte for byte the one built; a
//! host without an earlier image, or with a damaged one, gets the whole
//! image; an upgrade cut while its delta is on the way leaves the old
//! version running, and the next deploy finishes it. Services from
//! tests/fixtures/shop.

use attache_lab::Guest;

use crate::support::*;

const SHOP: &str = "shop-web.service";

struct Shop {
    t: Target,
    _dir: tempfile::TempDir,
    flake: String,
}

impl Shop {
    fn new(guest: Guest, name: &str) -> Shop {
        let t = target(guest, name);
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("shop");
        copy_flake("tests/fixtures/shop", &copy);
        let flake = format!("path:{}", copy.display());
        Shop {
            t,
            _dir: dir,
            flake,
        }
    }

    fn installable(&self, pkg: &str) -> String {
        format!("{}#{pkg}", self.flake)
    }

    /// Deploys `pkg`; it must end healthy. Returns the service's report.
    #[track_caller]
    fn upgrade(&self, pkg: &str) -> serde_json::Value {
        let r = self.t.deploy(&[&self.installable(pkg)], &[]);
        assert_eq!(r.code, 0, "{}", self.t.diag(&r, SHOP));
        let h = host_report(&r);
        assert_eq!(h["outcome"], "healthy", "{h}");
        let svc = h["services"][0].clone();
        // What runs is byte for byte what was built.
        let image = svc["image"].as_str().unwrap();
        let on_host = self.t.host.ssh_ok(&format!("sha256sum {image}"));
        assert_eq!(
            on_host.split_whitespace().next(),
            svc["sha256"].as_str(),
            "{image} on the host is not the image built"
        );
        assert_eq!(self.t.root_image(SHOP), image);
        assert_eq!(h["bytes_sent"], svc["bytes_sent"]);
        svc
    }

    fn image_size(&self, svc: &serde_json::Value) -> u64 {
        let image = svc["image"].as_str().unwrap();
        self.t
            .host
            .ssh_ok(&format!("stat -c %s {image}"))
            .trim()
            .parse()
            .unwrap()
    }
}

fn sent(svc: &serde_json::Value) -> u64 {
    svc["bytes_sent"].as_u64().unwrap()
}

fn delta_upgrades(guest: Guest) {
    let s = Shop::new(guest, &format!("delta-{guest}"));

    // Nothing to start from: the whole image, and the report says why.
    let first = s.upgrade("shop");
    let size1 = s.image_size(&first);
    assert!(sent(&first) >= size1, "{first}");
    assert_eq!(first["delta_basis"], serde_json::Value::Null);
    assert!(
        first["full_upload_because"]
            .as_str()
            .unwrap()
            .contains("no earlier image"),
        "{first}"
    );
    assert_eq!(first["bytes_saved"], 0);

    // Cut while the delta is on its way: 1.0 keeps running untouched.
    let bg =
        s.t.deploy_paused(&[&s.installable("shop-v2")], &[], "mid-delta", 20);
    assert!(s
        .t
        .host
        .ssh_ok("ls -A /var/lib/portables")
        .contains(".attache-partial"));
    s.t.host.kill_connections().unwrap();
    let r = bg.join();
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.t.root_image(SHOP), "/var/lib/portables/shop_1.0.raw");
    assert_eq!(s.t.unit_state(SHOP), "active");
    assert!(s.t.page(8081).contains("shop 1.0"));

    // The next deploy finishes it, as a delta against the attached 1.0.
    let v2 = s.upgrade("shop-v2");
    let size2 = s.image_size(&v2);
    assert_eq!(v2["delta_basis"], "/var/lib/portables/shop_1.0.raw", "{v2}");
    assert_eq!(v2["full_upload_because"], serde_json::Value::Null);
    assert!(sent(&v2) * 2 < size2, "sent {} of {size2}: {v2}", sent(&v2));
    assert_eq!(v2["bytes_saved"].as_u64().unwrap(), size2 - sent(&v2));
    assert!(s.t.page(8081).contains("shop 2.0"));
    assert!(!s
        .t
        .host
        .ssh_ok("ls -A /var/lib/portables")
        .contains(".attache-partial"));
    eprintln!(
        "{guest}: upgrade sent {} of {size2} bytes ({:.1} %)",
        sent(&v2),
        100.0 * sent(&v2) as f64 / size2 as f64
    );

    // Damaged images (one byte more; the mounted one keeps running): no
    // basis can be trusted, the whole image goes, the host ends healthy.
    s.t.host
        .ssh_ok("for f in /var/lib/portables/shop_*.raw; do printf x >> $f; done");
    let v3 = s.upgrade("shop-v3");
    let size3 = s.image_size(&v3);
    assert!(sent(&v3) >= size3, "{v3}");
    assert_eq!(v3["delta_basis"], serde_json::Value::Null);
    assert!(
        v3["full_upload_because"]
            .as_str()
            .unwrap()
            .contains("not the image its signature describes"),
        "{v3}"
    );
    assert!(s.t.page(8081).contains("shop 3.0"));
}

#[test]
fn delta_upgrades_bookworm() {
    delta_upgrades(Guest::Bookworm);
}

#[test]
fn delta_upgrades_trixie() {
    delta_upgrades(Guest::Trixie);
}
