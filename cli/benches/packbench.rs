//! Packer benchmark: attache's packer vs `mksquashfs` vs backhand's stock writer.
//!
//! `cargo bench -p attache --bench packbench [-- zstd|xz|gzip ...]`
//!
//! Builds (once, deterministically, from what is on this machine) a closure of
//! about 260 MB under `$PACKBENCH_DIR` (default `/tmp/attache-packbench`):
//! shared libraries (large binaries), Python modules and docs (many small
//! files), plus a store path of hard links and one of byte-for-byte copies, as
//! `auto-optimise-store` and Nix closures produce. Each packer runs in a child
//! process under `/usr/bin/time` (wall time, peak RSS), warm page cache, best of
//! two runs. Prints a markdown table.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[allow(dead_code, unused_imports)]
#[path = "../src/names.rs"]
mod names;
// Unused imports: the modules' unit tests are compiled but left out here.
#[allow(dead_code, unused_imports)]
#[path = "../src/spec/mod.rs"]
mod spec;

// `spec` reads Nix's description of a derivation.
#[allow(dead_code, unused_imports)]
#[path = "../src/nix.rs"]
mod nix;

// The benchmark uses only part of the module.
#[allow(dead_code, unused_imports)]
#[path = "../src/image/mod.rs"]
mod image;

use std::collections::BTreeMap;
use std::fs;
use std::io::BufWriter;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[(&str, u64)] = &[
    ("/usr/lib/x86_64-linux-gnu", 150 << 20),
    ("/usr/lib/python3.11", 40 << 20),
    ("/usr/share/doc", 25 << 20),
    ("/usr/share/man", 10 << 20),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        child(&args[1..]);
        return;
    }
    let comps: Vec<String> = {
        let c: Vec<String> = args
            .iter()
            .filter(|a| matches!(a.as_str(), "zstd" | "xz" | "gzip"))
            .cloned()
            .collect();
        if c.is_empty() {
            vec!["zstd".into()]
        } else {
            c
        }
    };
    let root = PathBuf::from(
        std::env::var("PACKBENCH_DIR").unwrap_or_else(|_| "/tmp/attache-packbench".into()),
    );
    let store = root.join("store");
    if !root.join("done").exists() {
        eprintln!("building the tree in {} ...", root.display());
        let _ = fs::remove_dir_all(&root);
        build_tree(&store);
        fs::write(root.join("done"), b"").unwrap();
    }
    let (files, bytes, links) = tree_stats(&store);
    println!(
        "tree: {} files, {:.0} MB, {} hard-linked names, {} cores\n",
        files,
        bytes as f64 / 1e6,
        links,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let me = std::env::current_exe().unwrap();
    let out = root.join("out");
    fs::create_dir_all(&out).unwrap();

    println!("| compressor | packer | wall s | image MB | peak RSS MB | wall / mksquashfs | size / mksquashfs | RSS / mksquashfs |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut hash_notes = Vec::new();
    for comp in &comps {
        let compression: image::Compression = comp.parse().unwrap();
        let level = compression.default_level().to_string();
        let level = level.as_str();
        let mut rows = Vec::new();
        let mk_out = out.join(format!("mksquashfs-{comp}.raw"));
        let mut mk = vec![
            "mksquashfs".to_string(),
            store.display().to_string(),
            mk_out.display().to_string(),
            "-noappend".into(),
            "-all-root".into(),
            "-no-xattrs".into(),
            "-quiet".into(),
            "-no-progress".into(),
            "-b".into(),
            "1M".into(),
            "-comp".into(),
            comp.clone(),
        ];
        match comp.as_str() {
            "zstd" | "gzip" => mk.extend(["-Xcompression-level".into(), level.into()]),
            _ => mk.extend(["-Xdict-size".into(), "100%".into()]),
        }
        let mksq = measure(&mk, &mk_out);
        rows.push(("mksquashfs", mksq));
        // This benchmark in child mode, packing with `which` into `dest`.
        let child = |which: &str, dest: &Path, image: &Path| {
            measure(
                &[
                    me.display().to_string(),
                    "--child".into(),
                    which.into(),
                    store.display().to_string(),
                    dest.display().to_string(),
                    comp.clone(),
                    level.into(),
                ],
                image,
            )
        };
        let att_out = out.join(format!("attache-{comp}"));
        let att = child("attache", &att_out, &att_out.join("bench_1.raw"));
        rows.push(("attache", att));
        let hash: f64 = fs::read_to_string(att_out.join("hash-seconds"))
            .unwrap()
            .parse()
            .unwrap();
        hash_notes.push(format!(
            "{comp}: {:.3} s ({:.1} % of attache's wall time)",
            hash,
            100.0 * hash / att.wall
        ));
        let bh_out = out.join(format!("backhand-{comp}.raw"));
        let bh = child("backhand", &bh_out, &bh_out);
        rows.push(("backhand stock", bh));
        for (name, m) in rows {
            println!(
                "| {comp} -{level} | {name} | {:.2} | {:.1} | {:.0} | {:.2} | {:.3} | {:.3} |",
                m.wall,
                m.size as f64 / 1e6,
                m.rss_kb as f64 / 1024.0,
                m.wall / mksq.wall,
                m.size as f64 / mksq.size as f64,
                m.rss_kb as f64 / mksq.rss_kb as f64
            );
        }
    }
    println!("\nsha256 of attache's image, read back once it is written (in its wall time):");
    for note in hash_notes {
        println!("- {note}");
    }
}

#[derive(Debug, Clone, Copy)]
struct Measure {
    wall: f64,
    rss_kb: u64,
    size: u64,
}

/// Best of two runs of `cmd` under /usr/bin/time.
fn measure(cmd: &[String], output: &Path) -> Measure {
    let mut best: Option<Measure> = None;
    for _ in 0..2 {
        let _ = fs::remove_file(output);
        let tfile = std::env::temp_dir().join(format!("packbench-time-{}", std::process::id()));
        let status = Command::new("/usr/bin/time")
            .arg("-f")
            .arg("%e %M")
            .arg("-o")
            .arg(&tfile)
            .args(cmd)
            .status()
            .unwrap();
        assert!(status.success(), "{cmd:?} failed");
        let t = fs::read_to_string(&tfile).unwrap();
        let mut f = t.split_whitespace();
        let wall: f64 = f.next().unwrap().parse().unwrap();
        let rss_kb: u64 = f.next().unwrap().parse().unwrap();
        let size = fs::metadata(output).unwrap().len();
        let m = Measure { wall, rss_kb, size };
        if best.is_none_or(|b| m.wall < b.wall) {
            best = Some(m);
        }
    }
    best.unwrap()
}

fn child(args: &[String]) {
    let (which, store, out, comp, level) = (
        &args[0],
        Path::new(&args[1]),
        Path::new(&args[2]),
        &args[3],
        args[4].parse::<u32>().unwrap(),
    );
    let compression: image::Compression = comp.parse().unwrap();
    match which.as_str() {
        "attache" => {
            let _ = fs::remove_dir_all(out);
            fs::create_dir_all(out).unwrap();
            let mut store_paths: Vec<PathBuf> = fs::read_dir(store)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            store_paths.sort();
            let mut os_release = BTreeMap::new();
            os_release.insert("ID".to_string(), "nixos".to_string());
            let spec = spec::ImageSpec {
                name: "bench".into(),
                version: "1".into(),
                units: vec![],
                symlinks: vec![],
                store_paths,
                os_release,
            };
            let opts = image::PackOptions {
                compression,
                level: Some(level),
                block_size: 1 << 20,
                threads: 0,
            };
            let (img, stats) = image::pack_with_stats(&spec, &opts, out, &mut |_| {}).unwrap();
            eprintln!("attache: {} {:?}", img.sha256, stats);
            fs::write(
                out.join("hash-seconds"),
                stats.hash_time.as_secs_f64().to_string(),
            )
            .unwrap();
        }
        "backhand" => {
            use backhand::compression::{CompressionOptions, Compressor, Gzip, Xz, Zstd};
            let fc = match compression {
                image::Compression::Zstd => backhand::FilesystemCompressor::new(
                    Compressor::Zstd,
                    Some(CompressionOptions::Zstd(Zstd {
                        compression_level: level,
                    })),
                ),
                image::Compression::Gzip => backhand::FilesystemCompressor::new(
                    Compressor::Gzip,
                    Some(CompressionOptions::Gzip(Gzip {
                        compression_level: level,
                        window_size: 15,
                        strategies: 0,
                    })),
                ),
                image::Compression::Xz => backhand::FilesystemCompressor::new(
                    Compressor::Xz,
                    Some(CompressionOptions::Xz(Xz {
                        dictionary_size: 1 << 20,
                        filters: backhand::v4::compressor::XzFilter::new(0),
                        bit_opts: None,
                        fb: None,
                    })),
                ),
            }
            .unwrap();
            let mut w = backhand::FilesystemWriter::default();
            w.set_compressor(fc);
            w.set_block_size(1 << 20);
            w.set_time(0);
            w.set_only_root_id();
            w.set_root_mode(0o755);
            add_tree(&mut w, store, Path::new("/"));
            let f = fs::File::create(out).unwrap();
            let mut bw = BufWriter::new(f);
            let (_, len) = w.write(&mut bw).unwrap();
            let f = bw.into_inner().unwrap();
            f.set_len(len).unwrap();
        }
        other => panic!("unknown child {other}"),
    }
}

fn add_tree(w: &mut backhand::FilesystemWriter<'_, '_, '_>, src: &Path, dest: &Path) {
    let mut names: Vec<_> = fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names {
        let p = src.join(&name);
        let d = dest.join(&name);
        let m = fs::symlink_metadata(&p).unwrap();
        let h = |mode| backhand::NodeHeader::new(mode, 0, 0, 0);
        if m.is_symlink() {
            w.push_symlink(fs::read_link(&p).unwrap(), &d, h(0o777))
                .unwrap();
        } else if m.is_dir() {
            w.push_dir(&d, h(0o555)).unwrap();
            add_tree(w, &p, &d);
        } else if m.is_file() {
            w.push_file_from_path(&p, &d, h(0o444)).unwrap();
        }
    }
}

/// Copies regular files and symlinks (target < 256 bytes) from the sources,
/// in sorted order, up to each budget; then hard links every 5th file and
/// copies every 9th into two more store paths.
fn build_tree(store: &Path) {
    let mut copied: Vec<PathBuf> = Vec::new();
    for (i, (src, budget)) in SOURCES.iter().enumerate() {
        let base = Path::new(src).file_name().unwrap().to_string_lossy();
        let dest = store.join(format!("{i:02}aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-{base}"));
        let mut left = *budget;
        copy_sorted(Path::new(src), &dest, &mut left, &mut copied);
    }
    let hl = store.join("90hhhhhhhhhhhhhhhhhhhhhhhhhhhhhh-hardlinks");
    let cp = store.join("91cccccccccccccccccccccccccccccc-copies");
    fs::create_dir_all(&hl).unwrap();
    fs::create_dir_all(&cp).unwrap();
    for (n, f) in copied.iter().enumerate() {
        if n % 5 == 0 {
            fs::hard_link(f, hl.join(format!("{n:06}"))).unwrap();
        }
        if n % 9 == 0 {
            fs::copy(f, cp.join(format!("{n:06}"))).unwrap();
        }
    }
}

fn copy_sorted(src: &Path, dest: &Path, left: &mut u64, copied: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(src) else { return };
    let mut names: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    names.sort();
    fs::create_dir_all(dest).unwrap();
    for name in names {
        if *left == 0 {
            return;
        }
        let p = src.join(&name);
        let d = dest.join(&name);
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_symlink() {
            if let Ok(t) = fs::read_link(&p) {
                if t.as_os_str().len() < 256 {
                    let _ = std::os::unix::fs::symlink(t, &d);
                }
            }
        } else if m.is_dir() {
            copy_sorted(&p, &d, left, copied);
        } else if m.is_file() && m.len() <= *left && fs::copy(&p, &d).is_ok() {
            *left -= m.len();
            copied.push(d);
        }
    }
}

fn tree_stats(dir: &Path) -> (u64, u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let mut links = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            let (f, b, l) = tree_stats(&e.path());
            files += f;
            bytes += b;
            links += l;
        } else if m.is_file() {
            files += 1;
            bytes += m.len();
            if m.nlink() > 1 {
                links += 1;
            }
        }
    }
    (files, bytes, links)
}
