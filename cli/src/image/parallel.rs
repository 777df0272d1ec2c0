//! Compressing data blocks on all cores, ahead of backhand's single-threaded writer.
//!
//! backhand reads the files in path order and calls the compressor once per
//! data block and once per fragment block, always in the same order. A
//! *producer* thread walks the same files in the same order, cuts them the
//! same way (full blocks, zero blocks left out, small files packed into
//! fragment blocks), and hands each block to a pool of workers. The results
//! queue up in order; when backhand asks for a block, [`take_ahead`] checks
//! that the bytes are the ones that were compressed (a `memcmp`) and returns
//! the result. Any difference (a file changed under us) switches to
//! compressing on the writer's thread for the rest of the image, so the
//! output is always the single-threaded output, byte for byte.
//!
//! Duplicates are found before compressing: a data file (one block or more)
//! that is a hard link of an earlier one, or has its size and sha256, is not
//! read by the producer; backhand still reads it, finds it equal (xxh64) and
//! points at the first copy. Its blocks are answered with an empty result, so
//! nothing is written for them. [`verify_dups`] checks afterwards in the
//! image's inode table that backhand did dedup every such file.
//!
//! Memory: the ordered queue holds at most `4 × threads` blocks (input and
//! output), plus one fragment block in the producer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use backhand::{BackhandError, FilesystemReader, InnerNode};
use sha2::{Digest, Sha256};

use super::compress::{compress_block, Codec};
use super::error::ImageError;
use super::layout::{Content, EntryKind, Layout};

type Output = Result<Vec<u8>, String>;

/// A block in the order backhand will ask for it.
enum Ahead {
    /// Compressed by a worker: `input` is kept to check the match.
    Block {
        input: Arc<Vec<u8>>,
        output: Receiver<Output>,
    },
    /// A block of a duplicate file: nothing is written for it.
    Dup { len: usize },
}

/// The writer thread's end of the pipeline.
struct Consumer {
    queue: Option<Receiver<Ahead>>,
    taken: u64,
    diverged: bool,
}

thread_local! {
    static CONSUMER: RefCell<Option<Consumer>> = const { RefCell::new(None) };
}

/// What the pipeline did, for tests and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Blocks handed to backhand from the pipeline.
    pub(crate) taken: u64,
    /// Data files recognised as duplicates before compressing them.
    pub(crate) dup_files: u64,
    /// The pipeline fell out of step (a file changed) and was abandoned.
    pub(crate) diverged: bool,
}

/// Called by the compressor hook: the result for `bytes` if the pipeline has
/// it, `None` to compress on this thread.
pub(crate) fn take_ahead(bytes: &[u8]) -> Option<Result<Vec<u8>, BackhandError>> {
    CONSUMER.with(|cell| {
        let mut guard = cell.borrow_mut();
        let c = guard.as_mut()?;
        if c.diverged {
            return None;
        }
        let next = match c.queue.as_ref()?.recv() {
            Ok(next) => next,
            Err(_) => {
                // Producer finished: the rest (metadata) is compressed here.
                c.queue = None;
                return None;
            }
        };
        let result = match next {
            Ahead::Block { input, output } if input.as_slice() == bytes => match output.recv() {
                Ok(Ok(out)) => Some(Ok(out)),
                Ok(Err(e)) => Some(Err(BackhandError::StdIo(io::Error::other(e)))),
                Err(_) => None,
            },
            Ahead::Dup { len } if len == bytes.len() => Some(Ok(Vec::new())),
            _ => None,
        };
        match result {
            Some(r) => {
                c.taken += 1;
                Some(r)
            }
            None => {
                c.diverged = true;
                c.queue = None;
                None
            }
        }
    })
}

/// A duplicate data file: `dup` must end up pointing at `orig`'s blocks.
#[derive(Debug, Clone)]
pub(crate) struct DupPair {
    pub(crate) dup: PathBuf,
    pub(crate) orig: PathBuf,
}

/// Runs `body` (backhand's write, on this thread) with `threads` workers
/// compressing ahead of it. Returns what `body` returned, the duplicate files
/// whose blocks were skipped, and statistics.
pub(crate) fn with_pipeline<R>(
    layout: &Layout,
    codec: Codec,
    threads: usize,
    body: impl FnOnce() -> R,
) -> (R, Vec<DupPair>, Stats) {
    let files: Vec<(&Path, &Content)> = layout
        .entries
        .iter()
        .filter_map(|(path, e)| match &e.kind {
            EntryKind::File(c) => Some((path.as_path(), c)),
            _ => None,
        })
        .collect();
    let depth = 4 * threads.max(1);

    std::thread::scope(|s| {
        let (work_tx, work_rx) = mpsc::channel::<(Arc<Vec<u8>>, SyncSender<Output>)>();
        let work_rx = Arc::new(Mutex::new(work_rx));
        for _ in 0..threads.max(1) {
            let work_rx = Arc::clone(&work_rx);
            s.spawn(move || loop {
                let job = match work_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((input, tx)) = job else { return };
                let out = compress_block(&input, &codec).map_err(|e| e.to_string());
                let _ = tx.send(out);
            });
        }
        let (order_tx, order_rx) = mpsc::sync_channel::<Ahead>(depth);
        let producer = s.spawn(move || {
            let mut p = Producer {
                block_size: codec.block_size as usize,
                work: work_tx,
                order: order_tx,
                frag: Vec::with_capacity(codec.block_size as usize),
                origs: Vec::new(),
                by_inode: HashMap::new(),
                by_size: HashMap::new(),
                dups: Vec::new(),
            };
            // An error only stops the look-ahead; backhand meets it itself.
            let _ = p.run(&files);
            p.dups
        });

        CONSUMER.with(|cell| {
            *cell.borrow_mut() = Some(Consumer {
                queue: Some(order_rx),
                taken: 0,
                diverged: false,
            })
        });
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                CONSUMER.with(|cell| cell.borrow_mut().take());
            }
        }
        let reset = Reset;
        let result = body();
        let consumer = CONSUMER.with(|cell| cell.borrow_mut().take());
        drop(reset);
        // Dropping the consumer's queue stops a producer that is still ahead.
        let (taken, diverged) = consumer.map_or((0, true), |c| (c.taken, c.diverged));
        let dups = producer.join().unwrap_or_default();
        let stats = Stats {
            taken,
            dup_files: dups.len() as u64,
            diverged,
        };
        (result, dups, stats)
    })
}

struct Orig {
    image_path: PathBuf,
    content: Content,
    /// Lengths of the blocks backhand compresses (zero blocks left out).
    blocks: Vec<usize>,
    sha256: Option<[u8; 32]>,
}

struct Producer {
    block_size: usize,
    work: mpsc::Sender<(Arc<Vec<u8>>, SyncSender<Output>)>,
    order: SyncSender<Ahead>,
    frag: Vec<u8>,
    origs: Vec<Orig>,
    by_inode: HashMap<(u64, u64), usize>,
    by_size: HashMap<u64, Vec<usize>>,
    dups: Vec<DupPair>,
}

/// The consumer went away (the write ended or diverged): stop quietly.
struct Stop;

impl From<io::Error> for Stop {
    fn from(_: io::Error) -> Self {
        Stop
    }
}

impl Producer {
    fn run(&mut self, files: &[(&Path, &Content)]) -> Result<(), Stop> {
        for (path, content) in files {
            let size = content.size() as usize;
            if size == 0 {
                continue;
            }
            if size < self.block_size {
                // backhand: a fragment; flush the fragment block when it would overflow.
                if self.frag.len() + size > self.block_size {
                    let block =
                        std::mem::replace(&mut self.frag, Vec::with_capacity(self.block_size));
                    self.compress(block)?;
                }
                let mut r = open(content)?;
                let start = self.frag.len();
                (&mut r).take(size as u64).read_to_end(&mut self.frag)?;
                if self.frag.len() - start != size {
                    return Err(Stop);
                }
                continue;
            }
            let (dup, sha) = self.find_dup(content)?;
            if let Some(orig) = dup {
                for &len in &self.origs[orig].blocks {
                    self.order.send(Ahead::Dup { len }).map_err(|_| Stop)?;
                }
                self.dups.push(DupPair {
                    dup: path.to_path_buf(),
                    orig: self.origs[orig].image_path.clone(),
                });
                continue;
            }
            let mut blocks = Vec::new();
            let mut r = open(content)?;
            loop {
                let mut chunk = Vec::with_capacity(self.block_size);
                (&mut r)
                    .take(self.block_size as u64)
                    .read_to_end(&mut chunk)?;
                if chunk.is_empty() {
                    break;
                }
                let full = chunk.len() == self.block_size;
                if !chunk.iter().all(|b| *b == 0) {
                    blocks.push(chunk.len());
                    self.compress(chunk)?;
                }
                if !full {
                    break;
                }
            }
            self.add_orig(path, content, blocks, sha);
        }
        // backhand always writes the last fragment block, even an empty one.
        let block = std::mem::take(&mut self.frag);
        self.compress(block)
    }

    fn compress(&mut self, block: Vec<u8>) -> Result<(), Stop> {
        let input = Arc::new(block);
        let (tx, rx) = mpsc::sync_channel(1);
        self.work.send((Arc::clone(&input), tx)).map_err(|_| Stop)?;
        self.order
            .send(Ahead::Block { input, output: rx })
            .map_err(|_| Stop)
    }

    fn add_orig(
        &mut self,
        path: &Path,
        content: &Content,
        blocks: Vec<usize>,
        sha: Option<[u8; 32]>,
    ) {
        let id = self.origs.len();
        if let Content::Disk { dev, ino, .. } = content {
            self.by_inode.entry((*dev, *ino)).or_insert(id);
        }
        self.by_size.entry(content.size()).or_default().push(id);
        self.origs.push(Orig {
            image_path: path.to_path_buf(),
            content: content.clone(),
            blocks,
            sha256: sha,
        });
    }

    /// An earlier data file with the same content: same inode, or same size
    /// and sha256 (hashed only when sizes collide).
    /// Also gives the file's sha256 when it had to be computed.
    #[allow(clippy::type_complexity)]
    fn find_dup(&mut self, content: &Content) -> Result<(Option<usize>, Option<[u8; 32]>), Stop> {
        if let Content::Disk { dev, ino, .. } = content {
            if let Some(&id) = self.by_inode.get(&(*dev, *ino)) {
                return Ok((Some(id), None));
            }
        }
        let Some(same_size) = self.by_size.get(&content.size()).cloned() else {
            return Ok((None, None));
        };
        let sha = sha256(content)?;
        for id in same_size {
            let theirs = match self.origs[id].sha256 {
                Some(h) => h,
                None => {
                    let h = sha256(&self.origs[id].content)?;
                    self.origs[id].sha256 = Some(h);
                    h
                }
            };
            if theirs == sha {
                if let Content::Disk { dev, ino, .. } = content {
                    self.by_inode.insert((*dev, *ino), id);
                }
                return Ok((Some(id), Some(sha)));
            }
        }
        Ok((None, Some(sha)))
    }
}

fn open(content: &Content) -> io::Result<Box<dyn Read>> {
    Ok(match content {
        Content::Disk { path, .. } => {
            Box::new(BufReader::with_capacity(1 << 16, File::open(path)?))
        }
        Content::Bytes(b) => Box::new(io::Cursor::new(Arc::clone(b))),
    })
}

fn sha256(content: &Content) -> io::Result<[u8; 32]> {
    let mut r = open(content)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

/// Checks in the written image that every duplicate whose blocks were
/// skipped points at its original's blocks.
pub(crate) fn verify_dups(image: &Path, dups: &[DupPair]) -> Result<(), ImageError> {
    if dups.is_empty() {
        return Ok(());
    }
    let corrupt = |reason: String| ImageError::Writer(reason);
    let file = File::open(image).map_err(|source| ImageError::Read {
        path: image.to_owned(),
        source,
    })?;
    let fs = FilesystemReader::from_reader(BufReader::new(file))
        .map_err(|e| corrupt(format!("cannot read back the image: {e}")))?;
    let mut files = HashMap::new();
    for node in fs.files() {
        if let InnerNode::File(f) = &node.inner {
            files.insert(node.fullpath.as_path(), f);
        }
    }
    for pair in dups {
        let (Some(d), Some(o)) = (
            files.get(pair.dup.as_path()),
            files.get(pair.orig.as_path()),
        ) else {
            return Err(corrupt(format!(
                "{} is missing from the image",
                pair.dup.display()
            )));
        };
        if d.blocks_start() != o.blocks_start() || d.block_sizes() != o.block_sizes() {
            return Err(ImageError::Unstable {
                path: pair.dup.clone(),
            });
        }
    }
    Ok(())
}
