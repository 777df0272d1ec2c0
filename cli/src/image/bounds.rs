//! What backhand would load into memory from an image, measured from the
//! file before backhand reads it, so that `inspect` on a crafted image ends
//! with an error instead of an allocation the size of the claims in its
//! tables, or a stack overflow.
//!
//! backhand reads every metadata block between the inode table and the
//! directory table, and from there to the next table, with no total limit
//! (a compressed block may expand to 4 MiB there); it reads lookup tables
//! as long as the superblock's counts say; it allocates a file's block list
//! as long as the file's claimed size says before reading it; and it walks
//! the directory tree recursively, cloning each entry's full path. Here the
//! same tables are walked the same way, with each metadata block held to
//! the format's 8 KiB, the total to [`Limits::metadata`], the nesting to
//! [`Limits::depth`] and the paths to [`Limits::path_bytes`].

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};

use super::sqfs::{METADATA_SIZE, NO_FRAGMENT, SUPERBLOCK_SIZE};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Uncompressed bytes of all metadata tables together.
    pub(crate) metadata: usize,
    /// Directories inside directories.
    pub(crate) depth: usize,
    /// The sum of every entry's full path, as backhand builds them.
    pub(crate) path_bytes: usize,
}

/// An image at these limits costs backhand a few hundred MiB at most; the
/// largest closures seen (100,000 files) need a tenth of them.
pub(crate) const LIMITS: Limits = Limits {
    metadata: 64 << 20,
    depth: 512,
    path_bytes: 128 << 20,
};

const NOT_SET: u64 = u64::MAX;
const META_UNCOMPRESSED: u16 = 1 << 15;

/// The superblock fields backhand acts on.
struct Super {
    inode_count: u32,
    block_size: u32,
    block_log: u16,
    frag_count: u32,
    compressor: u16,
    flags: u16,
    id_count: u16,
    root_inode: u64,
    bytes_used: u64,
    id_table: u64,
    inode_table: u64,
    dir_table: u64,
    frag_table: u64,
    export_table: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

impl Super {
    fn parse(b: &[u8; SUPERBLOCK_SIZE]) -> Super {
        Super {
            inode_count: le32(b, 4),
            block_size: le32(b, 12),
            frag_count: le32(b, 16),
            compressor: le16(b, 20),
            block_log: le16(b, 22),
            flags: le16(b, 24),
            id_count: le16(b, 26),
            root_inode: le64(b, 32),
            bytes_used: le64(b, 40),
            id_table: le64(b, 48),
            inode_table: le64(b, 64),
            dir_table: le64(b, 72),
            frag_table: le64(b, 80),
            export_table: le64(b, 88),
        }
    }
}

/// Checks that reading the image at `file` (of `size` bytes) stays within
/// `limits`; the error says what is wrong with it.
pub(crate) fn check<R: Read + Seek>(file: &mut R, size: u64, limits: Limits) -> Result<(), String> {
    let mut sb = [0u8; SUPERBLOCK_SIZE];
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    file.read_exact(&mut sb).map_err(|e| e.to_string())?;
    let s = Super::parse(&sb);
    if !(4096..=1 << 20).contains(&s.block_size)
        || !s.block_size.is_power_of_two()
        || u32::from(s.block_log) != s.block_size.trailing_zeros()
    {
        return Err(format!(
            "its block size {} is not one squashfs allows",
            s.block_size
        ));
    }
    let in_file = |name: &str, at: u64| {
        if at < SUPERBLOCK_SIZE as u64 || at >= s.bytes_used {
            Err(format!(
                "its {name} starts at byte {at}, outside the {} bytes it uses",
                s.bytes_used
            ))
        } else {
            Ok(())
        }
    };
    if s.bytes_used > size {
        return Err(format!(
            "it claims {} bytes but the file has {size}",
            s.bytes_used
        ));
    }
    in_file("inode table", s.inode_table)?;
    in_file("directory table", s.dir_table)?;
    in_file("id table", s.id_table)?;
    if s.dir_table <= s.inode_table {
        return Err("its directory table does not follow its inode table".into());
    }
    let mut m = Meta {
        file,
        compressor: s.compressor,
        end: s.bytes_used,
        total: 0,
        limit: limits.metadata,
    };

    // The lookup tables, as backhand reads them: a list of block positions
    // at the table's start, then as many blocks as the count needs, read
    // one after the other from the first.
    let table = |m: &mut Meta<'_, R>, name: &str, at: u64, bytes: u64| -> Result<u64, String> {
        in_file(name, at)?;
        let first = m.u64_at(at)?;
        in_file(name, first)?;
        let blocks = bytes.div_ceil(METADATA_SIZE as u64);
        // Each block takes at least its 2-byte header: a count the file
        // cannot hold is refused before anything is read.
        if blocks.saturating_mul(2) > s.bytes_used - first {
            return Err(format!(
                "its {name} claims {blocks} metadata blocks, more than fit in the file"
            ));
        }
        m.seek(first)?;
        for _ in 0..blocks {
            m.block(None)?;
        }
        Ok(first)
    };
    let frag_first = if s.frag_count != 0 && s.frag_table != NOT_SET {
        Some(table(
            &mut m,
            "fragment table",
            s.frag_table,
            u64::from(s.frag_count) * 16,
        )?)
    } else {
        None
    };
    // NFS export table flag, as backhand reads it.
    let export_first = if s.flags & 0x0080 != 0 && s.export_table != NOT_SET {
        Some(table(
            &mut m,
            "export table",
            s.export_table,
            u64::from(s.inode_count).div_ceil(1024),
        )?)
    } else {
        None
    };
    let id_first = table(&mut m, "id table", s.id_table, u64::from(s.id_count) * 4)?;
    let dir_end = frag_first.or(export_first).unwrap_or(id_first);
    if dir_end < s.dir_table {
        return Err("its directory table does not end where the next table starts".into());
    }

    let (inode_map, inodes) = m.region("inode table", s.inode_table, s.dir_table)?;
    let (dir_map, dirs) = m.region("directory table", s.dir_table, dir_end)?;

    let table = Inodes::parse(&inodes, &s)?;
    let root_block = s.root_inode >> 16;
    let root_at = inode_map
        .get(&root_block)
        .map(|o| *o as usize + (s.root_inode & 0xffff) as usize)
        .ok_or("its root inode is not where a metadata block starts")?;
    let root = inode_at(&inodes, root_at, &s)?
        .dir
        .ok_or("its root is not a directory")?;
    walk(root, &table, &dir_map, &dirs, limits)
}

/// Reads metadata blocks, holding each to the format's size and all of them
/// to a total.
struct Meta<'f, R> {
    file: &'f mut R,
    compressor: u16,
    end: u64,
    total: usize,
    limit: usize,
}

impl<R: Read + Seek> Meta<'_, R> {
    fn seek(&mut self, at: u64) -> Result<(), String> {
        self.file
            .seek(SeekFrom::Start(at))
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn u64_at(&mut self, at: u64) -> Result<u64, String> {
        self.seek(at)?;
        let mut b = [0u8; 8];
        self.file.read_exact(&mut b).map_err(|e| e.to_string())?;
        Ok(u64::from_le_bytes(b))
    }

    /// One metadata block at the current position, uncompressed; its bytes
    /// go to `out` when given. Returns the bytes it took in the file.
    fn block(&mut self, out: Option<&mut Vec<u8>>) -> Result<u64, String> {
        let mut h = [0u8; 2];
        self.file
            .read_exact(&mut h)
            .map_err(|_| "a metadata block runs past the end of the file".to_owned())?;
        let h = u16::from_le_bytes(h);
        let len = usize::from(h & !META_UNCOMPRESSED);
        if len > METADATA_SIZE {
            return Err(format!(
                "a metadata block claims {len} bytes, more than 8 KiB"
            ));
        }
        let mut buf = vec![0u8; len];
        self.file
            .read_exact(&mut buf)
            .map_err(|_| "a metadata block runs past the end of the file".to_owned())?;
        let bytes = if h & META_UNCOMPRESSED != 0 {
            buf
        } else {
            decompress(self.compressor, &buf)?
        };
        self.total += bytes.len();
        if self.total > self.limit {
            return Err(format!(
                "its metadata expands to more than {} MiB",
                self.limit >> 20
            ));
        }
        if let Some(out) = out {
            out.extend_from_slice(&bytes);
        }
        Ok(2 + len as u64)
    }

    /// The blocks from `start` that end exactly at `end`, uncompressed, and
    /// where each block starts (relative to `start`) in the result.
    fn region(
        &mut self,
        name: &str,
        start: u64,
        end: u64,
    ) -> Result<(HashMap<u64, u64>, Vec<u8>), String> {
        if end > self.end {
            return Err(format!("its {name} runs past the bytes it uses"));
        }
        self.seek(start)?;
        let mut at = start;
        let mut map = HashMap::new();
        let mut bytes = Vec::new();
        while at < end {
            map.insert(at - start, bytes.len() as u64);
            at += self.block(Some(&mut bytes))?;
        }
        if at != end {
            return Err(format!(
                "its {name}'s last metadata block runs into the next table"
            ));
        }
        Ok((map, bytes))
    }
}

/// One metadata block, uncompressed, refused past 8 KiB: how much a block
/// would expand to is what a crafted image lies about.
fn decompress(compressor: u16, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let too_big = || "a metadata block expands to more than 8 KiB".to_owned();
    let bad = |e: std::io::Error| format!("a metadata block does not decompress ({e})");
    let mut out = Vec::with_capacity(METADATA_SIZE + 1);
    let limit = METADATA_SIZE as u64 + 1;
    match compressor {
        1 => {
            flate2::read::ZlibDecoder::new(bytes)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(bad)?;
        }
        4 => {
            liblzma::read::XzDecoder::new(bytes)
                .take(limit)
                .read_to_end(&mut out)
                .map_err(bad)?;
        }
        6 => {
            zstd::stream::read::Decoder::new(bytes)
                .map_err(bad)?
                .take(limit)
                .read_to_end(&mut out)
                .map_err(bad)?;
        }
        other => return Err(format!("compressor {other} is not one attache reads")),
    }
    if out.len() > METADATA_SIZE {
        return Err(too_big());
    }
    Ok(out)
}

/// A directory inode: where its listing is.
#[derive(Debug, Clone, Copy)]
struct DirInode {
    block: u64,
    offset: usize,
    size: u32,
}

struct Parsed {
    number: u32,
    dir: Option<DirInode>,
    len: usize,
}

struct Inodes {
    by_number: HashMap<u32, DirInode>,
}

impl Inodes {
    /// Every inode, one after the other, as backhand reads them; only
    /// directories are kept (by number: backhand finds entries by number).
    fn parse(bytes: &[u8], s: &Super) -> Result<Inodes, String> {
        let mut by_number = HashMap::new();
        let mut at = 0;
        let mut count = 0u64;
        while at < bytes.len() {
            let p = inode_at(bytes, at, s)?;
            if let Some(d) = p.dir {
                by_number.insert(p.number, d);
            }
            at += p.len;
            count += 1;
        }
        if count != u64::from(s.inode_count) {
            return Err(format!(
                "it holds {count} inodes where its superblock says {}",
                s.inode_count
            ));
        }
        Ok(Inodes { by_number })
    }
}

/// The inode at `at`: its number, its length, and where a directory's
/// listing is. A list (blocks, symlink target, index) that runs past the
/// table is refused before backhand would allocate it.
fn inode_at(b: &[u8], at: usize, s: &Super) -> Result<Parsed, String> {
    let short = || "an inode runs past the end of the inode table".to_owned();
    let need = |n: usize| {
        if at + n <= b.len() {
            Ok(())
        } else {
            Err(short())
        }
    };
    need(16)?;
    let kind = le16(b, at);
    let number = le32(b, at + 12);
    let body = at + 16;
    let blocks = |frag: u32, size: u64| -> u64 {
        let bs = u64::from(s.block_size);
        if frag == NO_FRAGMENT {
            size.div_ceil(bs)
        } else {
            size / bs
        }
    };
    let with_list = |fixed: usize, items: u64, item: usize| -> Result<usize, String> {
        let list = items.checked_mul(item as u64).ok_or_else(short)?;
        let total = (fixed as u64).checked_add(list).ok_or_else(short)?;
        if (at as u64).saturating_add(total) > b.len() as u64 {
            return Err(short());
        }
        Ok(total as usize)
    };
    let (len, dir) = match kind {
        1 => {
            need(32)?;
            let d = DirInode {
                block: u64::from(le32(b, body)),
                size: u32::from(le16(b, body + 8)),
                offset: usize::from(le16(b, body + 10)),
            };
            (32, Some(d))
        }
        2 => {
            need(32)?;
            let n = blocks(le32(b, body + 4), u64::from(le32(b, body + 12)));
            (with_list(32, n, 4)?, None)
        }
        3 | 10 => {
            need(24)?;
            let target = u64::from(le32(b, body + 4));
            if target >= 256 {
                return Err("a symlink's target is 256 bytes or more".into());
            }
            (with_list(if kind == 3 { 24 } else { 28 }, target, 1)?, None)
        }
        4 | 5 => (24, None),
        6 | 7 => (20, None),
        8 => {
            need(40)?;
            let d = DirInode {
                size: le32(b, body + 4),
                block: u64::from(le32(b, body + 8)),
                offset: usize::from(le16(b, body + 18)),
            };
            // Each index entry: 12 bytes and a name of size + 1.
            let mut len = 40;
            for _ in 0..le16(b, body + 16) {
                need(len + 12)?;
                let name = le32(b, at + len + 8);
                if name >= 256 {
                    return Err("a directory index names an entry of 256 bytes or more".into());
                }
                len += 12 + name as usize + 1;
            }
            need(len)?;
            (len, Some(d))
        }
        9 => {
            need(56)?;
            let size = le64(b, body + 8);
            let n = blocks(le32(b, body + 28), size);
            (with_list(56, n, 4)?, None)
        }
        11 | 12 => (28, None),
        13 | 14 => (24, None),
        other => return Err(format!("an inode has the unknown type {other}")),
    };
    need(len)?;
    Ok(Parsed { number, dir, len })
}

/// Walks the tree from the root as backhand will (each directory once),
/// with an explicit stack, counting depth and path bytes.
fn walk(
    root: DirInode,
    inodes: &Inodes,
    dir_map: &HashMap<u64, u64>,
    dirs: &[u8],
    limits: Limits,
) -> Result<(), String> {
    let mut seen: HashSet<u32> = HashSet::new();
    let mut path_bytes = 0usize;
    // (directory, its depth, the length of its path)
    let mut stack = vec![(root, 0usize, 0usize)];
    while let Some((d, depth, path_len)) = stack.pop() {
        if depth > limits.depth {
            return Err(format!(
                "its directories are nested more than {} deep",
                limits.depth
            ));
        }
        if d.size < 4 {
            continue;
        }
        let Some(start) = dir_map.get(&d.block) else {
            continue; // backhand refuses it
        };
        let from = *start as usize + d.offset;
        let Some(listing) = dirs.get(from..from + d.size as usize - 3) else {
            continue; // backhand refuses it
        };
        let mut at = 0;
        'headers: while at + 12 <= listing.len() {
            let count = le32(listing, at);
            let base = le32(listing, at + 8);
            if count > 256 {
                break;
            }
            at += 12;
            for _ in 0..=count {
                if at + 8 > listing.len() {
                    break 'headers;
                }
                let delta = le16(listing, at + 2) as i16;
                let kind = le16(listing, at + 4);
                let name = usize::from(le16(listing, at + 6)) + 1;
                if !(1..=14).contains(&kind) || at + 8 + name > listing.len() {
                    break 'headers;
                }
                at += 8 + name;
                path_bytes += path_len + 1 + name;
                if path_bytes > limits.path_bytes {
                    return Err(format!(
                        "its paths add up to more than {} MiB",
                        limits.path_bytes >> 20
                    ));
                }
                if kind == 1 || kind == 8 {
                    let number = i64::from(base) + i64::from(delta);
                    let Ok(number) = u32::try_from(number) else {
                        continue;
                    };
                    if let Some(child) = inodes.by_number.get(&number) {
                        if seen.insert(number) {
                            stack.push((*child, depth + 1, path_len + 1 + name));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::*;
    use crate::image::{inspect, ImageError};

    const U: u16 = META_UNCOMPRESSED;

    /// Splits `bytes` into uncompressed metadata blocks.
    fn blocks(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in bytes.chunks(METADATA_SIZE) {
            out.extend_from_slice(&(chunk.len() as u16 | U).to_le_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// Where byte `at` of an uncompressed table written by [`blocks`] is:
    /// (block start in the table, offset in the block).
    fn position(at: usize) -> (u32, u16) {
        let block = at / METADATA_SIZE;
        (
            (block * (METADATA_SIZE + 2)) as u32,
            (at % METADATA_SIZE) as u16,
        )
    }

    /// A gzip image from raw inode and directory tables (already in
    /// metadata blocks), with one id and no fragments.
    fn image(inode_table: &[u8], dir_table: &[u8], inode_count: u32) -> Vec<u8> {
        let inode_at = SUPERBLOCK_SIZE as u64;
        let dir_at = inode_at + inode_table.len() as u64;
        let id_block = dir_at + dir_table.len() as u64;
        let id_index = id_block + 2 + 4;
        let used = id_index + 8;
        let mut b = Vec::new();
        b.extend_from_slice(&super::super::sqfs::MAGIC.to_le_bytes());
        b.extend_from_slice(&inode_count.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&4096u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // fragments
        b.extend_from_slice(&1u16.to_le_bytes()); // gzip
        b.extend_from_slice(&12u16.to_le_bytes());
        b.extend_from_slice(&0x0200u16.to_le_bytes()); // no xattrs
        b.extend_from_slice(&1u16.to_le_bytes()); // ids
        b.extend_from_slice(&4u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        for v in [
            0, used, id_index, NOT_SET, inode_at, dir_at, NOT_SET, NOT_SET,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(inode_table);
        b.extend_from_slice(dir_table);
        b.extend_from_slice(&(4 | U).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&id_block.to_le_bytes());
        b
    }

    fn inode_header(kind: u16, number: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(&0o755u16.to_le_bytes());
        v.extend_from_slice(&[0; 4]); // uid, gid
        v.extend_from_slice(&0u32.to_le_bytes()); // mtime
        v.extend_from_slice(&number.to_le_bytes());
        v
    }

    fn dir_inode(number: u32, listing: (u32, u16), size: u16) -> Vec<u8> {
        let mut v = inode_header(1, number);
        v.extend_from_slice(&listing.0.to_le_bytes());
        v.extend_from_slice(&2u32.to_le_bytes()); // links
        v.extend_from_slice(&size.to_le_bytes());
        v.extend_from_slice(&listing.1.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes()); // parent
        v
    }

    /// `depth` directories, each holding the next one, named `d`.
    fn nested(depth: u32) -> Vec<u8> {
        let (mut inodes, mut dirs) = (Vec::new(), Vec::new());
        for n in 1..=depth {
            let listing = position(dirs.len());
            if n < depth {
                let child = position(n as usize * 32);
                dirs.extend_from_slice(&0u32.to_le_bytes()); // one entry
                dirs.extend_from_slice(&child.0.to_le_bytes());
                dirs.extend_from_slice(&(n + 1).to_le_bytes());
                dirs.extend_from_slice(&child.1.to_le_bytes());
                dirs.extend_from_slice(&0i16.to_le_bytes());
                dirs.extend_from_slice(&1u16.to_le_bytes()); // directory
                dirs.extend_from_slice(&0u16.to_le_bytes()); // name of 1 byte
                dirs.push(b'd');
                inodes.extend(dir_inode(n, listing, 21 + 3));
            } else {
                inodes.extend(dir_inode(n, listing, 3));
            }
        }
        image(&blocks(&inodes), &blocks(&dirs), depth)
    }

    fn check_bytes(image: &[u8]) -> Result<(), String> {
        check(&mut std::io::Cursor::new(image), image.len() as u64, LIMITS)
    }

    #[test]
    fn crafted_images_that_are_fine_pass() {
        check_bytes(&nested(1)).unwrap();
        check_bytes(&nested(LIMITS.depth as u32)).unwrap();
    }

    #[test]
    fn deep_nesting_is_refused() {
        assert_eq!(
            check_bytes(&nested(LIMITS.depth as u32 + 2)).unwrap_err(),
            "its directories are nested more than 512 deep"
        );
    }

    /// A file claiming 2 TiB: backhand would allocate its block list (2 GiB)
    /// before finding the table too short.
    fn huge_file() -> Vec<u8> {
        let mut inodes = dir_inode(1, (0, 0), 3);
        inodes.extend(inode_header(9, 2));
        inodes.extend_from_slice(&0u64.to_le_bytes()); // blocks start
        inodes.extend_from_slice(&((2u64 << 40) - 1).to_le_bytes());
        inodes.extend_from_slice(&0u64.to_le_bytes()); // sparse
        inodes.extend_from_slice(&1u32.to_le_bytes());
        inodes.extend_from_slice(&NO_FRAGMENT.to_le_bytes());
        inodes.extend_from_slice(&0u32.to_le_bytes());
        inodes.extend_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        image(&blocks(&inodes), &blocks(&[0; 4]), 2)
    }

    /// Metadata blocks of 2 MiB each (backhand takes up to 4 MiB from one):
    /// 200 of them in a file of a few hundred KiB.
    fn metadata_bomb() -> Vec<u8> {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; 2 << 20]).unwrap();
        let bomb = z.finish().unwrap();
        let mut table = Vec::new();
        for _ in 0..200 {
            table.extend_from_slice(&(bomb.len() as u16).to_le_bytes());
            table.extend_from_slice(&bomb);
        }
        image(&table, &blocks(&[0; 4]), 1)
    }

    /// Counts far beyond what the file holds.
    fn oversized_counts() -> Vec<u8> {
        let mut img = nested(3);
        img[16..20].copy_from_slice(&u32::MAX.to_le_bytes()); // fragments
        let id_table = le64(&img, 48);
        img[80..88].copy_from_slice(&id_table.to_le_bytes());
        img
    }

    #[test]
    fn oversized_tables_are_refused() {
        assert_eq!(
            check_bytes(&huge_file()).unwrap_err(),
            "an inode runs past the end of the inode table"
        );
        assert_eq!(
            check_bytes(&metadata_bomb()).unwrap_err(),
            "a metadata block expands to more than 8 KiB"
        );
        assert_eq!(
            check_bytes(&oversized_counts()).unwrap_err(),
            "its fragment table claims 8388608 metadata blocks, more than fit in the file"
        );
    }

    /// `inspect` of one crafted image, in a child process (this test binary
    /// running [`inspect_in_child`]) limited to 1 GiB of address space; the
    /// child reports how much its peak resident memory grew.
    fn inspect_in_a_child(image: &Path) -> (String, u64) {
        let exe = std::env::current_exe().unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(r#"ulimit -v 1048576 && exec "$0" "$@""#)
            .arg(exe)
            .args([
                "--exact",
                "image::bounds::tests::inspect_in_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ATTACHE_TEST_CRAFTED", image)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the child failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("crafted: ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no report from the child:\n{stdout}"));
        let (kb, error) = line.split_once(' ').unwrap();
        (error.to_owned(), kb.parse().unwrap())
    }

    fn peak_rss_kb() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Does nothing unless run by [`inspect_in_a_child`], to which it
    /// reports on stdout.
    #[test]
    #[allow(clippy::print_stdout)]
    fn inspect_in_child() {
        let Some(path) = std::env::var_os("ATTACHE_TEST_CRAFTED") else {
            return;
        };
        let before = peak_rss_kb();
        let e = inspect(Path::new(&path)).unwrap_err();
        assert!(matches!(e, ImageError::Corrupt { .. }), "{e:?}");
        println!("crafted: {} {e}", peak_rss_kb().saturating_sub(before));
    }

    #[test]
    fn inspect_of_crafted_images_stays_small() {
        let t = tempfile::tempdir().unwrap();
        for (name, bytes, says) in [
            (
                "deep",
                nested(100_000),
                "its directories are nested more than 512 deep",
            ),
            (
                "huge",
                huge_file(),
                "an inode runs past the end of the inode table",
            ),
            (
                "bomb",
                metadata_bomb(),
                "a metadata block expands to more than 8 KiB",
            ),
            ("counts", oversized_counts(), "more than fit in the file"),
        ] {
            let path = t.path().join(format!("{name}_1.raw"));
            std::fs::write(&path, bytes).unwrap();
            let (error, grew_kb) = inspect_in_a_child(&path);
            assert!(
                error.starts_with(&format!("{} is a damaged", path.display()))
                    && error.contains(says),
                "{name}: {error}"
            );
            // The image itself is read once for its sha256, in small pieces.
            assert!(grew_kb < 32 * 1024, "{name}: peak RSS grew by {grew_kb} kB");
        }
    }
}
