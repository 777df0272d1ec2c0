//! `nix build` of a portableService gives the image: packed in the Nix
//! sandbox by the attache package of the same package set, byte for byte
//! what `attache build` writes. The package set is the offline stub; a copy
//! of it carries a static build of this repository as its attache
//! (`prebuilt/attache`), since the sandbox has no /lib for a dynamic one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use crate::support::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// attache built statically, once per test run, next to the test's own
/// build (`TARGET/static-e2e`).
pub(crate) fn static_attache() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target_dir = attache_bin()
            .parent()
            .and_then(Path::parent)
            .expect("the binary is in TARGET/PROFILE")
            .join("static-e2e");
        let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build", "-p", "attache", "--bin", "attache", "--target", &triple,
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(repo())
            .stdin(Stdio::null())
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "static build of attache failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target_dir.join(triple).join("debug/attache")
    })
}

/// Puts `program` into the stub nixpkgs at `stub` as its attache, with
/// `version` as the package's version.
fn give_stub_attache(stub: &Path, program: &Path, version: &str) {
    let prebuilt = stub.join("prebuilt");
    std::fs::create_dir_all(&prebuilt).unwrap();
    std::fs::copy(program, prebuilt.join("attache")).unwrap();
    std::fs::write(prebuilt.join("attache.version"), format!("{version}\n")).unwrap();
}

/// A copy of the demo (`path:DIR/demo`) whose stub packs with `program`.
fn demo_with_attache(dir: &Path, program: &Path, version: &str) -> String {
    let demo = dir.join("demo");
    copy_demo(&demo);
    give_stub_attache(&demo.join("stub-nixpkgs"), program, version);
    format!("path:{}", demo.display())
}

/// `nix build --out-link OUT_LINK ARGS` in the repository.
fn nix_build(out_link: &Path, args: &[&str]) -> Output {
    nix_build_env(out_link, args, &[])
}

fn nix_build_env(out_link: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    Command::new("nix")
        .envs(env.iter().copied())
        .args([
            "--extra-experimental-features",
            "nix-command flakes",
            "build",
        ])
        .arg("--out-link")
        .arg(out_link)
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .expect("nix runs")
}

#[track_caller]
fn nix_build_ok(out_link: &Path, args: &[&str]) {
    let out = nix_build(out_link, args);
    assert!(
        out.status.success(),
        "nix build {}:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn attache_build(out_dir: &Path, args: &[&str]) -> serde_json::Value {
    let o = out_dir.display().to_string();
    let mut full = vec!["build", "--json", "-o", &o];
    full.extend_from_slice(args);
    attache(&full).ok().json()
}

#[test]
fn nix_build_of_the_demo_gives_the_image_attache_build_writes() {
    let dir = tmp();
    let demo = demo_with_attache(dir.path(), static_attache(), env!("CARGO_PKG_VERSION"));
    let result = dir.path().join("result");
    nix_build_ok(&result, &[&format!("{demo}#demo")]);
    assert_eq!(files_in(&result), ["demo_1.0.raw"]);
    let image = result.join("demo_1.0.raw");

    let out = tmp();
    let built = attache_build(out.path(), &[&format!("{demo}#demo")]);
    assert_eq!(built["sha256"], sha256_file(&image), "{built}");
    assert_eq!(
        sha256_file(&out.path().join("demo_1.0.raw")),
        sha256_file(&image)
    );

    let list = unsquashfs_list(&image);
    assert!(
        list.iter()
            .any(|l| l.ends_with(" /etc/systemd/system/demo.service")),
        "{}",
        list.join("\n")
    );
    let os = unsquashfs_cat(&image, "etc/os-release");
    assert!(os.lines().any(|l| l == "PORTABLE_PREFIXES=demo"), "{os}");
    // The spec is reachable on its own, and stays out of the image.
    let spec = dir.path().join("spec");
    nix_build_ok(&spec, &[&format!("{demo}#demo.spec")]);
    assert!(spec.is_file());
    assert!(!list.iter().any(|l| l.contains("attache-spec-")));

    // The demo in the repository, its stub given the packer by the
    // environment (impure): the same image.
    let prebuilt = dir.path().join("demo/stub-nixpkgs/prebuilt");
    let in_repo = dir.path().join("in-repo");
    let out = nix_build_env(
        &in_repo,
        &["--impure", "./examples/demo#demo"],
        &[("ATTACHE_STUB_PREBUILT", &prebuilt)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256_file(&in_repo.join("demo_1.0.raw")),
        sha256_file(&image)
    );
}

#[test]
fn nix_build_refuses_what_attache_build_refuses_with_the_same_sentence() {
    let dir = tmp();
    let demo = demo_with_attache(dir.path(), static_attache(), env!("CARGO_PKG_VERSION"));
    let result = dir.path().join("result");
    let out = nix_build(&result, &[&format!("{demo}#bad-unit")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("unit 'other.service' does not match the image's prefix 'badunit', so portabled would refuse it: name it 'badunit.service', 'badunit-other.service' or 'badunit@.service'"),
        "{stderr}"
    );
    assert!(!result.exists());
}

/// attache builds the spec only: a packer that cannot run (and says
/// another version) is never run by `attache build`, which only warns
/// about the version; `nix build` does run it.
#[test]
fn attache_build_never_builds_the_image_and_names_another_packer_version() {
    let dir = tmp();
    let not_a_program = dir.path().join("attache");
    std::fs::write(&not_a_program, "not a program\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&not_a_program, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let demo = demo_with_attache(dir.path(), &not_a_program, "0.0.1-other");
    let out = tmp();
    let o = out.path().display().to_string();
    let installable = format!("{demo}#demo");
    let r = attache(&["build", "-o", &o, &installable]).ok();
    assert!(
        r.stderr.contains(&format!(
            "packs its image under `nix build` with attache 0.0.1-other, but this is attache {}: the two may write different bytes",
            env!("CARGO_PKG_VERSION")
        )),
        "{}",
        r.stderr
    );
    assert_eq!(files_in(out.path()), ["demo_1.0.raw"]);
    // An inventory service is what deploy builds: the spec too.
    let service = format!("{demo}#attache.hosts.h1.services.demo");
    let again = attache(&["build", "--json", "-o", &o, &service])
        .ok()
        .json();
    assert_eq!(again["name"], "demo");
    let failed = nix_build(&dir.path().join("result"), &[&installable]);
    assert!(
        !failed.status.success(),
        "the packer cannot run, nix build must fail"
    );
}

/// Without a packer (the library imported without the overlay), `nix
/// build` says how to pass one; `attache build` does not need it.
#[test]
fn nix_build_without_a_packer_says_how_to_pass_one() {
    let dir = tmp();
    let out = nix_build(&dir.path().join("result"), &["./examples/demo#demo"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no attache package to pack demo-1.0 with under nix build: use attache's overlay (pkgs.attache.portableService), or pass it: import ATTACHE/nix/lib.nix { inherit pkgs; attache = "),
        "{stderr}"
    );
}

#[test]
fn nixpkgs_style_flake_nix_build_with_attaches_overlay() {
    let dir = tmp();
    let stub = dir.path().join("stub");
    copy_flake("examples/stub-nixpkgs", &stub);
    give_stub_attache(&stub, static_attache(), env!("CARGO_PKG_VERSION"));
    let stub_ref = format!("path:{}", stub.display());
    let attache_ref = format!("git+file://{}", repo().display());
    let args = [
        "./examples/nixpkgs-style#default",
        "--override-input",
        "nixpkgs",
        &stub_ref,
        "--override-input",
        "attache",
        &attache_ref,
    ];
    let result = dir.path().join("result");
    nix_build_ok(&result, &args);
    assert_eq!(files_in(&result), ["hello-web_0.1.raw"]);
    let image = result.join("hello-web_0.1.raw");

    let out = tmp();
    let mut cli = vec![args[0], "--"];
    cli.extend_from_slice(&args[1..]);
    let built = attache_build(out.path(), &cli);
    assert_eq!(built["sha256"], sha256_file(&image), "{built}");
    let list = unsquashfs_list(&image);
    assert!(
        list.iter()
            .any(|l| l.ends_with(" /etc/systemd/system/hello-web.service")),
        "{}",
        list.join("\n")
    );
}

/// A derivation whose output is an image already (nixpkgs'
/// `pkgs.portableService`): checked as `inspect` checks it, copied as it is.
#[test]
fn an_image_built_by_nix_is_taken_as_it_is() {
    let packed = tmp();
    let built = attache_build(packed.path(), &["./examples/demo#demo"]);
    let image = packed.path().join("demo_1.0.raw");
    let expr = |name: &str| {
        format!(
            "import {}/tests/fixtures/prebuilt.nix {{ image = {}; name = \"{name}\"; }}",
            repo().display(),
            image.display()
        )
    };

    let out = tmp();
    let taken = attache_build(out.path(), &["--impure", "--expr", &expr("demo_1.0.raw")]);
    assert_eq!(files_in(out.path()), ["demo_1.0.raw"]);
    let copy = out.path().join("demo_1.0.raw");
    assert_eq!(sha256_file(&copy), built["sha256"].as_str().unwrap());
    assert_eq!(taken["sha256"], built["sha256"]);
    assert_eq!(taken["name"], "demo");
    assert_eq!(taken["version"], "1.0");
    let sorted = |v: &serde_json::Value| {
        let mut units: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.to_string())
            .collect();
        units.sort();
        units
    };
    // The same units, with what attach enables (in the image's order).
    assert_eq!(sorted(&taken["units"]), sorted(&built["units"]));
    assert_eq!(taken["prefixes"], built["prefixes"]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o644
    );

    // An image mksquashfs made, whose unit does not match its name: refused
    // as inspect refuses it, nothing written.
    let tree = tmp();
    let units = tree.path().join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(tree.path().join("etc/os-release"), "ID=debian\n").unwrap();
    std::fs::write(
        units.join("other.service"),
        "[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    let bad = packed.path().join("bad_1.0.raw");
    let made = Command::new("mksquashfs")
        .arg(tree.path())
        .arg(&bad)
        .args(["-all-root", "-noappend", "-quiet"])
        .output()
        .expect("mksquashfs runs (scripts/setup installs squashfs-tools)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let expr = format!(
        "import {}/tests/fixtures/prebuilt.nix {{ image = {}; }}",
        repo().display(),
        bad.display()
    );
    let out = tmp();
    let o = out.path().display().to_string();
    let r = attache(&["build", "-o", &o, "--impure", "--expr", &expr]).fails(1);
    assert!(
        r.error().starts_with("portabled would refuse this image:"),
        "{}",
        r.stderr
    );
    assert!(
        r.error()
            .contains("unit other.service does not match the unit prefix bad"),
        "{}",
        r.stderr
    );
    assert_eq!(files_in(out.path()), Vec::<String>::new());
    // A prebuilt image keeps its name.
    let r = attache(&[
        "build", "-o", &o, "--name", "x", "--impure", "--expr", &expr,
    ])
    .fails(1);
    assert!(
        r.error().contains("--name and --version cannot rename it"),
        "{}",
        r.stderr
    );
}
