//! Delta upgrades, the pure part: rsync's algorithm over whole images.
//!
//! The host keeps a [`Signature`] of every image attache placed there (the
//! sender computed it from the bytes it uploaded): the image's sha256 and,
//! for each fixed-size block, a weak rolling checksum and a strong hash.
//! [`diff`] rolls the weak checksum over the new image at every byte offset,
//! so blocks of the basis are found wherever they moved to (a changed store
//! path shifts every later file's bytes), confirms each candidate with the
//! strong hash, and returns [`Op`]s: copy a range of the basis, or take the
//! next bytes from the uploaded pieces. The host replays them with `dd`
//! alone (see `deploy::ops::delta`), so it needs nothing beyond coreutils.
//!
//! Why this and not content-defined chunks (casync/desync) or OSTree static
//! deltas: both need a program on the host (a chunk store and its
//! assembler, or OSTree itself), and both pay off across many versions kept
//! in a store, which a host of portable images does not have. A squashfs
//! image changes in place in a few runs (the changed store path, the
//! fragment blocks after it, the metadata tables); rsync's rolling match
//! finds everything else at any offset, with a signature the host never has
//! to compute. Measured in `cli/benches/RESULTS.md`.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;

/// Bytes of the strong hash kept per block (BLAKE3, truncated). 64 bits
/// make a false match among a few million blocks unlikely, and one would
/// cost only a full upload: the sha256 of the whole rebuilt image is
/// checked before it is used. Fewer bytes keep the signature, which goes
/// to the host with every image and comes back at the next upgrade, small
/// (26 bytes a block as hex).
const STRONG: usize = 8;

/// First line of a signature file.
const MAGIC: &str = "attache-signature 1";

/// The block size for an image of `size` bytes: its square root, as
/// rsync takes, rounded up to a power of two from 2 KiB to 64 KiB. Smaller
/// blocks lose fewer bytes around each change but make the signature
/// larger; this is where their sum is least in `cli/benches/RESULTS.md`.
pub fn block_size(size: u64) -> u32 {
    let root = (size as f64).sqrt() as u64;
    root.next_power_of_two().clamp(2048, 65536) as u32
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// sha256 of the image this signature is of.
    pub sha256: String,
    pub size: u64,
    pub block: u32,
    /// One (weak, strong) pair per full block; a short last block is left
    /// out (it is sent as literal bytes if it is needed).
    pub blocks: Vec<(u32, [u8; STRONG])>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the signature is damaged: {0}")]
pub struct BadSignature(&'static str);

impl Signature {
    /// The signature of `data` with blocks of `block` bytes.
    #[cfg(test)]
    pub fn of(data: &[u8], block: u32) -> Signature {
        use sha2::Digest;
        Signature::of_image(data, &hex::encode(sha2::Sha256::digest(data)), block)
    }

    /// The signature of an image whose sha256 is known.
    pub fn of_image(data: &[u8], sha256: &str, block: u32) -> Signature {
        let blocks = data
            .chunks_exact(block as usize)
            .map(|b| (weak(b), strong(b)))
            .collect();
        Signature {
            sha256: sha256.to_owned(),
            size: data.len() as u64,
            block,
            blocks,
        }
    }

    /// As stored on the host: a header line, then `WEAK STRONG` in hex,
    /// one line per block.
    pub fn to_text(&self) -> String {
        let mut s = format!("{MAGIC} {} {} {}\n", self.block, self.size, self.sha256);
        s.reserve(self.blocks.len() * (10 + 2 * STRONG));
        for (w, st) in &self.blocks {
            s.push_str(&format!("{w:08x} {}\n", hex::encode(st)));
        }
        s
    }

    pub fn parse(text: &str) -> Result<Signature, BadSignature> {
        let mut lines = text.lines();
        let head = lines.next().ok_or(BadSignature("empty"))?;
        let rest = head
            .strip_prefix(MAGIC)
            .ok_or(BadSignature("unknown format"))?;
        let mut h = rest.split_whitespace();
        let bad = BadSignature("bad header");
        let block: u32 = h.next().and_then(|b| b.parse().ok()).ok_or(bad.clone())?;
        let size: u64 = h.next().and_then(|b| b.parse().ok()).ok_or(bad.clone())?;
        let sha256 = h
            .next()
            .filter(|s| s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit()))
            .ok_or(bad.clone())?
            .to_owned();
        if block == 0 {
            return Err(bad);
        }
        let mut blocks = Vec::with_capacity((size / u64::from(block)) as usize);
        for line in lines {
            let (w, st) = line.split_once(' ').ok_or(BadSignature("bad block line"))?;
            let w = u32::from_str_radix(w, 16).map_err(|_| BadSignature("bad weak sum"))?;
            let mut strong = [0u8; STRONG];
            hex::decode_to_slice(st, &mut strong).map_err(|_| BadSignature("bad strong hash"))?;
            blocks.push((w, strong));
        }
        if blocks.len() as u64 != size / u64::from(block) {
            return Err(BadSignature("truncated"));
        }
        Ok(Signature {
            sha256,
            size,
            block,
            blocks,
        })
    }

    /// How many of `other`'s blocks this signature also has (by strong
    /// hash, at any position): a cheap guess at how good a basis it is.
    pub fn shared_blocks(&self, other: &Signature) -> usize {
        if self.block != other.block {
            return 0;
        }
        let mine: std::collections::HashSet<&[u8; STRONG]> =
            self.blocks.iter().map(|(_, s)| s).collect();
        other
            .blocks
            .iter()
            .filter(|(_, s)| mine.contains(s))
            .count()
    }
}

/// Reads a whole image (the sender has it on local disk).
pub fn read_image(path: &Path) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

/// One step of rebuilding the new image, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `len` bytes of the basis from `offset`.
    Copy { offset: u64, len: u64 },
    /// The next `len` bytes of the pieces: the new image's bytes from
    /// `from` (where the sender takes them).
    Literal { from: u64, len: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub ops: Vec<Op>,
}

impl Delta {
    /// Bytes to send as pieces.
    pub fn literal_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|o| match o {
                Op::Literal { len, .. } => *len,
                Op::Copy { .. } => 0,
            })
            .sum()
    }

    /// Bytes taken from the basis.
    #[cfg(test)]
    pub fn copied_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|o| match o {
                Op::Copy { len, .. } => *len,
                Op::Literal { .. } => 0,
            })
            .sum()
    }

    /// The pieces: the literal ranges of `new`, in order.
    pub fn pieces<'a>(&'a self, new: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.ops.iter().filter_map(move |o| match *o {
            Op::Literal { from, len } => Some(&new[from as usize..(from + len) as usize]),
            Op::Copy { .. } => None,
        })
    }

    /// Rebuilds the new image from `basis` and the pieces: what the host's
    /// `dd`s do, for tests.
    #[cfg(test)]
    pub fn apply(&self, basis: &[u8], pieces: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut p = 0usize;
        for o in &self.ops {
            match *o {
                Op::Copy { offset, len } => {
                    out.extend_from_slice(&basis[offset as usize..(offset + len) as usize])
                }
                Op::Literal { len, .. } => {
                    out.extend_from_slice(&pieces[p..p + len as usize]);
                    p += len as usize;
                }
            }
        }
        out
    }
}

/// rsync's weak checksum: two 16-bit sums, rolled one byte at a time.
fn weak(b: &[u8]) -> u32 {
    let (mut a, mut s) = (0u32, 0u32);
    let n = b.len() as u32;
    for (i, &x) in b.iter().enumerate() {
        a = a.wrapping_add(u32::from(x));
        s = s.wrapping_add((n - i as u32).wrapping_mul(u32::from(x)));
    }
    (a & 0xffff) | (s << 16)
}

fn strong(b: &[u8]) -> [u8; STRONG] {
    let mut s = [0u8; STRONG];
    s.copy_from_slice(&blake3::hash(b).as_bytes()[..STRONG]);
    s
}

/// The ops that rebuild `new` from the image `basis` is a signature of.
pub fn diff(basis: &Signature, new: &[u8]) -> Delta {
    let b = basis.block as usize;
    let mut ops = Ops::default();
    if basis.blocks.is_empty() || new.len() < b {
        ops.literal(0, new.len() as u64);
        return Delta { ops: ops.done() };
    }
    // weak -> block indexes, and a bitmap of the weak sums' low bits that
    // turns most non-matches away before the map is asked.
    let mut by_weak: HashMap<u32, Vec<u32>> = HashMap::with_capacity(basis.blocks.len());
    let mut seen = vec![0u64; 1 << 14];
    for (i, (w, _)) in basis.blocks.iter().enumerate() {
        by_weak.entry(*w).or_default().push(i as u32);
        let k = (*w ^ (*w >> 20)) as usize & 0xf_ffff;
        seen[k >> 6] |= 1 << (k & 63);
    }
    let n = b as u32;
    let (mut a, mut s) = {
        let w = weak(&new[..b]);
        (w & 0xffff, w >> 16)
    };
    let mut i = 0usize; // window start
    let mut lit = 0usize; // start of pending literal bytes
    let mut next_block: Option<u32> = None; // the block after the last match
    loop {
        let w = (a & 0xffff) | (s << 16);
        let k = (w ^ (w >> 20)) as usize & 0xf_ffff;
        let mut hit = None;
        if seen[k >> 6] & (1 << (k & 63)) != 0 {
            if let Some(cands) = by_weak.get(&w) {
                let st = strong(&new[i..i + b]);
                // Prefer the block right after the last match: runs of
                // copies coalesce into one dd.
                hit = next_block
                    .filter(|nb| cands.contains(nb) && basis.blocks[*nb as usize].1 == st)
                    .or_else(|| {
                        cands
                            .iter()
                            .copied()
                            .find(|c| basis.blocks[*c as usize].1 == st)
                    });
            }
        }
        if let Some(blk) = hit {
            ops.literal(lit as u64, (i - lit) as u64);
            ops.copy(u64::from(blk) * u64::from(n), u64::from(n));
            next_block = Some(blk + 1);
            i += b;
            lit = i;
            if i + b > new.len() {
                break;
            }
            let w = weak(&new[i..i + b]);
            a = w & 0xffff;
            s = w >> 16;
            continue;
        }
        if i + b >= new.len() {
            break;
        }
        // Roll one byte: drop new[i], take new[i + b].
        let out = u32::from(new[i]);
        let inn = u32::from(new[i + b]);
        a = a.wrapping_sub(out).wrapping_add(inn) & 0xffff;
        s = s.wrapping_sub(n.wrapping_mul(out)).wrapping_add(a) & 0xffff;
        i += 1;
    }
    ops.literal(lit as u64, (new.len() - lit) as u64);
    Delta { ops: ops.done() }
}

/// Collects ops, merging neighbours: adjacent copies of adjacent basis
/// ranges become one, as do adjacent literals.
#[derive(Default)]
struct Ops(Vec<Op>);

impl Ops {
    fn copy(&mut self, offset: u64, len: u64) {
        if let Some(Op::Copy { offset: o, len: l }) = self.0.last_mut() {
            if *o + *l == offset {
                *l += len;
                return;
            }
        }
        self.0.push(Op::Copy { offset, len });
    }

    fn literal(&mut self, from: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(Op::Literal { from: f, len: l }) = self.0.last_mut() {
            if *f + *l == from {
                *l += len;
                return;
            }
        }
        self.0.push(Op::Literal { from, len });
    }

    fn done(self) -> Vec<Op> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes that do not repeat (xorshift).
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn roundtrip(basis: &[u8], new: &[u8], block: u32) -> Delta {
        let sig = Signature::of(basis, block);
        let d = diff(&sig, new);
        let pieces: Vec<u8> = d.pieces(new).flatten().copied().collect();
        assert_eq!(pieces.len() as u64, d.literal_bytes());
        assert_eq!(d.apply(basis, &pieces), new, "rebuilt image differs");
        assert_eq!(d.literal_bytes() + d.copied_bytes(), new.len() as u64);
        d
    }

    #[test]
    fn rolling_sum_equals_direct_sum() {
        let data = noise(5000, 7);
        let b = 512;
        let sig = Signature::of(&data[100..100 + b], b as u32);
        // The block sits at offset 100 of `data`: found by rolling.
        let d = diff(&sig, &data);
        assert!(
            d.ops.contains(&Op::Copy {
                offset: 0,
                len: 512
            }),
            "{:?}",
            d.ops
        );
    }

    #[test]
    fn identical_images_are_one_copy() {
        let data = noise(64 * 1024, 1);
        let d = roundtrip(&data, &data, 4096);
        assert_eq!(
            d.ops,
            [Op::Copy {
                offset: 0,
                len: 65536
            }]
        );
        assert_eq!(d.literal_bytes(), 0);
    }

    #[test]
    fn identical_with_a_short_tail_sends_only_the_tail() {
        let data = noise(10_000, 2);
        let d = roundtrip(&data, &data, 4096);
        assert_eq!(d.literal_bytes(), 10_000 - 8192);
        assert_eq!(d.ops.len(), 2);
    }

    #[test]
    fn shifted_data_is_found_at_its_new_offset() {
        let basis = noise(200 * 1024, 3);
        let mut new = noise(777, 4);
        new.extend_from_slice(&basis);
        let d = roundtrip(&basis, &new, 4096);
        assert_eq!(d.literal_bytes(), 777);
        assert_eq!(
            d.ops,
            [
                Op::Literal { from: 0, len: 777 },
                Op::Copy {
                    offset: 0,
                    len: 200 * 1024
                }
            ]
        );
    }

    #[test]
    fn a_changed_block_costs_about_one_block() {
        let basis = noise(100 * 4096, 5);
        let mut new = basis.clone();
        new[50 * 4096 + 10] ^= 0xff;
        let d = roundtrip(&basis, &new, 4096);
        assert_eq!(d.literal_bytes(), 4096);
        assert_eq!(d.ops.len(), 3);
    }

    #[test]
    fn an_insertion_in_the_middle_costs_its_bytes_and_a_block() {
        let basis = noise(100 * 4096, 6);
        let mut new = basis[..30_000].to_vec();
        new.extend_from_slice(&noise(1000, 9));
        new.extend_from_slice(&basis[30_000..]);
        let d = roundtrip(&basis, &new, 4096);
        assert!(
            d.literal_bytes() <= 1000 + 2 * 4096,
            "{}",
            d.literal_bytes()
        );
    }

    #[test]
    fn an_empty_basis_sends_everything() {
        let new = noise(9000, 8);
        let d = roundtrip(&[], &new, 4096);
        assert_eq!(d.ops, [Op::Literal { from: 0, len: 9000 }]);
        let d = roundtrip(&new, &[], 4096);
        assert!(d.ops.is_empty());
    }

    #[test]
    fn repeated_blocks_copy_in_runs() {
        // Zeros: every block has the same sums; the run stays one copy.
        let basis = vec![0u8; 16 * 4096];
        let d = roundtrip(&basis, &basis, 4096);
        assert_eq!(d.ops.len(), 1, "{:?}", d.ops);
    }

    #[test]
    fn signature_text_round_trips_and_refuses_damage() {
        let data = noise(20_000, 10);
        let sig = Signature::of(&data, 4096);
        let text = sig.to_text();
        assert_eq!(Signature::parse(&text).unwrap(), sig);
        let cut: String = text.lines().take(3).collect::<Vec<_>>().join("\n");
        assert_eq!(Signature::parse(&cut), Err(BadSignature("truncated")));
        assert!(Signature::parse("attache-signature 9 1 2 x").is_err());
        assert!(Signature::parse("").is_err());
        assert_eq!(sig.shared_blocks(&sig), 4);
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_size(0), 2048);
        assert_eq!(block_size(100 << 20), 16384);
        assert_eq!(block_size(35 << 20), 8192);
        assert_eq!(block_size(1 << 40), 65536);
    }
}
