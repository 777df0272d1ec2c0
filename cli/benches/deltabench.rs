//! Delta benchmark: what an upgrade sends when one store path of about 1 %
//! of a 100+ MB closure changed, against the whole image.
//!
//! `cargo bench -p attache --bench deltabench`
//!
//! Builds (once, deterministically) under `$DELTABENCH_DIR` (default
//! `/tmp/attache-deltabench`) a runtime of 20 store paths of generated
//! files (about 5.5 MB each: mostly small files, which squashfs packs into
//! shared fragment blocks, a few of several MB, text-like bytes with some noise,
//! which zstd shrinks about 2.5×) plus an app store path of 1.2 MB. Version 2 replaces
//! the app by another store path (another hash, so it sorts elsewhere) in
//! which a third of the files changed. Both images are packed with
//! attache's packer (its defaults), then the delta from 1 to 2 is computed
//! as `attache deploy` does, at three signature block sizes. Prints a
//! markdown table: bytes sent (the apply script plus the pieces, and the
//! new image's signature, which the host keeps for the next upgrade)
//! against the image, and the time to diff.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[allow(dead_code, unused_imports)]
#[path = "../src/delta.rs"]
mod delta;
#[allow(dead_code, unused_imports)]
#[path = "../src/image/mod.rs"]
mod image;
#[allow(dead_code, unused_imports)]
#[path = "../src/names.rs"]
mod names;
#[allow(dead_code, unused_imports)]
#[path = "../src/nix.rs"]
mod nix;
#[allow(dead_code, unused_imports)]
#[path = "../src/spec/mod.rs"]
mod spec;
// The host's apply script, to count its bytes; it quotes with the two
// items below.
#[allow(dead_code, unused_imports)]
#[path = "../src/deploy/ops/delta.rs"]
mod host;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct Script {
    pub text: String,
    pub doing: &'static str,
}

impl Script {
    fn new(doing: &'static str, text: impl Into<String>) -> Self {
        Script {
            text: text.into(),
            doing,
        }
    }
}

pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Text-like bytes: words from a fixed vocabulary of random strings.
fn content(rng: &mut Rng, words: &[Vec<u8>], len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        // Some noise, as in machine code: zstd gets about 2.5x.
        if rng.below(5) < 2 {
            v.extend_from_slice(&rng.next().to_le_bytes()[..6]);
        }
        v.extend_from_slice(&words[rng.below(words.len() as u64) as usize]);
        v.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
    }
    v.truncate(len);
    v
}

fn vocabulary(rng: &mut Rng) -> Vec<Vec<u8>> {
    (0..4096)
        .map(|_| {
            let n = 2 + rng.below(10) as usize;
            (0..n).map(|_| b'!' + rng.below(90) as u8).collect()
        })
        .collect()
}

/// A store path of about `bytes` under `store`, named `HASH-name`.
fn store_path(store: &Path, name: &str, seed: u64, bytes: u64, words: &[Vec<u8>]) -> PathBuf {
    let mut rng = Rng(seed | 1);
    let hash: String = (0..32)
        .map(|_| b"0123456789abcdfghijklmnpqrsvwxyz"[rng.below(32) as usize] as char)
        .collect();
    let dir = store.join(format!("{hash}-{name}"));
    let mut total = 0u64;
    let mut i = 0;
    while total < bytes {
        let roll = rng.below(100);
        let len = if roll < 75 {
            300 + rng.below(40_000)
        } else if roll < 97 {
            40_000 + rng.below(900_000)
        } else {
            1_000_000 + rng.below(3_000_000)
        } as usize;
        let sub = dir.join(format!("lib/d{}", i % 7));
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(format!("f{i:04}")), content(&mut rng, words, len)).unwrap();
        total += len as u64;
        i += 1;
    }
    dir
}

/// The app: version 2 is another store path where every third file changed.
fn app(store: &Path, version: u64, words: &[Vec<u8>]) -> PathBuf {
    let mut rng = Rng(0xa99 + version);
    let hash: String = (0..32)
        .map(|_| b"0123456789abcdfghijklmnpqrsvwxyz"[rng.below(32) as usize] as char)
        .collect();
    let dir = store.join(format!("{hash}-app-{version}.0"));
    fs::create_dir_all(dir.join("bin")).unwrap();
    for i in 0..30u64 {
        let changed = version > 1 && i % 3 == 0;
        let mut r = Rng((0xbeef + i) * if changed { 7 } else { 1 });
        let len = 10_000 + r.below(70_000) as usize;
        fs::write(
            dir.join(format!("bin/part{i:02}")),
            content(&mut r, words, len),
        )
        .unwrap();
    }
    dir
}

fn tree_bytes(p: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            tree_bytes(&e.path())
        } else {
            m.len()
        };
    }
    n
}

fn pack(store_paths: &[PathBuf], version: &str, out: &Path) -> (PathBuf, String, f64) {
    let mut store_paths = store_paths.to_vec();
    store_paths.sort();
    let mut os_release = BTreeMap::new();
    os_release.insert("ID".to_string(), "nixos".to_string());
    let spec = spec::ImageSpec {
        name: "bench".into(),
        version: version.into(),
        units: vec![],
        symlinks: vec![],
        store_paths,
        os_release,
    };
    fs::create_dir_all(out).unwrap();
    let t = Instant::now();
    let img = image::pack(&spec, &image::PackOptions::default(), out, &mut |_| {}).unwrap();
    (img.path, img.sha256, t.elapsed().as_secs_f64())
}

fn main() {
    let root = PathBuf::from(
        std::env::var("DELTABENCH_DIR").unwrap_or_else(|_| "/tmp/attache-deltabench".into()),
    );
    let store = root.join("store");
    let mut rng = Rng(0x5eed);
    let words = vocabulary(&mut rng);
    if !root.join("done").exists() {
        eprintln!("building the tree in {} ...", root.display());
        let _ = fs::remove_dir_all(&root);
        for i in 0..20u64 {
            store_path(&store, &format!("runtime-{i}"), 1000 + i, 5_500_000, &words);
        }
        app(&store, 1, &words);
        app(&store, 2, &words);
        fs::write(root.join("done"), b"").unwrap();
    }
    let mut runtime = Vec::new();
    let mut apps = BTreeMap::new();
    for e in fs::read_dir(&store).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        match name.split_once("-app-") {
            Some((_, v)) => {
                apps.insert(v.to_owned(), p);
            }
            None => runtime.push(p),
        }
    }
    let (a1, a2) = (&apps["1.0"], &apps["2.0"]);
    let closure: u64 = runtime.iter().map(|p| tree_bytes(p)).sum::<u64>() + tree_bytes(a2);
    let mut v1 = runtime.clone();
    v1.push(a1.clone());
    let mut v2 = runtime.clone();
    v2.push(a2.clone());
    v1.sort();
    v2.sort();
    let at = |v: &[PathBuf], a: &PathBuf| v.iter().position(|p| p == a).unwrap_or(0) + 1;
    let (p1, sha1, t1) = pack(&v1, "1.0", &root.join("out1"));
    let (p2, sha2, t2) = pack(&v2, "2.0", &root.join("out2"));
    let old = fs::read(&p1).unwrap();
    let new = fs::read(&p2).unwrap();
    eprintln!("packed in {t1:.2} s and {t2:.2} s; sha256 {sha1} -> {sha2}");
    println!(
        "closure {:.1} MB (app {:.2} MB = {:.2} %), image 1.0 {:.1} MB, image 2.0 {:.1} MB",
        closure as f64 / 1e6,
        tree_bytes(a2) as f64 / 1e6,
        100.0 * tree_bytes(a2) as f64 / closure as f64,
        old.len() as f64 / 1e6,
        new.len() as f64 / 1e6
    );
    println!(
        "the app is store path {} of {} in 1.0, {} in 2.0",
        at(&v1, a1),
        v1.len(),
        at(&v2, a2)
    );
    println!();
    println!("| block | delta bytes | signature bytes | bytes sent | % of image | ops | diff s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let default = delta::block_size(old.len() as u64);
    for block in [4096, 8192, 16384, 32768] {
        let sig = delta::Signature::of_image(&old, &sha1, block);
        let t = Instant::now();
        let d = delta::diff(&sig, &new);
        let secs = t.elapsed().as_secs_f64();
        let script = host::apply_script("/d", "/b", "/o", &d.ops);
        let delta = script.len() as u64 + d.literal_bytes();
        // The new image's signature goes along, for the next upgrade.
        let signature = delta::Signature::of_image(&new, &sha2, block)
            .to_text()
            .len() as u64;
        let sent = delta + signature;
        println!(
            "| {}{} | {} | {} | {} | {:.2} | {} | {:.2} |",
            block,
            if block == default { " (default)" } else { "" },
            delta,
            signature,
            sent,
            100.0 * sent as f64 / new.len() as f64,
            d.ops.len(),
            secs
        );
    }
    let signature = delta::Signature::of_image(&new, &sha2, default)
        .to_text()
        .len() as u64;
    println!(
        "| full upload | | {signature} | {} | {:.2} | | |",
        new.len() as u64 + signature,
        100.0 * (new.len() as u64 + signature) as f64 / new.len() as f64
    );
}
