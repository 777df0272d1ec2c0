//! The edges of deploy and build: health checks on hosts without curl,
//! checks that cannot run, `--dry-run` leaving the host as it was, an
//! unknown host key, and Nix errors from inside a library. Each ends with
//! one sentence and one of the exit codes 0-3.

use attache_lab::Guest;

use crate::deploy::inventory;
use crate::support::*;

/// Debian's minimal guests have no curl: the checks below go through
/// bash's /dev/tcp, which is what they are about.
fn assert_no_curl(t: &Target) {
    let out = t.host.ssh("command -v curl");
    assert!(
        !out.status.success(),
        "the guest has curl; these tests need a host without it"
    );
}

#[test]
fn http_checks_without_curl() {
    let t = target(Guest::Bookworm, "nocurl");
    assert_no_curl(&t);

    // HTTPS cannot be checked without curl: refused before anything changes,
    // never tried as plain HTTP.
    let (_dir, flake) = inventory(
        r#"pkgs: {
          nocurl = {
            services = { demo = pkgs.demo; };
            checks.demo = [ { type = "http"; url = "https://127.0.0.1:8080/"; retries = 2; timeout = 3; } ];
          };
        }"#,
    );
    let r = t.attache(&["deploy", "--json", "--flake", &flake]).fails(3);
    let h = host_report(&r);
    assert_eq!(
        h["error"].as_str().unwrap(),
        "nocurl: demo's check https://127.0.0.1:8080/ needs curl on the host, which has none (attache checks plain HTTP without it, never HTTPS); nothing was changed. Install curl on the host, or check an http:// URL",
    );
    assert_eq!(t.portables(), Vec::<String>::new());
    assert_eq!(t.unit_state("demo.service"), "inactive");

    // `%` and a quote in the URL reach the server as written: busybox httpd
    // answers 200 for the page whatever the query, 404 for another path.
    let (_dir, flake) = inventory(
        r#"pkgs: {
          nocurl = {
            services = { demo = pkgs.demo; };
            checks.demo = [ { type = "http"; url = "http://127.0.0.1:8080/index.html?q=%41'b%s"; retries = 10; } ];
          };
        }"#,
    );
    let r = t.attache(&["deploy", "--json", "--flake", &flake]);
    assert_eq!(r.code, 0, "{}", t.diag(&r, "demo.service"));
    assert_eq!(host_report(&r)["outcome"], "healthy");

    // The path is sent, not mangled to `/`: a missing page fails the check.
    let (_dir, flake) = inventory(
        r#"pkgs: {
          nocurl = {
            services = { demo = pkgs.demo-v2; };
            checks.demo = [ { type = "http"; url = "http://127.0.0.1:8080/no%20such'page"; retries = 1; timeout = 3; } ];
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
    assert!(
        h["error"]
            .as_str()
            .unwrap()
            .contains("HTTP check http://127.0.0.1:8080/no%20such'page failed"),
        "{h}"
    );
    assert!(t.page(8080).contains("attache demo 1.0"));
}

/// Checks that can never pass are bad input, refused when the inventory is
/// read: before anything is built or any host is reached.
#[test]
fn checks_that_cannot_run_are_refused() {
    let refused = |hosts_nix: &str, says: &str| {
        let (_dir, flake) = inventory(hosts_nix);
        let r = attache(&["deploy", "--flake", &flake]).fails(1);
        assert_eq!(r.error(), says);
    };
    refused(
        r#"pkgs: {
          web1 = { host = "127.0.0.1"; port = 1; services = [ pkgs.demo ];
                   checks.dmeo = [ { type = "command"; command = "true"; } ]; };
        }"#,
        "host web1 has checks for 'dmeo', which is not one of its services (demo): fix the name in checks, or add the service",
    );
    refused(
        r#"pkgs: {
          web1 = { host = "127.0.0.1"; port = 1; services = [ pkgs.demo ];
                   checks.demo = { type = "command"; command = "true"; timeout = 0; }; };
        }"#,
        "host web1: the check `true` of demo has timeout = 0, which would fail at once: give it a timeout of 1 s or more, or leave timeout out (10 s)",
    );
}

#[test]
fn dry_run_changes_nothing_on_the_host() {
    let t = target(Guest::Trixie, "dryrun");
    let state = "ls -d /run/attache /var/lib/attache /var/lib/portables 2>&1; true";
    let before = t.host.ssh_ok(state);
    assert!(before.contains("cannot access '/run/attache'"), "{before}");
    assert!(
        before.contains("cannot access '/var/lib/attache'"),
        "{before}"
    );
    let r = t.deploy(&["./examples/demo#demo"], &["--dry-run"]).ok();
    let h = host_report(&r);
    assert_eq!(h["outcome"], "planned");
    assert_eq!(h["services"][0]["action"], "attach");
    assert_eq!(t.host.ssh_ok(state), before);
}

#[test]
fn an_unknown_host_key_shows_its_fingerprint() {
    let t = target(Guest::Bookworm, "fprint");
    // The host, seen from a machine that has never met it.
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
    let r = attache_in(
        &repo(),
        t.cache.path(),
        &[
            "deploy",
            "--json",
            "--ssh-config",
            &cfg_s,
            "--to",
            &name,
            "./examples/demo#demo",
        ],
    )
    .fails(3);
    let err = host_report(&r)["error"].as_str().unwrap().to_owned();
    // What the host itself says its key is.
    let own = t
        .host
        .ssh_ok("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub");
    let fp = own.split_whitespace().nth(1).unwrap();
    assert!(fp.starts_with("SHA256:"), "{own}");
    assert!(
        err.starts_with(&format!(
            "fprint: the host key is unknown: the host offers ED25519 key {fp}. Compare it with"
        )),
        "{err}"
    );
    // Nothing was trusted on the way.
    assert_eq!(std::fs::read_to_string(&known).unwrap(), "");
    assert_eq!(t.portables(), Vec::<String>::new());
}

/// A flake whose overlay uses an attribute the package set lacks (the
/// offline stub has no `python3`): the error is Nix's evaluation error with
/// its location, not "does not provide that attribute".
#[test]
fn a_missing_attribute_inside_an_overlay_is_an_evaluation_error() {
    let dir = tempfile::tempdir().unwrap();
    let flake_dir = dir.path().join("app");
    std::fs::create_dir(&flake_dir).unwrap();
    copy_flake("examples/stub-nixpkgs", &flake_dir.join("stub"));
    std::fs::write(
        flake_dir.join("flake.nix"),
        r#"{
  outputs = { self }:
    let
      overlay = final: prev: {
        myapp = prev.python3.pkgs.buildPythonApplication { pname = "myapp"; version = "1.0"; };
      };
      pkgs = import ./stub { system = "x86_64-linux"; overlays = [ overlay ]; };
    in { packages.x86_64-linux.myapp = pkgs.myapp; };
}
"#,
    )
    .unwrap();
    let flake = format!("path:{}", flake_dir.display());
    let r = attache(&["build", &format!("{flake}#myapp")]).fails(1);
    let err = r.error();
    assert!(
        err.starts_with(&format!(
            "Nix could not evaluate {flake}#myapp:\nerror: attribute 'python3' missing"
        )),
        "{err}"
    );
    assert!(err.contains("/flake.nix:5:"), "{err}");
    // The installable's own attribute missing is still told as such.
    let r = attache(&["build", &format!("{flake}#nope")]).fails(1);
    assert!(
        r.error()
            .starts_with(&format!("{flake}#nope does not provide that attribute:")),
        "{}",
        r.error()
    );
}
