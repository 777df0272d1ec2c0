//! `attache build` and `attache inspect` end to end: the real `nix` builds
//! the examples, and the real squashfs tools read the images back.

use std::path::Path;

use crate::support::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn out_dir_arg(d: &Path) -> String {
    d.display().to_string()
}

/// Builds `args` into a fresh directory and returns (dir, JSON result).
fn build_json(args: &[&str]) -> (tempfile::TempDir, serde_json::Value) {
    let out = tmp();
    let o = out_dir_arg(out.path());
    let mut full = vec!["build", "--json", "-o", &o];
    full.extend_from_slice(args);
    let run = attache(&full).ok();
    (out, run.json())
}

#[test]
fn flake_demo_has_the_layout_portabled_needs() {
    let (out, j) = build_json(&["./examples/demo#demo"]);
    let image = out.path().join("demo_1.0.raw");
    assert_eq!(j["path"], image.display().to_string());
    assert_eq!(j["name"], "demo");
    assert_eq!(j["version"], "1.0");
    assert_eq!(j["sha256"], sha256_file(&image));
    assert_eq!(j["size"], std::fs::metadata(&image).unwrap().len());
    assert_eq!(files_in(out.path()), ["demo_1.0.raw"]);

    let list = unsquashfs_list(&image);
    let entry = |path: &str| -> String {
        list.iter()
            .find(|l| l.ends_with(&format!(" {path}")) || l.contains(&format!(" {path} -> ")))
            .unwrap_or_else(|| panic!("{path} not in image:\n{}", list.join("\n")))
            .clone()
    };
    // Root 0755, everything root-owned with a fixed mtime.
    assert!(list[0].starts_with("drwxr-xr-x 0/0"), "{}", list[0]);
    for l in &list {
        assert!(l.contains(" 0/0 "), "not root-owned: {l}");
        assert!(l.contains("1970-01-01 00:00"), "mtime not fixed: {l}");
    }
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/var/lib",
        "/var/cache",
        "/var/log",
    ] {
        assert!(entry(d).starts_with("drwxr-xr-x"), "{}", entry(d));
    }
    for d in ["/tmp", "/var/tmp"] {
        assert!(entry(d).starts_with("drwxrwxrwt"), "{}", entry(d));
    }
    for f in ["/etc/resolv.conf", "/etc/machine-id"] {
        assert!(
            entry(f).starts_with("-rw-r--r-- 0/0                       0"),
            "{}",
            entry(f)
        );
    }
    for u in ["demo.service", "demo-tick.timer", "demo-tick.service"] {
        assert!(entry(&format!("/etc/systemd/system/{u}")).starts_with("-rw-r--r--"));
    }
    let busybox = list
        .iter()
        .find(|l| l.contains("-busybox-1.35.0/bin/busybox") && !l.contains(" -> "))
        .expect("busybox in the image");
    assert!(busybox.starts_with("-r-xr-xr-x"), "{busybox}");

    let os = unsquashfs_cat(&image, "etc/os-release");
    assert_eq!(os, unsquashfs_cat(&image, "usr/lib/os-release"));
    for line in [
        "ID=nixos",
        "VERSION_ID=1.0",
        "PORTABLE_PREFIXES=demo",
        "PORTABLE_PRETTY_NAME=\"attache demo: a static web page and a timer\"",
        "PRETTY_NAME=\"attache demo: a static web page and a timer 1.0\"",
        "HOME_URL=\"https://example.invalid/attache-demo\"",
    ] {
        assert!(os.lines().any(|l| l == line), "{line} missing from:\n{os}");
    }
    let unit = unsquashfs_cat(&image, "etc/systemd/system/demo.service");
    assert!(unit.contains("ExecStart=/nix/store/"), "{unit}");
    assert!(unit.contains("httpd -f -p 8080"), "{unit}");
    // The spec file is bookkeeping, not content.
    assert!(!list.iter().any(|l| l.contains("attache-spec-")));
}

#[test]
fn same_closure_gives_the_same_bytes_in_two_directories() {
    let (a, ja) = build_json(&["./examples/demo#demo"]);
    let (b, jb) = build_json(&["./examples/demo#demo"]);
    assert_eq!(ja["sha256"], jb["sha256"]);
    assert_eq!(
        sha256_file(&a.path().join("demo_1.0.raw")),
        sha256_file(&b.path().join("demo_1.0.raw"))
    );
}

#[test]
fn unchanged_closure_returns_the_existing_image() {
    let out = tmp();
    let cache = tmp();
    let o = out_dir_arg(out.path());
    let args = ["build", "--json", "-o", &o, "./examples/demo#demo"];
    let first = attache_in(&repo(), cache.path(), &args).ok().json();
    assert_eq!(first["cached"], false);
    let second = attache_in(&repo(), cache.path(), &args).ok().json();
    assert_eq!(second["cached"], true);
    assert_eq!(first["sha256"], second["sha256"]);
    // Another directory (deploy's after build's) gets a copy, not a repack.
    let elsewhere = tmp();
    let e = out_dir_arg(elsewhere.path());
    let copied = attache_in(
        &repo(),
        cache.path(),
        &["build", "--json", "-o", &e, "./examples/demo#demo"],
    )
    .ok()
    .json();
    assert_eq!(copied["cached"], true);
    assert_eq!(
        sha256_file(&elsewhere.path().join("demo_1.0.raw")),
        first["sha256"]
    );
    assert_eq!(files_in(elsewhere.path()), ["demo_1.0.raw"]);
    // Other packing options are another image: not a cache hit.
    let mut other = args.to_vec();
    other.extend(["--compression", "gzip"]);
    let third = attache_in(&repo(), cache.path(), &other).ok().json();
    assert_eq!(third["cached"], false);
    assert_ne!(third["sha256"], first["sha256"]);
}

#[test]
fn path_flake_ref_of_a_copy() {
    let copy = tmp();
    copy_demo(&copy.path().join("demo"));
    let r = format!("path:{}#demo-v2", copy.path().join("demo").display());
    let (_, j) = build_json(&[&r]);
    assert_eq!(j["name"], "demo");
    assert_eq!(j["version"], "2.0");
}

#[test]
fn nix_file_and_expression() {
    let (out, j) = build_json(&["-f", "tests/fixtures/services.nix", "filedemo"]);
    assert_eq!(j["name"], "filedemo");
    let image = out.path().join("filedemo_0.1.raw");
    let list = unsquashfs_list(&image);
    assert!(
        list.iter()
            .any(|l| l.contains(" /bin/sh -> /nix/store/") && l.starts_with('l')),
        "{}",
        list.join("\n")
    );
    assert!(list.iter().any(|l| l.contains(" /usr/bin -> /nix/store/")));

    let (_, j) = build_json(&[
        "--impure",
        "--expr",
        "(import ./tests/fixtures/services.nix).filedemo",
    ]);
    assert_eq!(
        j["sha256"],
        sha256_file(&out.path().join("filedemo_0.1.raw"))
    );
}

#[test]
fn nixpkgs_style_flake_with_overridden_inputs() {
    let attache_ref = format!("git+file://{}", repo().display());
    let (_, j) = build_json(&[
        "./examples/nixpkgs-style#default",
        "--",
        "--override-input",
        "nixpkgs",
        "path:./examples/stub-nixpkgs",
        "--override-input",
        "attache",
        &attache_ref,
    ]);
    assert!(j["name"].as_str().is_some_and(|n| !n.is_empty()), "{j}");
}

#[test]
fn zero_config_package_with_units() {
    let (out, j) = build_json(&["./examples/demo#plainpkg"]);
    assert_eq!(j["name"], "plainpkg");
    assert_eq!(j["version"], "0.3");
    let image = out.path().join("plainpkg_0.3.raw");
    let unit = unsquashfs_cat(&image, "etc/systemd/system/plainpkg.service");
    assert!(unit.contains("ExecStart=/nix/store/"), "{unit}");
    // --name/--version override what the derivation says.
    let (_, j) = build_json(&["./examples/demo#plainpkg", "--version", "0.4"]);
    assert_eq!(j["version"], "0.4");
}

#[test]
fn inspect_reads_an_image_back() {
    let (out, _) = build_json(&["./examples/demo#demo"]);
    let image = out.path().join("demo_1.0.raw");
    let j = attache(&["inspect", "--json", &image.display().to_string()])
        .ok()
        .json();
    assert_eq!(j["name"], "demo");
    assert_eq!(j["version"], "1.0");
    assert_eq!(j["portable"], true);
    assert_eq!(j["sha256"], sha256_file(&image));
    assert_eq!(j["compression"], "xz");
    let units: Vec<&str> = j["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        units,
        ["demo-tick.service", "demo-tick.timer", "demo.service"]
    );
    assert!(j["os_release"]["ID"] == "nixos");

    let human = attache(&["inspect", &image.display().to_string()]).ok();
    assert!(human.stdout.contains("portabled would accept this image"));

    // A file that is not squashfs: one sentence, exit 1.
    let junk = out.path().join("junk_1.0.raw");
    std::fs::write(&junk, b"not an image").unwrap();
    let r = attache(&["inspect", &junk.display().to_string()]).fails(1);
    assert!(
        r.error().contains("is not a squashfs image"),
        "{}",
        r.stderr
    );
}

#[test]
fn mount_with_the_kernel_if_allowed() {
    let (out, _) = build_json(&["./examples/demo#demo"]);
    let image = out.path().join("demo_1.0.raw");
    let mnt = tmp();
    let m = std::process::Command::new("mount")
        .args(["-t", "squashfs", "-o", "loop,ro"])
        .arg(&image)
        .arg(mnt.path())
        .output()
        .unwrap();
    if !m.status.success() {
        eprintln!(
            "note: the kernel does not allow loop mounts here ({}); unsquashfs checks stand in",
            String::from_utf8_lossy(&m.stderr).trim()
        );
        return;
    }
    let listed = std::fs::read_dir(mnt.path().join("etc/systemd/system")).map(|rd| rd.count());
    let _ = std::process::Command::new("umount")
        .arg(mnt.path())
        .status();
    assert_eq!(listed.unwrap(), 3);
}

/// Each refused input: exit code 1, the exact sentence, nothing written.
fn refused(args: &[&str], expected: &str) {
    let out = tmp();
    let o = out_dir_arg(out.path());
    let mut full = vec!["build", "-o", &o];
    full.extend_from_slice(args);
    let r = attache(&full).fails(1);
    let err = r.error();
    assert!(
        err.contains(expected),
        "attache {}:\nexpected: {expected}\ngot: {err}",
        args.join(" ")
    );
    assert_eq!(
        files_in(out.path()),
        Vec::<String>::new(),
        "left files behind"
    );
}

#[test]
fn name_with_underscore() {
    refused(
        &["./examples/demo#bad-name"],
        "image name 'bad_name' contains '_': portabled cuts the file name at the first '_' to find the unit prefix, so the units would have to start with 'bad'. Rename it, e.g. 'bad-name'",
    );
}

#[test]
fn unit_that_does_not_match_the_prefix() {
    refused(
        &["./examples/demo#bad-unit"],
        "unit 'other.service' does not match the image's prefix 'badunit', so portabled would refuse it: name it 'badunit.service', 'badunit-other.service' or 'badunit@.service'",
    );
}

#[test]
fn no_units() {
    refused(
        &["./examples/demo#nounits"],
        "image 'nounits' has no units: portabled refuses images without a unit file.",
    );
}

#[test]
fn unit_suffix_portabled_ignores() {
    refused(
        &["-f", "tests/fixtures/services.nix", "badsuffix"],
        "unit 'badsuffix.conf' has a suffix portabled ignores: use one of .service, .socket, .target, .timer, .path",
    );
}

#[test]
fn empty_and_odd_versions() {
    refused(
        &["-f", "tests/fixtures/services.nix", "noversion"],
        "image 'noversion' has an empty version: set `version` in portableService, or pass --version",
    );
    refused(
        &["./examples/demo#demo", "--version", "1 0"],
        "version '1 0' of image 'demo' may only use letters, digits",
    );
}

#[test]
fn symlink_target_too_long_never_reaches_the_packer() {
    refused(
        &["-f", "tests/fixtures/services.nix", "longlink"],
        "symlink '/bin/x' has a target of 309 bytes; squashfs images written by attache allow at most 255: shorten it",
    );
}

#[test]
fn not_a_derivation() {
    refused(
        &["./examples/demo#notadrv"],
        "./examples/demo#notadrv is a string, not a derivation: point attache at a package or at the result of portableService",
    );
}

#[test]
fn missing_attribute() {
    refused(
        &["./examples/demo#nope"],
        "./examples/demo#nope does not provide that attribute:",
    );
    refused(&["./examples/demo#nope"], "does not provide attribute");
}

#[test]
fn wrong_flake_ref() {
    refused(
        &["./no/such/dir#demo"],
        "Nix could not evaluate ./no/such/dir#demo:",
    );
}

#[test]
fn evaluation_error_shows_nix_message() {
    refused(
        &["--impure", "--expr", "throw \"boom from the test\""],
        "boom from the test",
    );
}

#[test]
fn nix_not_installed_is_an_environment_error() {
    let out = tmp();
    let o = out_dir_arg(out.path());
    let r = attache(&[
        "build",
        "-o",
        &o,
        "--nix",
        "/nonexistent/nix",
        "./examples/demo#demo",
    ])
    .fails(2);
    assert!(
        r.error()
            .starts_with("`/nonexistent/nix` could not be run (No such file or directory (os error 2)): is Nix installed?"),
        "{}",
        r.stderr
    );
}

#[test]
fn dry_run_writes_nothing() {
    let out = tmp();
    let o = out_dir_arg(out.path());
    let r = attache(&[
        "build",
        "--dry-run",
        "--json",
        "-o",
        &o,
        "./examples/demo#demo",
    ])
    .ok();
    assert_eq!(r.json()["name"], "demo");
    assert!(r.stderr.contains("Would pack"));
    assert_eq!(files_in(out.path()), Vec::<String>::new());
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let r = attache(&["completions", shell]).ok();
        assert!(r.stdout.contains("attache"), "{shell}");
    }
    let r = attache(&["man"]).ok();
    assert!(r.stdout.contains(".TH attache"));
    let r = attache(&["build", "--help"]).ok();
    assert!(r.stdout.contains("Exit codes:"));
    assert!(r.stdout.contains("attache build ./examples/demo#demo"));
}

/// The root flake packages attache and exports `lib`; nixpkgs cannot be
/// fetched here, so it is checked against the stub nixpkgs.
#[test]
fn root_flake_package_and_lib_evaluate_offline() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("nix")
            .args(["--extra-experimental-features", "nix-command flakes"])
            .args(args)
            .args([
                "--override-input",
                "nixpkgs",
                "path:./examples/stub-nixpkgs",
            ])
            .current_dir(repo())
            .output()
            .expect("nix runs");
        assert!(
            out.status.success(),
            "nix {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let built = run(&["build", "--json", "--no-link", ".#default"]);
    assert!(built.contains("\"out\":\"/nix/store/"), "{built}");
    let hosts = run(&[
        "eval",
        "--json",
        ".#lib.hosts",
        "--apply",
        "f: builtins.attrNames (f { h = { services = [ ]; }; }).h",
    ]);
    assert!(hosts.contains("\"profile\""), "{hosts}");
    let lib = run(&[
        "eval",
        "--json",
        ".#lib.mkLib",
        "--apply",
        "mk: builtins.attrNames (mk (import ./examples/stub-nixpkgs { system = \"x86_64-linux\"; }))",
    ]);
    assert!(lib.contains("portableService"), "{lib}");
}
