//! Writing the planned tree as a squashfs image: data compressed on all
//! cores, written in order, then the metadata.
//!
//! Three kinds of threads:
//!
//! - the *producer* reads the files in layout order, once each, and decides
//!   where each one goes: nowhere (empty), into the current fragment block
//!   (smaller than a block), data blocks, or the data of an earlier file with
//!   the same content (a hard link, or the same size and BLAKE3; small files
//!   included). It hands blocks to the workers and tells the writer, in
//!   order, what comes next;
//! - *workers* compress blocks (a full block of zeros becomes a hole);
//! - the *writer* (the calling thread) takes the results in that order,
//!   appends them to the image and notes where every file's data went. Then
//!   it writes the inode, directory, fragment and id tables and the
//!   superblock (see [`super::sqfs`]).
//!
//! The order of the bytes depends only on the layout and the file contents,
//! never on timing, so any number of threads gives the same image. Memory:
//! at most `threads` messages (a block each, or a batch of small files'
//! places) wait between producer and writer, besides the blocks being
//! compressed, the fragment block being filled and the metadata tables (a
//! few dozen bytes per entry). Block buffers go round in a [`Pool`].
//!
//! Copies are found by BLAKE3 (a cryptographic hash, so equal digests mean
//! equal bytes; about twice as fast as SHA-256 here, and this is the
//! reading thread's main work), computed from the bytes as they are read (so
//! a duplicate always matches what was written), only for files whose size
//! another file has (known from the layout); a data file whose size matches
//! an earlier one is hashed before its blocks are sent (read twice when it
//! is not a duplicate). Hard links are recognised by device and inode.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use super::compress::{compress_into, Codec};
use super::error::ImageError;
use super::layout::{Content, Entry, EntryKind, Layout};
use super::sqfs::{self, DirEntry, MetadataWriter, Placement, SuperBlock};

/// What the packer did, for tests and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Blocks compressed by the workers (data and fragment blocks).
    pub(crate) blocks: u64,
    /// Files whose data was found earlier in the image (hard links and copies).
    pub(crate) dup_files: u64,
    /// Time spent hashing the finished image (see `pack::hash_file`).
    pub(crate) hash_time: std::time::Duration,
}

/// A compressed block.
enum Block {
    /// A full block of zeros: nothing stored.
    Hole,
    /// Compressed bytes.
    Packed(Vec<u8>),
    /// Did not shrink: the bytes as they are.
    Stored(Vec<u8>),
}

type Output = Result<Block, String>;

/// What comes next in the image, in order. Every file gets one of `Empty`,
/// `Data`, `Fragment`, `Dup`; `Data { blocks: n }` is followed by `n`
/// `Block`s. `FragmentBlock`s come when a fragment block is full.
enum Msg {
    Empty,
    Data {
        blocks: usize,
    },
    Fragment {
        index: u32,
        offset: u32,
    },
    Dup {
        of: usize,
    },
    Block(Receiver<Output>),
    FragmentBlock(Receiver<Output>),
    Failed(ImageError),
    /// `Empty`, `Fragment` and `Dup` messages in a row: one message per
    /// small file made the writer and producer wake each other up for every
    /// file (about 10 % of the CPU time on a closure of small files).
    Batch(Vec<Msg>),
}

/// Most messages in a [`Msg::Batch`].
const BATCH: usize = 256;

/// Writes the image for `layout` into `file` (at its start); returns its
/// length (padded to 4 KiB) and statistics. `progress(bytes, files)` is
/// called as files are written.
pub(crate) fn write_image(
    layout: &Layout,
    codec: Codec,
    threads: usize,
    file: File,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(u64, Stats), ImageError> {
    let files: Vec<(&Path, &Content)> = layout
        .entries
        .iter()
        .filter_map(|(path, e)| match &e.kind {
            EntryKind::File(c) => Some((&**path, c)),
            _ => None,
        })
        .collect();
    let threads = threads.max(1);
    let mut out = Out {
        w: BufWriter::with_capacity(1 << 18, file),
        pos: 0,
        path,
    };

    let block_size = codec.block_size as usize;
    // Room for a block and for any compressor's worst case on it.
    let pool = Pool::new(block_size + block_size / 64 + 4096);
    let pool = &pool;

    std::thread::scope(|s| {
        type Job = (Vec<u8>, bool, SyncSender<Output>);
        let (work_tx, work_rx) = mpsc::channel::<Job>();
        let work_rx = Arc::new(Mutex::new(work_rx));
        for _ in 0..threads {
            let work_rx = Arc::clone(&work_rx);
            s.spawn(move || loop {
                let job = match work_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((input, may_be_hole, tx)) = job else {
                    return;
                };
                let _ = tx.send(compress(input, may_be_hole, &codec, pool));
            });
        }
        let (order_tx, order_rx) = mpsc::sync_channel::<Msg>(threads);
        let files_ref = &files;
        let producer = s.spawn(move || {
            let mut p = Producer {
                block_size,
                pool,
                work: work_tx,
                order: order_tx,
                fragment: pool.take(),
                fragments: 0,
                scratch: Vec::new(),
                by_inode: HashMap::new(),
                by_content: HashMap::new(),
                sizes: HashSet::new(),
                shared_sizes: shared_sizes(files_ref),
                batch: Vec::with_capacity(BATCH),
                stats: Stats::default(),
            };
            match p.run(files_ref) {
                Ok(()) => {}
                Err(Stop::Failed(e)) => {
                    let _ = p.order.send(Msg::Failed(e));
                }
                Err(Stop::Gone) => {}
            }
            p.stats
        });

        let (placements, fragments) =
            write_data(&mut out, &files, order_rx, codec, pool, progress)?;
        let stats = producer
            .join()
            .map_err(|_| ImageError::Writer("the file reader thread panicked".into()))?;
        let len = write_metadata(&mut out, layout, &placements, &fragments, &codec)?;
        Ok((len, stats))
    })
}

fn compress(input: Vec<u8>, may_be_hole: bool, codec: &Codec, pool: &Pool) -> Output {
    if may_be_hole && input.iter().all(|b| *b == 0) {
        pool.give(input);
        return Ok(Block::Hole);
    }
    let mut packed = pool.take();
    compress_into(&input, codec, &mut packed).map_err(|e| e.to_string())?;
    Ok(if packed.len() < input.len() {
        pool.give(input);
        Block::Packed(packed)
    } else {
        pool.give(packed);
        Block::Stored(input)
    })
}

/// Block buffers, given back once written (or compressed) and taken again
/// for the next block, so a few allocations serve the whole image. A fresh
/// 1 MiB buffer per block left glibc's per-thread heaps fragmented: about
/// 6 MB more peak memory with xz.
struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    capacity: usize,
}

impl Pool {
    fn new(capacity: usize) -> Self {
        Pool {
            free: Mutex::new(Vec::new()),
            capacity,
        }
    }

    /// An empty buffer with room for a block.
    fn take(&self) -> Vec<u8> {
        let reused = self.free.lock().ok().and_then(|mut free| free.pop());
        reused.unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        if let Ok(mut free) = self.free.lock() {
            free.push(buf);
        }
    }
}

/// The image file, buffered, with its position.
struct Out<'p> {
    w: BufWriter<File>,
    pos: u64,
    path: &'p Path,
}

impl Out<'_> {
    fn err(&self, source: io::Error) -> ImageError {
        ImageError::Write {
            path: self.path.to_owned(),
            source,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.w.write_all(bytes).map_err(|e| self.err(e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }
}

/// Takes the producer's messages in order and writes the blocks; returns
/// where every file's data is, and the fragment table entries.
fn write_data(
    out: &mut Out<'_>,
    files: &[(&Path, &Content)],
    order: Receiver<Msg>,
    codec: Codec,
    pool: &Pool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Vec<Placement>, Vec<u8>), ImageError> {
    // Superblock (filled in at the end) and compressor options.
    out.write(&[0u8; sqfs::SUPERBLOCK_SIZE])?;
    out.write(&sqfs::compressor_options_block(&codec))?;

    let mut placements: Vec<Placement> = Vec::with_capacity(files.len());
    // The file whose blocks are coming: start, sizes so far, blocks left.
    let mut current: Option<(u64, Vec<u32>, usize)> = None;
    let mut fragment_table = Vec::new();
    // Bytes of the current file already reported, so a large file moves the
    // progress bar block by block instead of jumping at its end.
    let mut reported = 0u64;
    let lost = || ImageError::Writer("a compression thread stopped".into());
    // Batches unpacked in place; `Vec::new()` allocates nothing.
    let messages = order.into_iter().flat_map(|msg| match msg {
        Msg::Batch(batch) => batch.into_iter().chain(None),
        msg => Vec::new().into_iter().chain(Some(msg)),
    });
    for msg in messages {
        let placed = match msg {
            Msg::Failed(e) => return Err(e),
            Msg::Batch(_) => return Err(ImageError::Writer("a batch in a batch".into())),
            Msg::Empty => Placement::Empty,
            Msg::Fragment { index, offset } => Placement::Fragment { index, offset },
            Msg::Dup { of } => placements
                .get(of)
                .cloned()
                .ok_or_else(|| ImageError::Writer("duplicate of a file not written".into()))?,
            Msg::Data { blocks } => {
                current = Some((out.pos, Vec::with_capacity(blocks), blocks));
                continue;
            }
            Msg::FragmentBlock(rx) => {
                let start = out.pos;
                let size = write_block(out, rx.recv().map_err(|_| lost())?, pool)?;
                fragment_table.extend_from_slice(&sqfs::fragment_entry(start, size));
                continue;
            }
            Msg::Block(rx) => {
                let size = write_block(out, rx.recv().map_err(|_| lost())?, pool)?;
                let Some((start, mut sizes, left)) = current.take() else {
                    return Err(ImageError::Writer("a block outside of a file".into()));
                };
                sizes.push(size);
                if left > 1 {
                    current = Some((start, sizes, left - 1));
                    reported += u64::from(codec.block_size);
                    progress(u64::from(codec.block_size), 0);
                    continue;
                }
                Placement::Blocks { start, sizes }
            }
        };
        let Some((_, content)) = files.get(placements.len()) else {
            return Err(ImageError::Writer("more files than planned".into()));
        };
        progress(content.size().saturating_sub(reported), 1);
        reported = 0;
        placements.push(placed);
    }
    if placements.len() != files.len() || current.is_some() {
        return Err(ImageError::Writer("the file reader stopped early".into()));
    }
    Ok((placements, fragment_table))
}

/// Writes one compressed block and gives its buffer back; returns its size word.
fn write_block(out: &mut Out<'_>, block: Output, pool: &Pool) -> Result<u32, ImageError> {
    let (bytes, size) = match block.map_err(ImageError::Writer)? {
        Block::Hole => return Ok(0),
        Block::Packed(b) => {
            let size = b.len() as u32;
            (b, size)
        }
        Block::Stored(b) => {
            let size = b.len() as u32 | sqfs::DATA_UNCOMPRESSED;
            (b, size)
        }
    };
    out.write(&bytes)?;
    pool.give(bytes);
    Ok(size)
}

/// A node of the tree, for the inode and directory tables.
struct Node<'l> {
    name: &'l [u8],
    entry: Option<&'l Entry>,
    parent: usize,
    children: Vec<usize>,
    /// Index among the regular files, for files.
    file: usize,
}

/// Writes the inode, directory, fragment and id tables, the padding and the
/// superblock; returns the image length.
fn write_metadata(
    out: &mut Out<'_>,
    layout: &Layout,
    placements: &[Placement],
    fragments: &[u8],
    codec: &Codec,
) -> Result<u64, ImageError> {
    // Nodes in layout order (parents first, siblings by name); the root is 0.
    let mut nodes = vec![Node {
        name: b"",
        entry: None,
        parent: 0,
        children: Vec::new(),
        file: 0,
    }];
    let mut dirs: HashMap<&Path, usize> = HashMap::new();
    dirs.insert(Path::new("/"), 0);
    let mut file_count = 0;
    for (path, entry) in &layout.entries {
        let parent = path
            .parent()
            .and_then(|p| dirs.get(p).copied())
            .ok_or_else(|| ImageError::Writer(format!("no parent for {}", path.display())))?;
        let id = nodes.len();
        let name = path.file_name().map_or(&b""[..], OsStr::as_bytes);
        let file = match entry.kind {
            EntryKind::File(_) => {
                file_count += 1;
                file_count - 1
            }
            EntryKind::Dir => {
                dirs.insert(&**path, id);
                0
            }
            EntryKind::Symlink(_) => 0,
        };
        nodes.push(Node {
            name,
            entry: Some(entry),
            parent,
            children: Vec::new(),
            file,
        });
        nodes[parent].children.push(id);
    }
    if file_count != placements.len() {
        return Err(ImageError::Writer("file count mismatch".into()));
    }

    let mut t = Tables {
        nodes: &nodes,
        placements,
        inodes: MetadataWriter::new(codec),
        dirs: MetadataWriter::new(codec),
        block_size: codec.block_size,
        buf: Vec::with_capacity(256),
    };
    let root = t.write_node(0)?;
    let Tables { inodes, dirs, .. } = t;

    let mut sb = SuperBlock {
        inode_count: nodes.len() as u32,
        root_inode: ((root.0 as u64) << 16) | root.1 as u64,
        ..SuperBlock::default()
    };
    sb.inode_table = out.pos;
    out.write(&inodes.finish()?)?;
    sb.dir_table = out.pos;
    out.write(&dirs.finish()?)?;
    sb.fragment_count = (fragments.len() / 16) as u32;
    let (bytes, index) = sqfs::lookup_table(fragments, out.pos, codec)?;
    sb.fragment_table = out.pos + index;
    out.write(&bytes)?;
    let (bytes, index) = sqfs::lookup_table(&0u32.to_le_bytes(), out.pos, codec)?;
    sb.id_table = out.pos + index;
    out.write(&bytes)?;
    sb.bytes_used = out.pos;
    // Pad to 4 KiB like mksquashfs (block devices and loop mounts want it).
    let pad = (4096 - out.pos % 4096) % 4096;
    out.write(&vec![0u8; pad as usize])?;
    let len = out.pos;

    let e = |source| ImageError::Write {
        path: out.path.to_owned(),
        source,
    };
    out.w.seek(SeekFrom::Start(0)).map_err(e)?;
    out.w.write_all(&sb.to_bytes(codec)).map_err(e)?;
    out.w.flush().map_err(e)?;
    Ok(len)
}

struct Tables<'n, 'l, 'c> {
    nodes: &'n [Node<'l>],
    placements: &'n [Placement],
    inodes: MetadataWriter<'c>,
    dirs: MetadataWriter<'c>,
    block_size: u32,
    buf: Vec<u8>,
}

impl Tables<'_, '_, '_> {
    /// Writes the inode of node `id` (children first, for a directory) and
    /// returns where it is. Inode numbers are node index + 1.
    fn write_node(&mut self, id: usize) -> Result<(u32, u16), ImageError> {
        let node = &self.nodes[id];
        let number = id as u32 + 1;
        let mode = node.entry.map_or(0o755, |e| e.mode);
        let kind = node.entry.map_or(&EntryKind::Dir, |e| &e.kind);
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        match kind {
            EntryKind::File(content) => {
                let place = &self.placements[node.file];
                sqfs::file_inode(&mut b, mode, number, content.size(), place, self.block_size);
            }
            EntryKind::Symlink(target) => {
                sqfs::symlink_inode(&mut b, mode, number, target.as_os_str().as_bytes());
            }
            EntryKind::Dir => {
                let mut entries = Vec::with_capacity(node.children.len());
                let mut subdirs = 0;
                for &c in &node.children {
                    let child = &self.nodes[c];
                    let kind = match child.entry.map(|e| &e.kind) {
                        Some(EntryKind::File(_)) => sqfs::TYPE_FILE,
                        Some(EntryKind::Symlink(_)) => sqfs::TYPE_SYMLINK,
                        _ => {
                            subdirs += 1;
                            sqfs::TYPE_DIR
                        }
                    };
                    if child.name.is_empty() || child.name.len() > 256 {
                        return Err(ImageError::Writer("bad file name length".into()));
                    }
                    entries.push(DirEntry {
                        name: child.name,
                        inode: self.write_node(c)?,
                        number: c as u32 + 1,
                        kind,
                    });
                }
                let listing = sqfs::dir_listing(&entries);
                let at = self.dirs.position();
                self.dirs.write(&listing)?;
                let parent = if id == 0 {
                    self.nodes.len() as u32 + 1
                } else {
                    node.parent as u32 + 1
                };
                sqfs::dir_inode(&mut b, mode, number, 2 + subdirs, at, listing.len(), parent);
            }
        }
        let at = self.inodes.position();
        self.inodes.write(&b)?;
        self.buf = b;
        Ok(at)
    }
}

/// Why the producer stopped early.
enum Stop {
    /// A file could not be read, or changed: tell the writer.
    Failed(ImageError),
    /// The writer is gone (it failed): nothing to say.
    Gone,
}

struct Producer<'p> {
    block_size: usize,
    pool: &'p Pool,
    work: mpsc::Sender<(Vec<u8>, bool, SyncSender<Output>)>,
    order: SyncSender<Msg>,
    fragment: Vec<u8>,
    fragments: u32,
    scratch: Vec<u8>,
    by_inode: HashMap<(u64, u64), usize>,
    by_content: HashMap<(u64, [u8; 32]), usize>,
    /// Sizes of the data files (one block or more) in `by_content`.
    sizes: HashSet<u64>,
    /// Sizes that more than one distinct file has: only those files can be
    /// copies of each other, and only they are hashed.
    shared_sizes: HashSet<u64>,
    /// Messages for the next [`Msg::Batch`].
    batch: Vec<Msg>,
    stats: Stats,
}

/// The sizes shared by files that are not hard links of each other.
fn shared_sizes(files: &[(&Path, &Content)]) -> HashSet<u64> {
    let mut first: HashMap<u64, Option<(u64, u64)>> = HashMap::new();
    let mut shared = HashSet::new();
    for (_, content) in files {
        let id = match content {
            Content::Disk { dev, ino, .. } => Some((*dev, *ino)),
            Content::Bytes(_) => None,
        };
        match first.get(&content.size()) {
            None => {
                first.insert(content.size(), id);
            }
            Some(seen) if seen.is_none() || *seen != id => {
                shared.insert(content.size());
            }
            Some(_) => {}
        }
    }
    shared
}

impl Producer<'_> {
    fn send(&mut self, msg: Msg) -> Result<(), Stop> {
        match msg {
            Msg::Empty | Msg::Fragment { .. } | Msg::Dup { .. } => {
                self.batch.push(msg);
                if self.batch.len() < BATCH {
                    return Ok(());
                }
                self.flush_batch()
            }
            msg => {
                self.flush_batch()?;
                self.order.send(msg).map_err(|_| Stop::Gone)
            }
        }
    }

    fn flush_batch(&mut self) -> Result<(), Stop> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        self.order.send(Msg::Batch(batch)).map_err(|_| Stop::Gone)
    }

    fn compress(&mut self, block: Vec<u8>, may_be_hole: bool) -> Result<Receiver<Output>, Stop> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.work
            .send((block, may_be_hole, tx))
            .map_err(|_| Stop::Gone)?;
        self.stats.blocks += 1;
        Ok(rx)
    }

    fn flush_fragment(&mut self) -> Result<(), Stop> {
        let block = std::mem::replace(&mut self.fragment, self.pool.take());
        let rx = self.compress(block, false)?;
        self.fragments += 1;
        self.send(Msg::FragmentBlock(rx))
    }

    fn run(&mut self, files: &[(&Path, &Content)]) -> Result<(), Stop> {
        for (i, (_, content)) in files.iter().enumerate() {
            let size = content.size();
            let inode = match content {
                Content::Disk { dev, ino, .. } => Some((*dev, *ino)),
                Content::Bytes(_) => None,
            };
            if size == 0 {
                self.send(Msg::Empty)?;
                continue;
            }
            if let Some(&of) = inode.and_then(|k| self.by_inode.get(&k)) {
                self.stats.dup_files += 1;
                self.send(Msg::Dup { of })?;
                continue;
            }
            let msg = if size < self.block_size as u64 {
                self.small_file(i, content)?
            } else {
                self.data_file(i, content)?
            };
            if let Some(k) = inode {
                let first = match msg {
                    Msg::Dup { of } => of,
                    _ => i,
                };
                self.by_inode.insert(k, first);
            }
            if !matches!(msg, Msg::Data { .. }) {
                self.send(msg)?;
            }
        }
        if !self.fragment.is_empty() {
            self.flush_fragment()?;
        }
        self.flush_batch()
    }

    /// A file smaller than a block: a duplicate, or appended to the fragment block.
    fn small_file(&mut self, i: usize, content: &Content) -> Result<Msg, Stop> {
        let size = content.size();
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let mut r = Reader::open(content)?;
        r.read_exact_len(&mut buf, size as usize)?;
        r.expect_eof()?;
        let key = if self.shared_sizes.contains(&size) {
            let key = (size, *blake3::hash(&buf).as_bytes());
            if let Some(&of) = self.by_content.get(&key) {
                self.stats.dup_files += 1;
                self.scratch = buf;
                return Ok(Msg::Dup { of });
            }
            Some(key)
        } else {
            None
        };
        if self.fragment.len() + buf.len() > self.block_size {
            self.flush_fragment()?;
        }
        let offset = self.fragment.len() as u32;
        self.fragment.extend_from_slice(&buf);
        self.scratch = buf;
        if let Some(key) = key {
            self.by_content.insert(key, i);
        }
        Ok(Msg::Fragment {
            index: self.fragments,
            offset,
        })
    }

    /// A file of a block or more: a duplicate, or its blocks sent to the
    /// workers (returns `Msg::Data`, already sent).
    fn data_file(&mut self, i: usize, content: &Content) -> Result<Msg, Stop> {
        let size = content.size();
        let known = if self.sizes.contains(&size) {
            let sha = digest(content)?;
            if let Some(&of) = self.by_content.get(&(size, sha)) {
                self.stats.dup_files += 1;
                return Ok(Msg::Dup { of });
            }
            Some(sha)
        } else {
            None
        };
        let bs = self.block_size as u64;
        let blocks = size.div_ceil(bs) as usize;
        self.send(Msg::Data { blocks })?;
        let mut r = Reader::open(content)?;
        let mut hasher = self.shared_sizes.contains(&size).then(blake3::Hasher::new);
        let mut left = size;
        while left > 0 {
            let n = left.min(bs) as usize;
            let mut block = self.pool.take();
            r.read_exact_len(&mut block, n)?;
            if let Some(h) = &mut hasher {
                h.update(&block);
            }
            left -= n as u64;
            let rx = self.compress(block, n == self.block_size)?;
            self.send(Msg::Block(rx))?;
        }
        r.expect_eof()?;
        if let Some(h) = hasher {
            let sha: [u8; 32] = h.finalize().into();
            if known.is_some_and(|k| k != sha) {
                return Err(Stop::Failed(ImageError::Unstable { path: r.path() }));
            }
            self.by_content.insert((size, sha), i);
            self.sizes.insert(size);
        }
        Ok(Msg::Data { blocks })
    }
}

/// A file's content, read with checks: it must have the size seen when the
/// layout was planned.
struct Reader<'c> {
    content: &'c Content,
    source: Box<dyn Read + 'c>,
    read: u64,
}

impl<'c> Reader<'c> {
    fn open(content: &'c Content) -> Result<Self, Stop> {
        let source: Box<dyn Read + 'c> = match content {
            Content::Disk { path, .. } => Box::new(File::open(path).map_err(|source| {
                Stop::Failed(ImageError::Read {
                    path: path.clone(),
                    source,
                })
            })?),
            Content::Bytes(b) => Box::new(io::Cursor::new(&b[..])),
        };
        Ok(Reader {
            content,
            source,
            read: 0,
        })
    }

    fn path(&self) -> PathBuf {
        match self.content {
            Content::Disk { path, .. } => path.clone(),
            Content::Bytes(_) => PathBuf::from("<generated>"),
        }
    }

    fn fail(&self, source: io::Error) -> Stop {
        Stop::Failed(ImageError::Read {
            path: self.path(),
            source,
        })
    }

    fn changed(&self, actual: u64) -> Stop {
        Stop::Failed(ImageError::Changed {
            path: self.path(),
            expected: self.content.size(),
            actual,
        })
    }

    /// Appends exactly `n` bytes to `buf`.
    fn read_exact_len(&mut self, buf: &mut Vec<u8>, n: usize) -> Result<(), Stop> {
        let want = buf.len() + n;
        buf.reserve(n);
        while buf.len() < want {
            let got = match (&mut self.source)
                .take((want - buf.len()) as u64)
                .read_to_end(buf)
            {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.fail(e)),
            };
            self.read += got as u64;
            if got == 0 {
                return Err(self.changed(self.read));
            }
        }
        Ok(())
    }

    /// Checks that the file has no more bytes.
    fn expect_eof(&mut self) -> Result<(), Stop> {
        let mut more = [0u8; 4096];
        loop {
            match self.source.read(&mut more) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    let actual = self.read + n as u64;
                    return Err(self.changed(actual));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.fail(e)),
            }
        }
    }
}

fn digest(content: &Content) -> Result<[u8; 32], Stop> {
    let mut r = Reader::open(content)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match r.source.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(r.fail(e)),
        };
        if n == 0 {
            break;
        }
        r.read += n as u64;
        h.update(&buf[..n]);
    }
    if r.read != content.size() {
        return Err(r.changed(r.read));
    }
    Ok(h.finalize().into())
}
