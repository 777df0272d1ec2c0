//! Tests of the packer and reader on small trees built in temporary directories.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufReader, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use backhand::{FilesystemReader, InnerNode};
use sha2::{Digest, Sha256};

use super::layout::render_os_release;
use super::*;
use crate::spec::{ImageSpec, Symlink, UnitFile};

const BS: u32 = 4096;

/// A pseudo-random but compressible byte stream with a fixed seed.
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let words = [
        "nix", "store", "portable", "service", "squash", "\n", "lib", "0123",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 8) as usize].as_bytes());
        if x.is_multiple_of(5) {
            out.push((x >> 32) as u8);
        }
    }
    out.truncate(len);
    out
}

/// A store with two store paths and a unit, under `root`.
fn tree(root: &Path) -> ImageSpec {
    let sp = root.join("store/aaaa-demo-1.0");
    fs::create_dir_all(sp.join("bin")).unwrap();
    fs::create_dir_all(sp.join("lib")).unwrap();
    fs::create_dir_all(sp.join("share/doc/deep/er")).unwrap();
    fs::write(sp.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
    fs::set_permissions(sp.join("bin/hello"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("hello", sp.join("bin/alias")).unwrap();
    fs::write(sp.join("lib/data.txt"), data(1, 3000)).unwrap();
    fs::write(sp.join("lib/dup.txt"), data(1, 3000)).unwrap();
    fs::write(sp.join("lib/big.bin"), data(2, 5 * BS as usize + 123)).unwrap();
    fs::write(sp.join("lib/big-copy.bin"), data(2, 5 * BS as usize + 123)).unwrap();
    fs::hard_link(sp.join("lib/big.bin"), sp.join("lib/big-link.bin")).unwrap();
    fs::write(sp.join("lib/zeros.bin"), vec![0u8; 3 * BS as usize]).unwrap();
    fs::write(sp.join("lib/empty"), b"").unwrap();
    fs::write(sp.join("share/doc/deep/er/readme"), b"deep\n").unwrap();
    fs::set_permissions(sp.join("lib/data.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let single = root.join("store/bbbb-config.json");
    fs::write(&single, b"{\"a\":1}\n").unwrap();

    let unit = root.join("demo.service");
    fs::write(
        &unit,
        format!(
            "[Service]\nExecStart={}/bin/hello --flag \\\n  more\nExecStart=/bin/true\n",
            "/nix/store/aaaa-demo-1.0"
        ),
    )
    .unwrap();
    let unit_link = root.join("demo-link.socket");
    fs::write(root.join("sock"), b"[Socket]\nListenStream=7777\n").unwrap();
    symlink(root.join("sock"), &unit_link).unwrap();

    let mut os_release = BTreeMap::new();
    os_release.insert("ID".into(), "nixos".into());
    os_release.insert("PRETTY_NAME".into(), "NixOS \"portable\" $x".into());
    os_release.insert("PORTABLE_ID".into(), "demo".into());
    ImageSpec {
        name: "demo".into(),
        version: "1.0".into(),
        units: vec![
            UnitFile {
                name: "demo.service".into(),
                source: unit,
            },
            UnitFile {
                name: "demo.socket".into(),
                source: unit_link,
            },
        ],
        symlinks: vec![Symlink {
            path: "/usr/bin/demo".into(),
            target: "/nix/store/aaaa-demo-1.0/bin/hello".into(),
        }],
        store_paths: vec![sp, single],
        os_release,
    }
}

fn opts(compression: Compression) -> PackOptions {
    PackOptions {
        compression,
        level: None,
        block_size: BS,
        threads: 1,
    }
}

fn pack_quiet(spec: &ImageSpec, o: &PackOptions, out: &Path) -> Result<Image, ImageError> {
    pack(spec, o, out, &mut |_| {})
}

fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).unwrap()))
}

fn has_unsquashfs() -> bool {
    Command::new("unsquashfs").arg("-v").output().is_ok()
}

fn dir_is_empty(dir: &Path) -> bool {
    fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn packs_and_reads_back_with_backhand() {
    let t = tempfile::tempdir().unwrap();
    let spec = tree(t.path());
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    let img = pack_quiet(&spec, &opts(Compression::Zstd), &out).unwrap();
    assert_eq!(img.path, out.join("demo_1.0.raw"));
    assert_eq!(img.size, fs::metadata(&img.path).unwrap().len());
    assert_eq!(img.size % 4096, 0, "padded to 4K like mksquashfs");
    assert_eq!(img.sha256, sha256_of(&img.path));
    // nothing else left in out_dir
    assert_eq!(fs::read_dir(&out).unwrap().count(), 1);

    let r =
        FilesystemReader::from_reader(BufReader::new(fs::File::open(&img.path).unwrap())).unwrap();
    assert_eq!(r.mod_time, 0);
    assert_eq!(r.block_size, BS);
    let mut seen = BTreeMap::new();
    for node in r.files() {
        assert_eq!(node.header.uid, 0, "{:?}", node.fullpath);
        assert_eq!(node.header.gid, 0, "{:?}", node.fullpath);
        assert_eq!(node.header.mtime, 0, "{:?}", node.fullpath);
        seen.insert(node.fullpath.clone(), node);
    }
    let mode = |p: &str| seen[Path::new(p)].header.permissions;
    assert_eq!(r.root.root().header.permissions, 0o755);
    assert_eq!(mode("/tmp"), 0o1777);
    assert_eq!(mode("/var/tmp"), 0o1777);
    assert_eq!(mode("/proc"), 0o755);
    assert_eq!(mode("/usr/bin"), 0o755);
    assert_eq!(mode("/nix/store/aaaa-demo-1.0"), 0o555);
    assert_eq!(mode("/nix/store/aaaa-demo-1.0/bin/hello"), 0o555);
    assert_eq!(mode("/nix/store/aaaa-demo-1.0/lib/data.txt"), 0o444);
    assert_eq!(mode("/etc/os-release"), 0o644);

    let content = |p: &str| -> Vec<u8> {
        match &seen[Path::new(p)].inner {
            InnerNode::File(f) => {
                let mut v = Vec::new();
                r.file(f).reader().read_to_end(&mut v).unwrap();
                v
            }
            other => panic!("{p} is not a file: {other:?}"),
        }
    };
    let link = |p: &str| -> PathBuf {
        match &seen[Path::new(p)].inner {
            InnerNode::Symlink(s) => s.link.clone(),
            other => panic!("{p} is not a symlink: {other:?}"),
        }
    };
    let sp = t.path().join("store/aaaa-demo-1.0");
    for f in [
        "lib/data.txt",
        "lib/dup.txt",
        "lib/big.bin",
        "lib/big-copy.bin",
        "lib/big-link.bin",
        "lib/zeros.bin",
        "lib/empty",
        "share/doc/deep/er/readme",
        "bin/hello",
    ] {
        assert_eq!(
            content(&format!("/nix/store/aaaa-demo-1.0/{f}")),
            fs::read(sp.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(content("/nix/store/bbbb-config.json"), b"{\"a\":1}\n");
    assert_eq!(content("/etc/resolv.conf"), b"");
    assert_eq!(content("/etc/machine-id"), b"");
    assert_eq!(content("/etc/os-release"), content("/usr/lib/os-release"));
    assert_eq!(
        String::from_utf8(content("/etc/os-release")).unwrap(),
        "ID=nixos\nPORTABLE_ID=demo\nPRETTY_NAME=\"NixOS \\\"portable\\\" \\$x\"\n"
    );
    assert_eq!(
        content("/etc/systemd/system/demo.socket"),
        b"[Socket]\nListenStream=7777\n"
    );
    assert_eq!(
        link("/nix/store/aaaa-demo-1.0/bin/alias"),
        Path::new("hello")
    );
    assert_eq!(
        link("/usr/bin/demo"),
        Path::new("/nix/store/aaaa-demo-1.0/bin/hello")
    );
}

#[test]
fn unsquashfs_agrees() {
    if !has_unsquashfs() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let spec = tree(t.path());
    for c in [Compression::Zstd, Compression::Xz, Compression::Gzip] {
        let out = t.path().join(format!("out-{c}"));
        fs::create_dir(&out).unwrap();
        let img = pack_quiet(&spec, &opts(c), &out).unwrap();
        let list = Command::new("unsquashfs")
            .args(["-lln", "-no-progress"])
            .arg(&img.path)
            .output()
            .unwrap();
        assert!(list.status.success(), "{c}: {list:?}");
        let text = String::from_utf8(list.stdout).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("squashfs-root"))
            .collect();
        assert!(lines.len() > 30, "{text}");
        let line = |p: &str| -> &str {
            lines
                .iter()
                .find(|l| {
                    l.ends_with(&format!("squashfs-root{p}"))
                        || l.contains(&format!("squashfs-root{p} -> "))
                })
                .unwrap_or_else(|| panic!("{p} missing in\n{text}"))
        };
        for l in &lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f[1], "0/0", "{l}");
            assert_eq!(f[3], "1970-01-01", "{l}");
            assert_eq!(f[4], "00:00", "{l}");
        }
        assert!(line("").starts_with("drwxr-xr-x "));
        assert!(line("/tmp").starts_with("drwxrwxrwt "));
        assert!(line("/var/tmp").starts_with("drwxrwxrwt "));
        assert!(line("/etc/resolv.conf").starts_with("-rw-r--r-- "));
        assert!(line("/nix/store/aaaa-demo-1.0/bin/hello").starts_with("-r-xr-xr-x "));
        let empty: Vec<&str> = line("/nix/store/aaaa-demo-1.0/lib/empty")
            .split_whitespace()
            .collect();
        assert_eq!(empty[..3], ["-r--r--r--", "0/0", "0"]);
        assert!(line("/nix/store/aaaa-demo-1.0").starts_with("dr-xr-xr-x "));
        assert!(line("/nix/store/aaaa-demo-1.0/bin/alias").starts_with("lrwxrwxrwx "));
        assert!(line("/usr/bin/demo").ends_with("-> /nix/store/aaaa-demo-1.0/bin/hello"));

        let cat = |p: &str| {
            let o = Command::new("unsquashfs")
                .arg("-cat")
                .arg(&img.path)
                .arg(p)
                .output()
                .unwrap();
            assert!(o.status.success(), "{c} {p}: {o:?}");
            o.stdout
        };
        let sp = t.path().join("store/aaaa-demo-1.0");
        for f in [
            "lib/big.bin",
            "lib/big-copy.bin",
            "lib/zeros.bin",
            "lib/dup.txt",
        ] {
            assert_eq!(
                cat(&format!("nix/store/aaaa-demo-1.0/{f}")),
                fs::read(sp.join(f)).unwrap(),
                "{c} {f}"
            );
        }
        assert!(String::from_utf8(cat("etc/os-release"))
            .unwrap()
            .contains("ID=nixos\n"));
    }
}

#[test]
fn same_spec_gives_same_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let spec_a = tree(a.path());
    // Same content elsewhere, with other mtimes and modes that only differ in r/w bits.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let spec_b = tree(b.path());
    fs::set_permissions(
        b.path().join("store/aaaa-demo-1.0/lib/data.txt"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let o = opts(Compression::Zstd);
    let ia = pack_quiet(&spec_a, &o, a.path()).unwrap();
    let ib = pack_quiet(&spec_b, &o, b.path()).unwrap();
    assert_eq!(ia.sha256, ib.sha256);
    assert_eq!(fs::read(&ia.path).unwrap(), fs::read(&ib.path).unwrap());
    assert_eq!(ia.sha256, sha256_of(&ia.path));
}

#[test]
fn long_symlink_target_is_refused_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let mut spec = tree(t.path());
    let target = "x".repeat(300);
    symlink(&target, t.path().join("store/aaaa-demo-1.0/lib/long")).unwrap();
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    let err = pack_quiet(&spec, &opts(Compression::Zstd), &out).unwrap_err();
    match &err {
        ImageError::SymlinkTooLong { path, len } => {
            assert!(path.ends_with("lib/long"), "{path}");
            assert_eq!(*len, 300);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("lib/long"));
    assert!(dir_is_empty(&out));
    assert!(check_layout(&spec).is_err());

    // 255 bytes is fine; 256 is not (backhand panics there).
    fs::remove_file(t.path().join("store/aaaa-demo-1.0/lib/long")).unwrap();
    symlink(
        "y".repeat(255),
        t.path().join("store/aaaa-demo-1.0/lib/long"),
    )
    .unwrap();
    pack_quiet(&spec, &opts(Compression::Zstd), &out).unwrap();
    spec.symlinks.push(Symlink {
        path: "/etc/long".into(),
        target: "z".repeat(256),
    });
    assert!(matches!(
        check_layout(&spec),
        Err(ImageError::SymlinkTooLong { .. })
    ));
}

#[test]
fn special_files_and_unreadable_files_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let spec = tree(t.path());
    let fifo = t.path().join("store/aaaa-demo-1.0/lib/fifo");
    let ok = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(ok.success());
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    match pack_quiet(&spec, &opts(Compression::Zstd), &out) {
        Err(ImageError::SpecialFile { path, kind }) => {
            assert_eq!(path, fifo);
            assert_eq!(kind, "FIFO");
        }
        other => panic!("{other:?}"),
    }
    fs::remove_file(&fifo).unwrap();

    let mut spec = spec;
    spec.store_paths.push(t.path().join("store/missing"));
    assert!(matches!(
        pack_quiet(&spec, &opts(Compression::Zstd), &out),
        Err(ImageError::Read { .. })
    ));
    assert!(dir_is_empty(&out));
}

#[test]
fn bad_spec_symlinks_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let base = tree(t.path());
    let with = |path: &str, target: &str| {
        let mut s = base.clone();
        s.symlinks.push(Symlink {
            path: path.into(),
            target: target.into(),
        });
        check_layout(&s)
    };
    assert!(matches!(
        with("etc/ssl", "/x"),
        Err(ImageError::BadSymlink { .. })
    ));
    assert!(matches!(
        with("/etc/../ssl", "/x"),
        Err(ImageError::BadSymlink { .. })
    ));
    assert!(matches!(
        with("/etc/./ssl", "/x"),
        Err(ImageError::BadSymlink { .. })
    ));
    assert!(matches!(
        with("/", "/x"),
        Err(ImageError::BadSymlink { .. })
    ));
    assert!(matches!(
        with("/etc/ssl", ""),
        Err(ImageError::BadSymlink { .. })
    ));
    assert!(matches!(
        with("/etc/os-release", "/x"),
        Err(ImageError::Collision { .. })
    ));
    assert!(matches!(
        with("/usr/bin/demo", "/x"),
        Err(ImageError::Collision { .. })
    ));
    assert!(matches!(
        with("/etc/machine-id/x", "/x"),
        Err(ImageError::BadSymlink { .. })
    ));
    assert!(matches!(
        with("/nix/store/aaaa-demo-1.0/x", "/x"),
        Err(ImageError::BadSymlink { .. })
    ));
    assert!(with("/etc/ssl", "/nix/store/aaaa-demo-1.0/share").is_ok());
    assert!(with("/a/b/c/d", "/nix/store/aaaa-demo-1.0/share").is_ok());

    let mut s = base.clone();
    s.units.push(s.units[0].clone());
    assert!(matches!(
        check_layout(&s),
        Err(ImageError::Collision { .. })
    ));
    let mut s = base.clone();
    s.name = "my_app".into();
    assert!(matches!(check_layout(&s), Err(ImageError::BadName { .. })));
    let mut s = base.clone();
    s.os_release.insert("bad key".into(), "x".into());
    assert!(matches!(
        check_layout(&s),
        Err(ImageError::BadOsRelease { .. })
    ));
    let mut s = base;
    s.store_paths.push(s.store_paths[0].clone());
    assert!(matches!(
        check_layout(&s),
        Err(ImageError::Collision { .. })
    ));
}

#[test]
fn bad_options_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let spec = tree(t.path());
    for (bs, level) in [(3000, None), (2048, None), (2 << 20, None), (BS, Some(30))] {
        let o = PackOptions {
            block_size: bs,
            level,
            ..opts(Compression::Zstd)
        };
        assert!(matches!(
            pack_quiet(&spec, &o, t.path()),
            Err(ImageError::BadOptions(_))
        ));
    }
    assert_eq!("XZ".parse::<Compression>().unwrap(), Compression::Xz);
    assert_eq!(Compression::Gzip.to_string(), "gzip");
    assert!("lz4".parse::<Compression>().is_err());
}

#[test]
fn os_release_quoting() {
    let mut m = BTreeMap::new();
    m.insert("A".to_string(), "plain-1.0_x".to_string());
    m.insert("B".to_string(), "with space".to_string());
    m.insert("C".to_string(), "q\"b\\d$t`".to_string());
    m.insert("D".to_string(), String::new());
    let text = String::from_utf8(render_os_release(&m).unwrap()).unwrap();
    assert_eq!(
        text,
        "A=plain-1.0_x\nB=\"with space\"\nC=\"q\\\"b\\\\d\\$t\\`\"\nD=\"\"\n"
    );
    assert_eq!(super::layout::parse_os_release(&text), m);
    m.insert("E".to_string(), "two\nlines".to_string());
    assert!(render_os_release(&m).is_err());
}

#[test]
fn progress_events() {
    let t = tempfile::tempdir().unwrap();
    let spec = tree(t.path());
    let mut events = Vec::new();
    pack(&spec, &opts(Compression::Zstd), t.path(), &mut |e| {
        events.push(e)
    })
    .unwrap();
    let Some(PackEvent::Started { files, bytes }) = events.first().copied() else {
        panic!("{events:?}")
    };
    assert_eq!(events.last(), Some(&PackEvent::Finished));
    assert_eq!(
        events[events.len() - 2],
        PackEvent::Progress {
            files_done: files,
            bytes_done: bytes
        }
    );
    let mut last = (0, 0);
    for e in &events {
        if let PackEvent::Progress {
            files_done,
            bytes_done,
        } = *e
        {
            assert!(files_done >= last.0 && bytes_done >= last.1);
            last = (files_done, bytes_done);
        }
    }
}

#[test]
fn inspect_reports_a_good_image() {
    let t = tempfile::tempdir().unwrap();
    let spec = tree(t.path());
    let img = pack_quiet(&spec, &opts(Compression::Xz), t.path()).unwrap();
    let i = inspect(&img.path).unwrap();
    assert_eq!(i.problems, Vec::<String>::new());
    assert_eq!(i.name, "demo");
    assert_eq!(i.version, "1.0");
    assert_eq!(i.os_release, spec.os_release);
    assert_eq!(i.compression, "xz");
    assert_eq!(i.block_size, BS);
    assert_eq!(i.sha256, img.sha256);
    assert_eq!(i.size, img.size);
    assert_eq!(
        i.store_paths,
        ["/nix/store/aaaa-demo-1.0", "/nix/store/bbbb-config.json"]
    );
    assert_eq!(
        i.units,
        [
            UnitInfo {
                name: "demo.service".into(),
                exec_start: vec![
                    "/nix/store/aaaa-demo-1.0/bin/hello --flag    more".into(),
                    "/bin/true".into()
                ],
                install: false,
            },
            UnitInfo {
                name: "demo.socket".into(),
                exec_start: vec![],
                install: false,
            }
        ]
    );
}

#[test]
fn inspect_flags_a_bad_image() {
    let t = tempfile::tempdir().unwrap();
    let mut spec = tree(t.path());
    spec.os_release.remove("ID");
    spec.units[0].name = "other.service".into();
    spec.units.truncate(1);
    let img = pack_quiet(&spec, &opts(Compression::Zstd), t.path()).unwrap();
    let i = inspect(&img.path).unwrap();
    let all = i.problems.join("\n");
    assert!(all.contains("no ID="), "{all}");
    assert!(all.contains("other.service does not match"), "{all}");
    assert!(all.contains("no usable unit file"), "{all}");

    // An image made by mksquashfs without mount points, root 0700.
    if Command::new("mksquashfs").arg("-version").output().is_ok() {
        let src = t.path().join("bare");
        fs::create_dir_all(src.join("etc/systemd/system")).unwrap();
        fs::write(src.join("etc/systemd/system/bare.service"), b"").unwrap();
        fs::write(src.join("etc/systemd/system/bare-x.timer"), b"[Timer]\n").unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o700)).unwrap();
        let raw = t.path().join("bare_2.raw");
        let ok = Command::new("mksquashfs")
            .arg(&src)
            .arg(&raw)
            .args(["-noappend", "-all-root", "-quiet", "-no-progress"])
            .output()
            .unwrap();
        assert!(ok.status.success(), "{ok:?}");
        let i = inspect(&raw).unwrap();
        let all = i.problems.join("\n");
        assert!(all.contains("os-release"), "{all}");
        assert!(all.contains("mode 0700"), "{all}");
        assert!(all.contains("/proc"), "{all}");
        assert!(all.contains("/var/tmp"), "{all}");
        assert!(all.contains("/etc/machine-id"), "{all}");
        assert!(all.contains("bare.service is empty"), "{all}");
        assert!(!all.contains("no usable unit"), "{all}");
        assert_eq!(i.units.len(), 2);
    }
}

#[test]
fn inspect_never_panics_on_junk() {
    let t = tempfile::tempdir().unwrap();
    let junk = t.path().join("junk.raw");
    fs::write(&junk, b"not an image at all, just text").unwrap();
    assert!(matches!(
        inspect(&junk),
        Err(ImageError::NotSquashfs { .. })
    ));
    assert!(matches!(
        inspect(&t.path().join("missing.raw")),
        Err(ImageError::Read { .. })
    ));

    let spec = tree(t.path());
    let img = pack_quiet(&spec, &opts(Compression::Gzip), t.path()).unwrap();
    let good = fs::read(&img.path).unwrap();
    let bad = t.path().join("bad_1.raw");
    // Truncations and flipped bytes: an error or a report, never a panic.
    for cut in [96, 100, 200, 1000, good.len() / 2, good.len() - 4096 - 10] {
        fs::write(&bad, &good[..cut]).unwrap();
        let _ = inspect(&bad);
    }
    let mut x = 12345u64;
    for _ in 0..40 {
        let mut g = good.clone();
        for _ in 0..8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = 4 + (x as usize % (g.len() - 4));
            g[i] ^= (x >> 40) as u8 | 1;
        }
        fs::write(&bad, &g).unwrap();
        let _ = inspect(&bad);
    }
}

#[test]
fn threads_give_the_same_bytes() {
    let t = tempfile::tempdir().unwrap();
    let spec = tree(t.path());
    // More data files, duplicates among them, and enough blocks to fill the queue.
    let sp = t.path().join("store/aaaa-demo-1.0/lib");
    for i in 0..40u64 {
        let len = (i as usize % 7) * BS as usize + (i as usize * 37) % 5000;
        fs::write(sp.join(format!("gen-{i:02}")), data(i % 9, len)).unwrap();
    }
    for c in [Compression::Zstd, Compression::Xz, Compression::Gzip] {
        let mut shas = Vec::new();
        for threads in [1, 2, 3, 8] {
            let out = t.path().join(format!("out-{c}-{threads}"));
            fs::create_dir(&out).unwrap();
            let o = PackOptions { threads, ..opts(c) };
            let (img, stats) = super::pack::pack_with_stats(&spec, &o, &out, &mut |_| {}).unwrap();
            assert_eq!(img.sha256, sha256_of(&img.path));
            assert!(stats.blocks > 20, "{c} {threads}: {stats:?}");
            // big-copy.bin (same content), big-link.bin (hard link), dup.txt
            // (a small copy), repeated gen-*.
            assert!(stats.dup_files >= 3, "{c} {threads}: {stats:?}");
            shas.push(img.sha256);
        }
        assert!(shas.windows(2).all(|w| w[0] == w[1]), "{c}: {shas:?}");
    }
}

#[test]
fn larger_block_sizes_work() {
    let t = tempfile::tempdir().unwrap();
    let spec = tree(t.path());
    for bs in [1 << 17, 1 << 20] {
        let o = PackOptions {
            block_size: bs,
            threads: 2,
            ..opts(Compression::Zstd)
        };
        let out = t.path().join(format!("out-{bs}"));
        fs::create_dir(&out).unwrap();
        let img = pack_quiet(&spec, &o, &out).unwrap();
        let i = inspect(&img.path).unwrap();
        assert_eq!(i.block_size, bs);
        assert!(i.problems.is_empty(), "{:?}", i.problems);
    }
}

#[test]
fn copies_share_data_and_big_directories_read_back() {
    let t = tempfile::tempdir().unwrap();
    let mut spec = tree(t.path());
    // 3000 names of 40 bytes: a listing over 64 KiB (extended directory
    // inode) in many runs of at most 256 names; small copies among them.
    let big = t.path().join("store/cccc-many");
    fs::create_dir_all(&big).unwrap();
    for i in 0..3000u64 {
        let name = format!("{i:05}-{}", "n".repeat(34));
        fs::write(big.join(name), data(i % 50, 100 + (i % 50) as usize)).unwrap();
    }
    spec.store_paths.push(big.clone());
    for threads in [1, 2] {
        let out = t.path().join(format!("out-{threads}"));
        fs::create_dir(&out).unwrap();
        let o = PackOptions {
            threads,
            ..opts(Compression::Zstd)
        };
        let (img, stats) = super::pack::pack_with_stats(&spec, &o, &out, &mut |_| {}).unwrap();
        assert!(stats.dup_files >= 2950, "{stats:?}");
        let r = FilesystemReader::from_reader(BufReader::new(fs::File::open(&img.path).unwrap()))
            .unwrap();
        let mut files = BTreeMap::new();
        for node in r.files() {
            if let InnerNode::File(f) = &node.inner {
                files.insert(node.fullpath.clone(), f);
            }
        }
        let get = |p: &str| files[Path::new(p)];
        let (a, b) = (
            get("/nix/store/aaaa-demo-1.0/lib/data.txt"),
            get("/nix/store/aaaa-demo-1.0/lib/dup.txt"),
        );
        assert_eq!(
            (a.frag_index(), a.block_offset()),
            (b.frag_index(), b.block_offset())
        );
        let (a, b) = (
            get("/nix/store/aaaa-demo-1.0/lib/big.bin"),
            get("/nix/store/aaaa-demo-1.0/lib/big-copy.bin"),
        );
        assert_eq!(a.blocks_start(), b.blocks_start());
        assert_eq!(a.block_sizes(), b.block_sizes());
        let mut n = 0;
        for (path, f) in &files {
            let Ok(rest) = path.strip_prefix("/nix/store/cccc-many") else {
                continue;
            };
            let mut v = Vec::new();
            r.file(f).reader().read_to_end(&mut v).unwrap();
            assert_eq!(v, fs::read(big.join(rest)).unwrap(), "{}", path.display());
            n += 1;
        }
        assert_eq!(n, 3000);
        if has_unsquashfs() {
            let x = t.path().join(format!("x-{threads}"));
            let o = Command::new("unsquashfs")
                .args(["-q", "-n", "-d"])
                .arg(&x)
                .arg(&img.path)
                .output()
                .unwrap();
            assert!(o.status.success(), "{o:?}");
            let diff = Command::new("diff")
                .arg("-r")
                .arg(&big)
                .arg(x.join("nix/store/cccc-many"))
                .output()
                .unwrap();
            assert!(diff.status.success(), "{diff:?}");
        }
    }
}

#[test]
fn xz_at_one_mib_blocks_uses_a_half_block_dictionary() {
    if !has_unsquashfs() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mut spec = tree(t.path());
    // 3 MiB with repeats 700 KiB apart: past the dictionary, within a block.
    let big = t.path().join("store/bbbb-big");
    fs::create_dir_all(&big).unwrap();
    let chunk = data(7, 700 << 10);
    let content: Vec<u8> = chunk.iter().copied().cycle().take(3 << 20).collect();
    fs::write(big.join("blob"), &content).unwrap();
    spec.store_paths.push(big);
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    let o = PackOptions {
        block_size: 1 << 20,
        threads: 2,
        ..opts(Compression::Xz)
    };
    let img = pack_quiet(&spec, &o, &out).unwrap();
    let stat = Command::new("unsquashfs")
        .arg("-s")
        .arg(&img.path)
        .output()
        .unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout);
    assert!(stat.contains("Dictionary size 524288"), "{stat}");
    let dest = t.path().join("unpacked");
    let st = Command::new("unsquashfs")
        .args(["-q", "-no-progress", "-d"])
        .arg(&dest)
        .arg(&img.path)
        .status()
        .unwrap();
    assert!(st.success());
    let back = fs::read(dest.join("nix/store/bbbb-big/blob")).unwrap();
    assert!(back == content, "blob differs after unsquashfs");
}

/// The manifest's NAR sizes are what `nix-store --dump` writes, byte for
/// byte; it sits at its fixed path, and reads back as packed.
#[test]
fn the_manifest_lists_the_closure_with_nar_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = tree(dir.path());
    let out = tempfile::tempdir().unwrap();
    let image = pack_quiet(&spec, &opts(Compression::Zstd), out.path()).unwrap();
    let m = &image.manifest;
    assert_eq!((m.name.as_str(), m.version.as_str()), ("demo", "1.0"));
    let sizes: Vec<(&str, u64)> = m
        .store_paths
        .iter()
        .map(|p| (p.path.as_str(), p.nar_size))
        .collect();
    assert_eq!(
        sizes,
        [
            ("/nix/store/aaaa-demo-1.0", 83152),
            ("/nix/store/bbbb-config.json", 120)
        ]
    );
    for (path, (_, size)) in spec.store_paths.iter().zip(&sizes) {
        // Where there is a nix-store, it must agree.
        if let Ok(o) = Command::new("nix-store").arg("--dump").arg(path).output() {
            if o.status.success() {
                assert_eq!(o.stdout.len() as u64, *size);
            }
        }
    }
    let units: Vec<&str> = m.units.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(units, ["demo.service", "demo.socket"]);
    assert_eq!(
        m.units[0].sha256,
        sha256_of(&spec.units[0].source),
        "the unit as packed"
    );
    assert_eq!(read_manifest(&image.path).unwrap().as_ref(), Some(m));
    // Nothing of attache's own version in it: the same closure, the same bytes.
    let text = String::from_utf8(m.to_bytes()).unwrap();
    assert!(!text.contains(env!("CARGO_PKG_VERSION")), "{text}");
}

/// `attache diff OLD.raw NEW.raw`: two packed images, read back, differ
/// in the one store path that changed, by its NAR size; an image and
/// itself do not differ.
#[test]
fn two_images_diff_offline() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = tree(dir.path());
    // Store path names as Nix writes them: a 32-character hash first.
    let config = |c: char| format!("{}-config.json", c.to_string().repeat(32));
    let first = dir.path().join("store").join(config('b'));
    fs::write(&first, b"{\"a\":1}\n").unwrap();
    spec.store_paths[1] = first;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let old = pack_quiet(&spec, &opts(Compression::Zstd), a.path()).unwrap();
    // The same closure with one path rebuilt: new hash, more bytes.
    let rebuilt = dir.path().join("store").join(config('c'));
    fs::write(&rebuilt, b"{\"a\":1,\"b\":2}\n").unwrap();
    let mut spec2 = spec.clone();
    spec2.version = "1.1".into();
    spec2.store_paths[1] = rebuilt;
    let new = pack_quiet(&spec2, &opts(Compression::Zstd), b.path()).unwrap();

    let read = |p: &Path| read_manifest(p).unwrap().unwrap();
    let d = crate::diff::diff(Some(&read(&old.path)), Some(&read(&new.path)));
    assert_eq!(d.old.as_deref(), Some("demo_1.0.raw"));
    assert_eq!(d.new.as_deref(), Some("demo_1.1.raw"));
    assert_eq!(d.packages.len(), 1, "{d:?}");
    let p = &d.packages[0];
    assert_eq!(p.name, "config.json");
    assert_eq!(p.added[0].path, format!("/nix/store/{}", config('c')));
    assert_eq!(p.removed[0].nar_size, 120);
    assert_eq!(p.added[0].nar_size, 128);
    assert_eq!(p.size_delta, 8);
    assert!(d.units.is_empty());
    let same = crate::diff::diff(Some(&read(&old.path)), Some(&read(&old.path)));
    assert!(same.is_empty(), "{same:?}");
}

/// One changed store path leaves the fragment blocks of the paths after it
/// as they were, so a delta upgrade finds them again.
#[test]
fn a_changed_store_path_leaves_the_others_fragments_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str, seed: u64, extra: bool| {
        let p = dir.path().join("store").join(name);
        fs::create_dir_all(&p).unwrap();
        for i in 0..40u64 {
            fs::write(
                p.join(format!("f{i:02}")),
                data(seed + i, 700 + 31 * i as usize),
            )
            .unwrap();
        }
        if extra {
            fs::write(p.join("f-new"), data(99, 777)).unwrap();
        }
        p
    };
    let a = path("aaaa-runtime", 100, false);
    let m1 = path("mmmm-app-1", 200, false);
    let m2 = path("mmmn-app-2", 200, true);
    let z = path("zzzz-runtime", 300, false);
    let spec = |m: &PathBuf| ImageSpec {
        name: "d".into(),
        version: "1".into(),
        units: vec![],
        symlinks: vec![],
        store_paths: vec![a.clone(), m.clone(), z.clone()],
        os_release: BTreeMap::from([("ID".to_string(), "nixos".to_string())]),
    };
    let o = PackOptions {
        block_size: 65536,
        ..opts(Compression::Zstd)
    };
    fs::create_dir_all(dir.path().join("o1")).unwrap();
    fs::create_dir_all(dir.path().join("o2")).unwrap();
    let v1 = pack_quiet(&spec(&m1), &o, &dir.path().join("o1")).unwrap();
    let v2 = pack_quiet(&spec(&m2), &o, &dir.path().join("o2")).unwrap();
    let (b1, b2) = (fs::read(&v1.path).unwrap(), fs::read(&v2.path).unwrap());
    let sig = crate::delta::Signature::of_image(&b1, &v1.sha256, 256);
    let d = crate::delta::diff(&sig, &b2);
    let literal = d
        .ops
        .iter()
        .map(|op| match op {
            crate::delta::Op::Literal { len, .. } => *len,
            crate::delta::Op::Copy { .. } => 0,
        })
        .sum::<u64>();
    // The runtime paths' fragment blocks (about two thirds of the image)
    // are copied; what goes is the app's block and the metadata (measured:
    // 16.6 KB of 45 KB; 43.5 KB with fragment blocks shared across paths).
    assert!(literal * 2 < b2.len() as u64, "{literal} of {}", b2.len());
}
