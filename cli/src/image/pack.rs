//! Packing: plan, write to a temporary file, hash, rename into place.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::compress::{check_level, Codec, Compression};
use super::error::ImageError;
use super::layout::plan;
use super::manifest::Manifest;
use super::writer::{write_image, Stats};
use crate::names::ImageFile;
use crate::spec::ImageSpec;

/// How to pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackOptions {
    pub compression: Compression,
    /// Compression level; `None` is the compressor's default (zstd 3, xz 6, gzip 9).
    pub level: Option<u32>,
    /// Data block size in bytes: a power of two from 4 KiB to 1 MiB.
    pub block_size: u32,
    /// Compression threads; 0 means one per core. The image is the same
    /// byte for byte whatever the number.
    pub threads: usize,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            compression: Compression::Zstd,
            level: None,
            block_size: 1 << 20,
            threads: 0,
        }
    }
}

/// A packed image in the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `OUT_DIR/NAME_VERSION.raw`
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    /// sha256 of the whole file, lower-case hex (what `sha256sum` prints).
    pub sha256: String,
    /// File size in bytes.
    pub size: u64,
    /// What the image holds (written into it too).
    pub manifest: Manifest,
}

/// Progress of [`pack`], for a progress bar. `Progress` comes at most every
/// few milliseconds; counts only grow; `bytes` are uncompressed input bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackEvent {
    Started { files: u64, bytes: u64 },
    Progress { files_done: u64, bytes_done: u64 },
    Finished,
}

const PROGRESS_EVERY: Duration = Duration::from_millis(4);

/// Packs `spec` into `out_dir/NAME_VERSION.raw`.
///
/// The tree is planned and checked first (`check_layout`); the image
/// is written to a temporary file in `out_dir` and renamed into place only
/// when complete, so `out_dir` never holds a half-written image. The same
/// spec and options give the same bytes on any machine.
pub fn pack(
    spec: &ImageSpec,
    opts: &PackOptions,
    out_dir: &Path,
    on_event: &mut dyn FnMut(PackEvent),
) -> Result<Image, ImageError> {
    pack_with_stats(spec, opts, out_dir, on_event).map(|(image, _)| image)
}

/// [`pack`], also telling what the compression pipeline did.
pub(crate) fn pack_with_stats(
    spec: &ImageSpec,
    opts: &PackOptions,
    out_dir: &Path,
    on_event: &mut dyn FnMut(PackEvent),
) -> Result<(Image, Stats), ImageError> {
    check_block_size(opts.block_size)?;
    let level = check_level(opts.compression, opts.level)?;
    let mut layout = plan(spec)?;
    let manifest = layout
        .manifest
        .take()
        .ok_or_else(|| ImageError::Writer("the layout has no manifest".into()))?;
    let file_name = ImageFile::new(&spec.name, &spec.version).file_name();
    let dest = out_dir.join(&file_name);

    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(out_dir)
        .map_err(|source| ImageError::Write {
            path: out_dir.to_owned(),
            source,
        })?;
    let tmp_path = tmp.path().to_owned();
    let write_err = |source| ImageError::Write {
        path: tmp_path.clone(),
        source,
    };

    on_event(PackEvent::Started {
        files: layout.files,
        bytes: layout.bytes,
    });
    let mut tracker = Tracker {
        on_event,
        files_done: 0,
        bytes_done: 0,
        last: Instant::now(),
    };

    let file = tmp.as_file().try_clone().map_err(write_err)?;
    let codec = Codec {
        compression: opts.compression,
        level,
        block_size: opts.block_size,
    };
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let (len, mut stats) = write_image(&layout, codec, threads, file, &tmp_path, &mut |b, f| {
        tracker.add(b, f)
    })?;
    let file = tmp.as_file();
    file.set_len(len).map_err(write_err)?;
    let hashing = Instant::now();
    let sha256 = hash_file(file, len).map_err(write_err)?;
    stats.hash_time = hashing.elapsed();
    file.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(write_err)?;

    tracker.emit();
    (tracker.on_event)(PackEvent::Finished);

    tmp.persist(&dest).map_err(|e| ImageError::Write {
        path: dest.clone(),
        source: e.error,
    })?;
    let image = Image {
        path: dest,
        name: spec.name.clone(),
        version: spec.version.clone(),
        sha256,
        size: len,
        manifest,
    };
    Ok((image, stats))
}

pub(crate) fn check_block_size(block_size: u32) -> Result<(), ImageError> {
    if !(4096..=1 << 20).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(ImageError::BadOptions(format!(
            "block size {block_size} must be a power of two from 4096 (4K) to 1048576 (1M)"
        )));
    }
    Ok(())
}

/// Counts progress and sends events at most every [`PROGRESS_EVERY`].
struct Tracker<'e> {
    on_event: &'e mut dyn FnMut(PackEvent),
    files_done: u64,
    bytes_done: u64,
    last: Instant,
}

impl Tracker<'_> {
    fn emit(&mut self) {
        (self.on_event)(PackEvent::Progress {
            files_done: self.files_done,
            bytes_done: self.bytes_done,
        });
        self.last = Instant::now();
    }

    fn add(&mut self, bytes: u64, files: u64) {
        self.bytes_done += bytes;
        self.files_done += files;
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.emit();
        }
    }
}

/// sha256 of the first `len` bytes of `file`.
///
/// squashfs keeps its superblock in the first 96 bytes, and what it says
/// (where the tables are) is known only once everything else is written, so
/// the digest cannot be computed as the bytes go out: SHA-256 cannot take a
/// prefix afterwards. The image is read back once, from the page cache
/// (about 30 ms for a 40 MB image).
pub(crate) fn hash_file(file: &File, len: u64) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let want = ((len - off) as usize).min(buf.len());
        let n = file.read_at(&mut buf[..want], off)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "image shorter than written",
            ));
        }
        hasher.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}
