//! Writing the planned tree as a squashfs image with backhand.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backhand::{BackhandError, FilesystemWriter, NodeHeader};
use sha2::{Digest, Sha256};

use super::compress::{fs_compressor, with_codec, Codec, Compression, PACK_COMPRESSOR};
use super::error::ImageError;
use super::layout::{plan, Content, EntryKind, Layout};
use super::parallel::{verify_dups, with_pipeline, Stats};
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

/// File name of an image: `NAME_VERSION.raw`, or `NAME.raw` without a version.
pub fn image_file_name(name: &str, version: &str) -> String {
    if version.is_empty() {
        format!("{name}.raw")
    } else {
        format!("{name}_{version}.raw")
    }
}

/// Packs `spec` into `out_dir/NAME_VERSION.raw`.
///
/// The tree is planned and checked first ([`super::check_layout`]); the image
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
    let fc = fs_compressor(opts.compression, opts.level, opts.block_size)?;
    let layout = plan(spec)?;
    let file_name = image_file_name(&spec.name, &spec.version);
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
    let tracker = RefCell::new(Tracker {
        on_event,
        files_done: 0,
        bytes_done: 0,
        last: Instant::now(),
        failure: None,
    });

    let file = tmp.as_file().try_clone().map_err(write_err)?;
    let mut writer = ImageWriter::new(file);
    let codec = Codec {
        compression: opts.compression,
        level: opts.level.unwrap_or(opts.compression.default_level()),
        block_size: opts.block_size,
    };
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let (len, dups, stats) = if threads > 1 {
        let (result, dups, stats) = with_pipeline(&layout, codec, threads, || {
            with_codec(codec, || {
                write_layout(&layout, opts, fc, &tracker, &mut writer, &tmp_path)
            })
        });
        (result?, dups, stats)
    } else {
        let len = with_codec(codec, || {
            write_layout(&layout, opts, fc, &tracker, &mut writer, &tmp_path)
        })?;
        (len, Vec::new(), Stats::default())
    };
    let file = writer.into_file().map_err(write_err)?;
    // backhand may leave bytes after the end (a duplicate file written last).
    file.set_len(len).map_err(write_err)?;
    verify_dups(&tmp_path, &dups)?;
    let sha256 = hash_file(&file, len).map_err(write_err)?;
    file.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(write_err)?;
    drop(file);

    let mut tracker = tracker.into_inner();
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

/// Runs backhand over the layout; returns the length of the image.
fn write_layout(
    layout: &Layout,
    opts: &PackOptions,
    fc: backhand::FilesystemCompressor,
    tracker: &RefCell<Tracker<'_>>,
    writer: &mut ImageWriter,
    tmp_path: &Path,
) -> Result<u64, ImageError> {
    let mut fs = FilesystemWriter::default();
    fs.set_kind(backhand::kind::Kind::new_v4(&PACK_COMPRESSOR));
    fs.set_compressor(fc);
    fs.set_block_size(opts.block_size);
    fs.set_time(0);
    fs.set_only_root_id();
    fs.set_root_mode(0o755);
    fs.set_root_uid(0);
    fs.set_root_gid(0);

    let to_err = |e: BackhandError| ImageError::Writer(e.to_string());
    for (path, entry) in &layout.entries {
        let header = NodeHeader::new(entry.mode, 0, 0, 0);
        match &entry.kind {
            EntryKind::Dir => fs.push_dir(path, header).map_err(to_err)?,
            EntryKind::Symlink(target) => fs.push_symlink(target, path, header).map_err(to_err)?,
            EntryKind::File(content) => fs
                .push_file(TrackedReader::new(content, tracker), path, header)
                .map_err(to_err)?,
        }
    }

    let result = panic::catch_unwind(AssertUnwindSafe(|| fs.write(&mut *writer)));
    drop(fs);
    match result {
        Ok(Ok((_superblock, len))) => Ok(len),
        Ok(Err(e)) => {
            if let Some(failure) = tracker.borrow_mut().failure.take() {
                return Err(failure);
            }
            Err(match e {
                BackhandError::StdIo(source) => ImageError::Write {
                    path: tmp_path.to_owned(),
                    source,
                },
                other => ImageError::Writer(other.to_string()),
            })
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(ImageError::Writer(format!("backhand panicked: {msg}")))
        }
    }
}

/// Counts progress and remembers the first read failure (with its path).
pub(crate) struct Tracker<'e> {
    on_event: &'e mut dyn FnMut(PackEvent),
    files_done: u64,
    bytes_done: u64,
    last: Instant,
    failure: Option<ImageError>,
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

    fn fail(&mut self, err: ImageError) -> io::Error {
        let e = io::Error::other(err.to_string());
        self.failure.get_or_insert(err);
        e
    }
}

enum Source {
    Disk { path: PathBuf, file: Option<File> },
    Bytes(io::Cursor<Arc<[u8]>>),
}

/// A file's content for backhand: opened at the first read and closed at EOF
/// (so the write never holds more than one descriptor), counted for progress,
/// and checked against the size seen when the layout was planned.
pub(crate) struct TrackedReader<'t, 'e> {
    source: Source,
    expected: u64,
    read: u64,
    done: bool,
    tracker: &'t RefCell<Tracker<'e>>,
}

impl<'t, 'e> TrackedReader<'t, 'e> {
    fn new(content: &Content, tracker: &'t RefCell<Tracker<'e>>) -> Self {
        let source = match content {
            Content::Disk { path, .. } => Source::Disk {
                path: path.clone(),
                file: None,
            },
            Content::Bytes(b) => Source::Bytes(io::Cursor::new(b.clone())),
        };
        TrackedReader {
            source,
            expected: content.size(),
            read: 0,
            done: false,
            tracker,
        }
    }

    fn path(&self) -> PathBuf {
        match &self.source {
            Source::Disk { path, .. } => path.clone(),
            Source::Bytes(_) => PathBuf::from("<generated>"),
        }
    }
}

impl Read for TrackedReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = match &mut self.source {
            Source::Bytes(c) => c.read(buf)?,
            Source::Disk { path, file } => {
                if file.is_none() {
                    match File::open(&*path) {
                        Ok(f) => *file = Some(f),
                        Err(source) => {
                            let path = path.clone();
                            return Err(self
                                .tracker
                                .borrow_mut()
                                .fail(ImageError::Read { path, source }));
                        }
                    }
                }
                let f = file.as_mut().expect("opened above");
                match f.read(buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
                    Err(source) => {
                        let path = path.clone();
                        return Err(self
                            .tracker
                            .borrow_mut()
                            .fail(ImageError::Read { path, source }));
                    }
                }
            }
        };
        self.read += n as u64;
        if self.read > self.expected || (n == 0 && self.read != self.expected) {
            let err = ImageError::Changed {
                path: self.path(),
                expected: self.expected,
                actual: self.read,
            };
            return Err(self.tracker.borrow_mut().fail(err));
        }
        if n == 0 {
            self.done = true;
            if let Source::Disk { file, .. } = &mut self.source {
                *file = None;
            }
            self.tracker.borrow_mut().add(0, 1);
        } else {
            self.tracker.borrow_mut().add(n as u64, 0);
        }
        Ok(n)
    }
}

/// Buffered output that knows its position without a system call (backhand
/// asks for it all the time) and seeks for real only when told to move.
pub(crate) struct ImageWriter {
    inner: BufWriter<File>,
    pos: u64,
}

impl ImageWriter {
    pub(crate) fn new(file: File) -> Self {
        ImageWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            pos: 0,
        }
    }

    pub(crate) fn into_file(self) -> io::Result<File> {
        self.inner.into_inner().map_err(|e| e.into_error())
    }
}

impl Write for ImageWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Seek for ImageWriter {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Current(0) => return Ok(self.pos),
            SeekFrom::Start(p) if p == self.pos => return Ok(self.pos),
            other => other,
        };
        self.pos = self.inner.seek(target)?;
        Ok(self.pos)
    }

    fn stream_position(&mut self) -> io::Result<u64> {
        Ok(self.pos)
    }
}

/// sha256 of the first `len` bytes of `file`.
///
/// squashfs keeps its superblock in the first 96 bytes and backhand can only
/// fill it in at the very end, so the digest cannot be computed as the bytes
/// go out; the image is read back once (from the page cache).
fn hash_file(file: &File, len: u64) -> io::Result<String> {
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
