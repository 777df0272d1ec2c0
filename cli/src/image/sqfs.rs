//! The squashfs 4.0 on-disk format, as far as attache writes it.
//!
//! Little-endian throughout. An image is: the superblock (96 bytes), the
//! compressor options (one uncompressed metadata block), data and fragment
//! blocks, the inode table, the directory table, the fragment table, the id
//! table, zero padding to 4 KiB. Metadata (inodes, directory listings, table
//! entries) goes in blocks of at most 8 KiB, each compressed on its own and
//! preceded by a `u16` length (bit 15 set: stored uncompressed). References
//! into a metadata table are `(block start relative to the table) << 16 |
//! offset in the uncompressed block`.
//!
//! What is left out, as attache images do not need it: extended attributes
//! (`NO_XATTRS`), the NFS export table, hard links sharing one inode (a hard
//! link becomes a second inode pointing at the same data), directory indexes.
//!
//! References: `squashfs_fs.h` of Linux and squashfs-tools, and the
//! format description at <https://dr-emann.github.io/squashfs/>.

use super::compress::{compress_block, Codec, Compression};
use super::error::ImageError;

pub(crate) const SUPERBLOCK_SIZE: usize = 96;
/// The superblock's first word: "hsqs" on disk.
pub(crate) const MAGIC: u32 = 0x7371_7368;
pub(crate) const METADATA_SIZE: usize = 8192;
/// Bit of a data block size: stored uncompressed.
pub(crate) const DATA_UNCOMPRESSED: u32 = 1 << 24;
const META_UNCOMPRESSED: u16 = 1 << 15;
pub(crate) const NO_FRAGMENT: u32 = 0xFFFF_FFFF;
const NO_XATTR: u32 = 0xFFFF_FFFF;
const NO_TABLE: u64 = 0xFFFF_FFFF_FFFF_FFFF;

const FLAG_DUPLICATES: u16 = 0x0040;
const FLAG_NO_XATTRS: u16 = 0x0200;
const FLAG_COMPRESSOR_OPTIONS: u16 = 0x0400;

pub(crate) const TYPE_DIR: u16 = 1;
pub(crate) const TYPE_FILE: u16 = 2;
pub(crate) const TYPE_SYMLINK: u16 = 3;
const TYPE_LDIR: u16 = 8;
const TYPE_LFILE: u16 = 9;

/// The compressor id and the options block body that describe `codec`.
fn compressor_id_and_options(codec: &Codec) -> (u16, Vec<u8>) {
    let mut o = Vec::new();
    match codec.compression {
        Compression::Gzip => {
            o.extend_from_slice(&codec.level.to_le_bytes());
            o.extend_from_slice(&15u16.to_le_bytes()); // window bits
            o.extend_from_slice(&0u16.to_le_bytes()); // strategies: default
            (1, o)
        }
        Compression::Xz => {
            o.extend_from_slice(&codec.xz_dict_size().to_le_bytes()); // dictionary
            o.extend_from_slice(&0u32.to_le_bytes()); // no BCJ filters
            (4, o)
        }
        Compression::Zstd => {
            o.extend_from_slice(&codec.level.to_le_bytes());
            (6, o)
        }
    }
}

/// The compressor options metadata block that follows the superblock.
pub(crate) fn compressor_options_block(codec: &Codec) -> Vec<u8> {
    let (_, body) = compressor_id_and_options(codec);
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(&(body.len() as u16 | META_UNCOMPRESSED).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Where the tables are, and the counts, for the superblock.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SuperBlock {
    pub(crate) inode_count: u32,
    pub(crate) fragment_count: u32,
    pub(crate) root_inode: u64,
    pub(crate) bytes_used: u64,
    pub(crate) id_table: u64,
    pub(crate) inode_table: u64,
    pub(crate) dir_table: u64,
    pub(crate) fragment_table: u64,
}

impl SuperBlock {
    pub(crate) fn to_bytes(self, codec: &Codec) -> [u8; SUPERBLOCK_SIZE] {
        let (id, _) = compressor_id_and_options(codec);
        let mut b = Vec::with_capacity(SUPERBLOCK_SIZE);
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&self.inode_count.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // mtime
        b.extend_from_slice(&codec.block_size.to_le_bytes());
        b.extend_from_slice(&self.fragment_count.to_le_bytes());
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&(codec.block_size.trailing_zeros() as u16).to_le_bytes());
        let flags = FLAG_DUPLICATES | FLAG_NO_XATTRS | FLAG_COMPRESSOR_OPTIONS;
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes()); // one id: root
        b.extend_from_slice(&4u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        for v in [
            self.root_inode,
            self.bytes_used,
            self.id_table,
            NO_TABLE, // xattr id table
            self.inode_table,
            self.dir_table,
            self.fragment_table,
            NO_TABLE, // export table
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.try_into().expect("superblock is 96 bytes")
    }
}

/// Compresses one metadata block; `out` gets its length word and bytes.
fn push_metadata_block(out: &mut Vec<u8>, block: &[u8], codec: &Codec) -> Result<(), ImageError> {
    debug_assert!(block.len() <= METADATA_SIZE);
    let c = compress_block(block, codec).map_err(|e| ImageError::Writer(e.to_string()))?;
    if c.len() < block.len() {
        out.extend_from_slice(&(c.len() as u16).to_le_bytes());
        out.extend_from_slice(&c);
    } else {
        out.extend_from_slice(&(block.len() as u16 | META_UNCOMPRESSED).to_le_bytes());
        out.extend_from_slice(block);
    }
    Ok(())
}

/// A metadata table (inodes or directories) built in memory.
pub(crate) struct MetadataWriter<'c> {
    codec: &'c Codec,
    pending: Vec<u8>,
    out: Vec<u8>,
}

impl<'c> MetadataWriter<'c> {
    pub(crate) fn new(codec: &'c Codec) -> Self {
        MetadataWriter {
            codec,
            pending: Vec::with_capacity(2 * METADATA_SIZE),
            out: Vec::new(),
        }
    }

    /// Where the next byte goes: (block start in the table, offset in the block).
    pub(crate) fn position(&self) -> (u32, u16) {
        (self.out.len() as u32, self.pending.len() as u16)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.pending.extend_from_slice(bytes);
        while self.pending.len() >= METADATA_SIZE {
            push_metadata_block(&mut self.out, &self.pending[..METADATA_SIZE], self.codec)?;
            self.pending.drain(..METADATA_SIZE);
        }
        if self.out.len() > u32::MAX as usize {
            return Err(ImageError::Writer("metadata table over 4 GiB".into()));
        }
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<Vec<u8>, ImageError> {
        if !self.pending.is_empty() {
            push_metadata_block(&mut self.out, &self.pending, self.codec)?;
        }
        Ok(self.out)
    }
}

/// A lookup table (fragments, ids): its entries in metadata blocks, then the
/// `u64` positions of those blocks. Returns the bytes and the offset of the
/// position list within them (what the superblock points at).
pub(crate) fn lookup_table(
    entries: &[u8],
    table_start: u64,
    codec: &Codec,
) -> Result<(Vec<u8>, u64), ImageError> {
    let mut out = Vec::new();
    let mut starts = Vec::new();
    for chunk in entries.chunks(METADATA_SIZE) {
        starts.push(table_start + out.len() as u64);
        push_metadata_block(&mut out, chunk, codec)?;
    }
    let index = out.len() as u64;
    for s in starts {
        out.extend_from_slice(&s.to_le_bytes());
    }
    Ok((out, index))
}

/// A fragment table entry.
pub(crate) fn fragment_entry(start: u64, size: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[..8].copy_from_slice(&start.to_le_bytes());
    e[8..12].copy_from_slice(&size.to_le_bytes());
    e
}

/// Where the data of a regular file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Placement {
    /// No data (an empty file).
    Empty,
    /// Smaller than a block: in fragment block `index` at `offset`.
    Fragment { index: u32, offset: u32 },
    /// Data blocks from `start`; sizes as stored (0 = a hole of zeros).
    Blocks { start: u64, sizes: Vec<u32> },
}

fn header(b: &mut Vec<u8>, kind: u16, mode: u16, number: u32) {
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&mode.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes()); // uid index
    b.extend_from_slice(&0u16.to_le_bytes()); // gid index
    b.extend_from_slice(&0u32.to_le_bytes()); // mtime
    b.extend_from_slice(&number.to_le_bytes());
}

/// A regular file inode (basic, or extended when offsets need 64 bits).
pub(crate) fn file_inode(
    b: &mut Vec<u8>,
    mode: u16,
    number: u32,
    size: u64,
    place: &Placement,
    block_size: u32,
) {
    let (start, fragment, offset, sizes): (u64, u32, u32, &[u32]) = match place {
        Placement::Empty => (0, NO_FRAGMENT, 0, &[]),
        Placement::Fragment { index, offset } => (0, *index, *offset, &[]),
        Placement::Blocks { start, sizes } => (*start, NO_FRAGMENT, 0, sizes),
    };
    if start <= u32::MAX as u64 && size <= u32::MAX as u64 {
        header(b, TYPE_FILE, mode, number);
        b.extend_from_slice(&(start as u32).to_le_bytes());
        b.extend_from_slice(&fragment.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&(size as u32).to_le_bytes());
    } else {
        let holes = sizes.iter().filter(|s| **s == 0).count() as u64;
        header(b, TYPE_LFILE, mode, number);
        b.extend_from_slice(&start.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&(holes * block_size as u64).min(size).to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes()); // nlink
        b.extend_from_slice(&fragment.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&NO_XATTR.to_le_bytes());
    }
    for s in sizes {
        b.extend_from_slice(&s.to_le_bytes());
    }
}

pub(crate) fn symlink_inode(b: &mut Vec<u8>, mode: u16, number: u32, target: &[u8]) {
    header(b, TYPE_SYMLINK, mode, number);
    b.extend_from_slice(&1u32.to_le_bytes()); // nlink
    b.extend_from_slice(&(target.len() as u32).to_le_bytes());
    b.extend_from_slice(target);
}

/// A directory inode. `listing` is where its listing starts in the directory
/// table, `listing_len` its length in bytes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dir_inode(
    b: &mut Vec<u8>,
    mode: u16,
    number: u32,
    nlink: u32,
    listing: (u32, u16),
    listing_len: usize,
    parent: u32,
) {
    // The size counts 3 more bytes, for "." and "..", which are not stored.
    let size = listing_len + 3;
    if size <= u16::MAX as usize {
        header(b, TYPE_DIR, mode, number);
        b.extend_from_slice(&listing.0.to_le_bytes());
        b.extend_from_slice(&nlink.to_le_bytes());
        b.extend_from_slice(&(size as u16).to_le_bytes());
        b.extend_from_slice(&listing.1.to_le_bytes());
        b.extend_from_slice(&parent.to_le_bytes());
    } else {
        header(b, TYPE_LDIR, mode, number);
        b.extend_from_slice(&nlink.to_le_bytes());
        b.extend_from_slice(&(size as u32).to_le_bytes());
        b.extend_from_slice(&listing.0.to_le_bytes());
        b.extend_from_slice(&parent.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes()); // no index
        b.extend_from_slice(&listing.1.to_le_bytes());
        b.extend_from_slice(&NO_XATTR.to_le_bytes());
    }
}

/// One name in a directory listing.
pub(crate) struct DirEntry<'n> {
    pub(crate) name: &'n [u8],
    /// Where the inode is: (block start in the inode table, offset).
    pub(crate) inode: (u32, u16),
    pub(crate) number: u32,
    /// [`TYPE_DIR`], [`TYPE_FILE`] or [`TYPE_SYMLINK`] (basic types, also
    /// for extended inodes).
    pub(crate) kind: u16,
}

/// A directory listing: runs of at most 256 names whose inodes start in the
/// same metadata block and whose numbers are within ±32767 of the run's.
/// Names must come sorted by bytes (the kernel's lookup relies on it).
pub(crate) fn dir_listing(entries: &[DirEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let base = &entries[i];
        let mut j = i + 1;
        while j < entries.len()
            && j - i < 256
            && entries[j].inode.0 == base.inode.0
            && (entries[j].number as i64 - base.number as i64).abs() <= i16::MAX as i64
        {
            j += 1;
        }
        out.extend_from_slice(&((j - i - 1) as u32).to_le_bytes());
        out.extend_from_slice(&base.inode.0.to_le_bytes());
        out.extend_from_slice(&base.number.to_le_bytes());
        for e in &entries[i..j] {
            out.extend_from_slice(&e.inode.1.to_le_bytes());
            out.extend_from_slice(&((e.number as i64 - base.number as i64) as i16).to_le_bytes());
            out.extend_from_slice(&e.kind.to_le_bytes());
            out.extend_from_slice(&((e.name.len() - 1) as u16).to_le_bytes());
            out.extend_from_slice(e.name);
        }
        i = j;
    }
    out
}
