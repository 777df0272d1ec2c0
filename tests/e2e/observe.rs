//! Seeing before and after on real hosts: `attache diff` between what runs
//! and what a deploy would bring, `attache logs` merged across hosts and
//! followed until Ctrl-C, `attache status` of a fleet with a host down.
//! Two Debian 12 guests (the third host does not resolve) and the shop
//! fixture.

use std::path::Path;
use std::time::Duration;

use attache_lab::{shared, Guest, Host};

use crate::support::*;

/// Two lab hosts tagged `obs`, a copy of the shop fixture whose inventory
/// a test rewrites, and the ssh config that reaches them.
struct Fleet {
    hosts: Vec<Host>,
    dir: tempfile::TempDir,
    cache: tempfile::TempDir,
    cfg: String,
    flake: String,
}

impl Fleet {
    fn new(names: &[&str]) -> Fleet {
        let lab = shared();
        let hosts = lab.hosts(Guest::Bookworm, names).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("ssh_config");
        lab.write_ssh_config(&cfg, &hosts.iter().collect::<Vec<_>>())
            .unwrap();
        let copy = dir.path().join("shop");
        copy_flake("tests/fixtures/shop", &copy);
        Fleet {
            flake: format!("path:{}", copy.display()),
            cfg: cfg.display().to_string(),
            hosts,
            dir,
            cache: tempfile::tempdir().unwrap(),
        }
    }

    /// Every host runs `pkg` of the fixture.
    fn runs(&self, pkg: &str) {
        let hosts: String = self
            .hosts
            .iter()
            .map(|h| {
                format!(
                    "{} = {{ tags = [ \"obs\" \"all\" ]; services = [ pkgs.{pkg} ]; }};\n",
                    h.name()
                )
            })
            .collect();
        // A host that cannot be reached: its name does not resolve.
        let hosts = hosts
            + "obsdown = { host = \"obsdown.invalid\"; tags = [ \"all\" ]; services = [ ]; };\n";
        std::fs::write(
            self.dir.path().join("shop/hosts.nix"),
            format!("pkgs: {{\n{hosts}}}\n"),
        )
        .unwrap();
    }

    /// `attache VERB --ssh-config … --flake … ARGS…`
    fn args<'a>(&'a self, verb: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        inventory_args(verb, &self.cfg, &self.flake, args)
    }

    fn attache(&self, verb: &str, args: &[&str]) -> Run {
        attache_in(&repo(), self.cache.path(), &self.args(verb, args))
    }

    fn cache_image(&self, file: &str) -> String {
        self.cache
            .path()
            .join("attache/images")
            .join(file)
            .display()
            .to_string()
    }
}

/// Logs a line as if `shop-web.service` had: root may set
/// `OBJECT_SYSTEMD_UNIT`, which `journalctl -u` matches.
fn log_line(h: &Host, text: &str) {
    h.ssh_ok(&format!(
        "printf 'MESSAGE=%s\\nOBJECT_SYSTEMD_UNIT=shop-web.service\\n' '{text}' | logger --journald"
    ));
}

#[test]
fn diff_logs_and_status_across_hosts() {
    let f = Fleet::new(&["obs1", "obs2"]);
    f.runs("shop");
    f.attache("deploy", &["--json", "@obs"]).ok();
    for h in &f.hosts {
        h.ssh_ok("test -s /var/lib/attache/manifests/shop_1.0.raw.json");
    }

    // What runs is what would be deployed: nothing to show, hosts grouped.
    let r = f.attache("diff", &["@obs"]).ok();
    assert!(r.stdout.starts_with("obs1, obs2\n"), "{}", r.stdout);
    assert!(
        r.stdout.contains("shop: shop_1.0.raw: no change"),
        "{}",
        r.stdout
    );
    let j = f.attache("diff", &["--json", "@obs", "shop"]).ok().json();
    for i in 0..2 {
        let d = &j["hosts"][i]["services"][0]["diff"];
        assert_eq!(d["packages"], serde_json::json!([]), "{j}");
        assert_eq!(d["units"], serde_json::json!([]), "{j}");
    }

    // shop 2.0 serves another page: its index.html is rebuilt, same size.
    f.runs("shop-v2");
    let r = f.attache("diff", &["@obs", "shop"]).ok();
    assert!(r.stdout.starts_with("obs1, obs2\n"), "{}", r.stdout);
    assert!(
        r.stdout.contains("shop: shop_1.0.raw → shop_2.0.raw"),
        "{}",
        r.stdout
    );
    let j = f.attache("diff", &["--json", "@obs", "shop"]).ok().json();
    let d = &j["hosts"][0]["services"][0]["diff"];
    let page = d["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "index.html")
        .unwrap_or_else(|| panic!("index.html not named: {d}"));
    let path = page["added"][0]["path"].as_str().unwrap();
    assert!(
        path.starts_with("/nix/store/") && path.ends_with("-index.html"),
        "{page}"
    );
    let size = page["added"][0]["nar_size"].as_u64().unwrap();
    assert_eq!(size, 352, "{page}");
    assert!(
        r.stdout.contains(&format!("{path} (0.3 KiB)")),
        "{}",
        r.stdout
    );
    assert_eq!(d["units"][0]["change"], "changed", "{d}");

    // deploy --dry-run shows the same summary per host and changes nothing.
    let r = f.attache("deploy", &["--dry-run", "--json", "@obs"]).ok();
    let j = r.json();
    assert_eq!(j["diff"][1]["services"][0]["diff"], *d, "{j}");
    let r = f.attache("deploy", &["--dry-run", "@obs"]).ok();
    assert!(r.stdout.contains("What would change:"), "{}", r.stdout);
    assert!(r.stdout.contains("index.html"), "{}", r.stdout);

    // Offline: two images, and an image with itself (empty).
    f.attache("deploy", &["@obs"]).ok();
    let (v1, v2) = (f.cache_image("shop_1.0.raw"), f.cache_image("shop_2.0.raw"));
    let r = f.attache("diff", &[&v1, &v2]).ok();
    assert!(r.stdout.contains("-index.html (0.3 KiB)"), "{}", r.stdout);
    let r = f.attache("diff", &[&v2, &v2]).ok();
    assert_eq!(r.stdout, "");
    let r = f.attache("diff", &["@obs", "shop"]).ok();
    assert!(
        r.stdout.contains("shop: shop_2.0.raw: no change"),
        "{}",
        r.stdout
    );

    // An image placed before manifests: diff says so and what to do; the
    // next deploy, with nothing to change, records it.
    f.hosts[0].ssh_ok("rm /var/lib/attache/manifests/shop_2.0.raw.json");
    let r = f.attache("diff", &["@obs", "shop"]).ok();
    assert!(
        r.stdout.starts_with(
            "obs1\n  shop: the host keeps no manifest of shop_2.0.raw: it was placed by an attache from before manifests. The next `attache deploy` records it"
        ),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("obs2\n  shop: shop_2.0.raw: no change"),
        "{}",
        r.stdout
    );
    f.attache("deploy", &["@obs"]).ok();
    f.hosts[0].ssh_ok("test -s /var/lib/attache/manifests/shop_2.0.raw.json");

    logs_merged_and_followed(&f);
    status_with_one_host_down(&f);

    // A failed deploy names the command that shows why; its image stays,
    // with its manifest, until prune takes both (shop-old is 1.0 with
    // other content: 2.0 stays as what rollback goes back to, 2.1 goes).
    f.runs("shop-broken");
    let r = f.attache("deploy", &["--keep-going", "@obs"]).fails(3);
    let hint = "attache logs 'obs1' shop --since '";
    assert!(r.stderr.contains(hint), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("--flake '{}'", f.flake)),
        "{}",
        r.stderr
    );
    let left = f.hosts[0].ssh_ok("ls /var/lib/portables /var/lib/attache/manifests");
    assert!(left.contains("shop_2.1.raw.json"), "{left}");
    f.runs("shop-old");
    f.attache("deploy", &["--keep", "1", "@obs"]).ok();
    let left = f.hosts[0].ssh_ok("ls /var/lib/portables /var/lib/attache/manifests");
    assert!(!left.contains("shop_2.1.raw"), "{left}");
    assert!(left.contains("shop_2.0.raw.json"), "{left}");
}

/// Three hosts, one down: the two that agree on one line, the third's
/// error in the table, exit code 2.
fn status_with_one_host_down(f: &Fleet) {
    let r = f.attache("status", &["@all"]).fails(2);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert!(lines[0].starts_with("HOSTS "), "{}", r.stdout);
    let words: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        words[..7],
        ["obs1,", "obs2", "shop", "2.0", "1/1", "active", "0"],
        "{}",
        r.stdout
    );
    assert!(
        lines[2].starts_with("obsdown ") && lines[2].contains("error: obsdown: "),
        "{}",
        r.stdout
    );
    assert!(r.error().starts_with("obsdown: "), "{}", r.stderr);
    let r = f
        .attache("status", &["--wide", "--jobs", "1", "@all"])
        .fails(2);
    assert!(
        r.stdout.contains("shop-web.service: active (running)"),
        "{}",
        r.stdout
    );
    let j = f.attache("status", &["--json", "@all"]).fails(2).json();
    assert_eq!(j["hosts"][0]["services"][0]["units_active"], 1, "{j}");
    assert!(j["hosts"][2]["error"].is_string(), "{j}");
}

fn logs_merged_and_followed(f: &Fleet) {
    let (h1, h2) = (&f.hosts[0], &f.hosts[1]);
    // Each host's clock is set from this machine's; a second apart is
    // plenty to order them.
    log_line(h1, "obs-first");
    std::thread::sleep(Duration::from_millis(1100));
    log_line(h2, "obs-second");
    std::thread::sleep(Duration::from_millis(1100));
    log_line(h1, "obs-third");
    let r = f.attache("logs", &["@obs", "shop", "-n", "20"]).ok();
    let ours: Vec<&str> = r.stdout.lines().filter(|l| l.contains("obs-")).collect();
    assert_eq!(ours.len(), 3, "{}", r.stdout);
    for (line, (host, text)) in ours.iter().zip([
        ("obs1", "obs-first"),
        ("obs2", "obs-second"),
        ("obs1", "obs-third"),
    ]) {
        assert!(
            line.starts_with(&format!("{host} | ")) && line.ends_with(text),
            "{line:?} in:\n{}",
            r.stdout
        );
    }
    let j = f
        .attache("logs", &["--json", "@obs", "shop", "-n", "20"])
        .ok();
    let first = j
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["MESSAGE"] == "obs-second")
        .unwrap_or_else(|| panic!("{}", j.stdout));
    assert_eq!(first["host"], "obs2");
    assert_eq!(first["OBJECT_SYSTEMD_UNIT"], "shop-web.service");
    let r = f
        .attache("logs", &["@obs", "shop", "--since", "not a time"])
        .fails(1);
    assert!(
        r.error()
            .starts_with("--since \"not a time\" is not a time"),
        "{}",
        r.stderr
    );

    // -f: a new line shows up; Ctrl-C ends it cleanly and leaves nothing
    // running on the hosts.
    let mut bg = attache_in_background(
        &repo(),
        f.cache.path(),
        &f.args("logs", &["@obs", "shop", "-f", "-n", "0"]),
    );
    let on_both = "pgrep -x journalctl >/dev/null";
    for h in &f.hosts {
        assert!(
            wait_for(h, on_both, Duration::from_secs(60), Duration::from_secs(1)),
            "journalctl never started on {}: {}",
            h.name(),
            bg.stderr()
        );
    }
    log_line(h2, "obs-followed");
    assert!(
        bg.wait_stdout("obs2 | ", Duration::from_secs(30))
            && bg.wait_stdout("obs-followed", Duration::from_secs(30)),
        "stdout:\n{}\nstderr:\n{}",
        bg.stdout(),
        bg.stderr()
    );
    bg.interrupt();
    let r = bg.join();
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    for h in &f.hosts {
        assert!(
            wait_for(
                h,
                "! pgrep -x journalctl >/dev/null",
                Duration::from_secs(10),
                Duration::from_secs(1)
            ),
            "journalctl still runs on {}: {}",
            h.name(),
            h.ssh_ok("ps -ef")
        );
    }
}

/// Every image carries its manifest at a fixed path; its NAR sizes are
/// Nix's own, and two builds of one closure carry the same one.
#[test]
fn the_image_knows_its_closure() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().display().to_string();
    let j = attache(&["build", "--json", "-o", &o, "./examples/demo#demo"])
        .ok()
        .json();
    let image = Path::new(j["path"].as_str().unwrap()).to_owned();
    let text = unsquashfs_cat(&image, "usr/lib/attache/manifest.json");
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (m["name"].as_str(), m["version"].as_str()),
        (Some("demo"), Some("1.0"))
    );
    let paths = m["store_paths"].as_array().unwrap();
    assert!(!paths.is_empty(), "{m}");
    for p in paths {
        let path = p["path"].as_str().unwrap();
        let out = std::process::Command::new("nix-store")
            .args(["--query", "--size", path])
            .output()
            .unwrap();
        let nix: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(p["nar_size"].as_u64(), Some(nix), "{path}");
    }
    assert!(!text.contains(env!("CARGO_PKG_VERSION")), "{text}");
}
