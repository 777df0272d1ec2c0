//! The producer of [`super::write_image`]: reads the files in layout order,
//! once each, decides where each one's data goes (nowhere, the fragment
//! block, data blocks, or an earlier copy's data), hands blocks to the
//! workers and tells the writer, in order, what comes next.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};

use super::{Job, Msg, Output, Pool, Stats, BATCH};
use crate::image::error::ImageError;
use crate::image::layout::Content;

/// Runs the producer over `files` until done or until the writer is gone;
/// a file that cannot be read is reported to the writer as
/// [`Msg::Failed`]. Returns what it did.
pub(super) fn produce(
    files: &[(&Path, &Content)],
    block_size: usize,
    pool: &Pool,
    work: mpsc::Sender<Job>,
    order: SyncSender<Msg>,
) -> Stats {
    let mut p = Producer {
        block_size,
        pool,
        work,
        order,
        fragment: pool.take(),
        fragments: 0,
        fragment_owner: None,
        scratch: Vec::new(),
        by_inode: HashMap::new(),
        by_content: HashMap::new(),
        sizes: HashSet::new(),
        shared_sizes: shared_sizes(files),
        batch: Vec::with_capacity(BATCH),
        stats: Stats::default(),
    };
    match p.run(files) {
        Ok(()) => {}
        Err(Stop::Failed(e)) => {
            let _ = p.order.send(Msg::Failed(e));
        }
        Err(Stop::Gone) => {}
    }
    p.stats
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
    work: mpsc::Sender<Job>,
    order: SyncSender<Msg>,
    fragment: Vec<u8>,
    fragments: u32,
    /// The store path whose small files fill the current fragment block.
    fragment_owner: Option<Vec<u8>>,
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

/// `/nix/store/HASH-NAME` of a file under it, as bytes.
fn store_path(path: &Path) -> Option<&[u8]> {
    let b = path.as_os_str().as_bytes();
    let rest = b.strip_prefix(b"/nix/store/")?;
    let end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
    Some(&b[..b"/nix/store/".len() + end])
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
        for (i, (path, content)) in files.iter().enumerate() {
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
                self.small_file(i, store_path(path), content)?
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

    /// A file smaller than a block: a duplicate, or appended to the fragment
    /// block. A store path's small files start a fragment block of their
    /// own, so one changed store path leaves every other path's fragment
    /// blocks the same bytes (what a delta upgrade finds again): measured
    /// in `cli/benches/RESULTS.md`.
    fn small_file(
        &mut self,
        i: usize,
        owner: Option<&[u8]>,
        content: &Content,
    ) -> Result<Msg, Stop> {
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
        let new_owner = owner != self.fragment_owner.as_deref();
        if (new_owner && !self.fragment.is_empty())
            || self.fragment.len() + buf.len() > self.block_size
        {
            self.flush_fragment()?;
        }
        if new_owner {
            self.fragment_owner = owner.map(<[u8]>::to_vec);
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
