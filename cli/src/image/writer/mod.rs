//! Writing the planned tree as a squashfs image: data compressed on all
//! cores, written in order, then the metadata.
//!
//! Three kinds of threads:
//!
//! - the *producer* ([`producer`]) reads the files in layout order, once
//!   each, and decides where each one goes: nowhere (empty), into the
//!   current fragment block (smaller than a block), data blocks, or the data
//!   of an earlier file with the same content (a hard link, or the same size
//!   and BLAKE3; small files included). It hands blocks to the workers and
//!   tells the writer, in order, what comes next;
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

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use super::compress::{compress_into, Codec};
use super::error::ImageError;
use super::layout::{Content, Entry, EntryKind, Layout};
use super::sqfs::{self, DirEntry, MetadataWriter, Placement, SuperBlock};

mod producer;

use producer::produce;

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

/// A block for a worker to compress: the bytes, whether it may be a hole,
/// and where the result goes.
type Job = (Vec<u8>, bool, SyncSender<Output>);

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
        let producer = s.spawn(move || produce(files_ref, block_size, pool, work_tx, order_tx));

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
