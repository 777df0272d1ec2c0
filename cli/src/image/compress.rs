//! Compressor choice and block compression.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use std::io;

use flate2::{Compress, FlushCompress};
use liblzma_sys as lzma;

use super::error::ImageError;

/// Compressor of the squashfs image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// zstd, level 3 unless told otherwise: fast, and what attache uses by default.
    #[default]
    Zstd,
    /// xz (LZMA2), level 6 unless told, with a dictionary of one block up to
    /// 512 KiB. nixpkgs' `portableService` uses `mksquashfs -comp xz
    /// -Xdict-size 100%`; at 1 MiB blocks the smaller dictionary makes
    /// images about 0.2 % larger and halves the encoder's memory (about
    /// 12 MB per core at 1 MiB, 6.5 MB at 512 KiB).
    Xz,
    /// zlib, level 9 unless told, like mksquashfs' default.
    Gzip,
}

impl Compression {
    /// The level used when [`super::PackOptions::level`] is `None`.
    pub fn default_level(self) -> u32 {
        match self {
            Compression::Zstd => 3,
            Compression::Xz => 6,
            Compression::Gzip => 9,
        }
    }

    /// Accepted levels.
    pub fn levels(self) -> std::ops::RangeInclusive<u32> {
        match self {
            Compression::Zstd => 1..=22,
            Compression::Xz => 0..=9,
            Compression::Gzip => 1..=9,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "zstd" => Ok(Compression::Zstd),
            "xz" => Ok(Compression::Xz),
            "gzip" | "zlib" => Ok(Compression::Gzip),
            _ => Err(ImageError::UnknownCompression(s.to_owned())),
        }
    }
}

/// Checks `level` for `compression` (`None`: the default level).
pub(crate) fn check_level(compression: Compression, level: Option<u32>) -> Result<u32, ImageError> {
    let level = level.unwrap_or(compression.default_level());
    if !compression.levels().contains(&level) {
        let r = compression.levels();
        return Err(ImageError::BadOptions(format!(
            "{compression} level {level} is out of range; use {}..={}",
            r.start(),
            r.end()
        )));
    }
    Ok(level)
}

thread_local! {
    static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static ZLIB: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    static XZ: RefCell<Option<XzEncoder>> = const { RefCell::new(None) };
}

fn io_err(e: impl fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// What to compress blocks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Codec {
    pub(crate) compression: Compression,
    pub(crate) level: u32,
    pub(crate) block_size: u32,
}

impl Codec {
    /// The xz dictionary: a block, at most 512 KiB (see [`Compression::Xz`]).
    /// Both are powers of two, as squashfs' xz options require.
    pub(crate) fn xz_dict_size(&self) -> u32 {
        self.block_size.min(XZ_DICT_MAX)
    }
}

const XZ_DICT_MAX: u32 = 512 << 10;

/// Compresses one block (data, fragment or metadata). A pure function of its
/// arguments, whatever thread runs it. Compression contexts are reused per
/// thread.
pub(crate) fn compress_block(bytes: &[u8], codec: &Codec) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    compress_into(bytes, codec, &mut out)?;
    Ok(out)
}

/// [`compress_block`] into `out` (emptied first, grown if too small), so
/// the caller can reuse its buffers.
pub(crate) fn compress_into(bytes: &[u8], codec: &Codec, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    match codec.compression {
        Compression::Zstd => {
            let level = codec.level as i32;
            ZSTD.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                    *slot = Some((level, zstd::bulk::Compressor::new(level).map_err(io_err)?));
                }
                let (_, c) = slot.as_mut().expect("set above");
                out.reserve(zstd::zstd_safe::compress_bound(bytes.len()));
                c.compress_to_buffer(bytes, out).map(drop).map_err(io_err)
            })
        }
        Compression::Gzip => ZLIB.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != codec.level) {
                let c =
                    Compress::new_with_window_bits(flate2::Compression::new(codec.level), true, 15);
                *slot = Some((codec.level, c));
            }
            let (_, c) = slot.as_mut().expect("set above");
            c.reset();
            out.reserve(bytes.len() + bytes.len() / 1000 + 64);
            loop {
                let consumed = c.total_in() as usize;
                let status = c
                    .compress_vec(&bytes[consumed..], out, FlushCompress::Finish)
                    .map_err(io_err)?;
                if status == flate2::Status::StreamEnd {
                    return Ok(());
                }
                out.reserve(out.capacity().max(4096));
            }
        }),
        Compression::Xz => XZ.with(|cell| {
            let mut slot = cell.borrow_mut();
            let enc = match slot.as_mut() {
                Some(enc) => enc,
                None => slot.insert(XzEncoder::new()),
            };
            enc.compress(bytes, codec.level, codec.xz_dict_size(), out)
        }),
    }
}

/// An xz stream encoder that lives as long as its thread and is set up anew
/// for every block. liblzma then reuses its match finder (about 12 MB at a
/// 1 MiB dictionary); a fresh `liblzma::stream::Stream` per block freed and
/// allocated it every time, which fragmented the heap and cost about 10 MB
/// of peak memory with two workers. The safe crate cannot re-initialise a
/// stream, hence the raw calls.
struct XzEncoder {
    strm: lzma::lzma_stream,
}

impl XzEncoder {
    fn new() -> Self {
        // SAFETY: all-zero is `LZMA_STREAM_INIT`, an unused stream.
        XzEncoder {
            strm: unsafe { std::mem::zeroed() },
        }
    }

    /// One xz stream (CRC32 check, LZMA2 at preset `level` with a dictionary
    /// of `dict_size`), as mksquashfs writes for every block.
    fn compress(
        &mut self,
        bytes: &[u8],
        level: u32,
        dict_size: u32,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        // SAFETY: zeroed options are filled by `lzma_lzma_preset` before use.
        let mut opts: lzma::lzma_options_lzma = unsafe { std::mem::zeroed() };
        // SAFETY: `opts` is a valid, writable `lzma_options_lzma`.
        if unsafe { lzma::lzma_lzma_preset(&mut opts, level) } != 0 {
            return Err(io_err(format!("xz preset {level} is not supported")));
        }
        opts.dict_size = dict_size;
        let filters = [
            lzma::lzma_filter {
                id: lzma::LZMA_FILTER_LZMA2,
                options: (&mut opts as *mut lzma::lzma_options_lzma).cast(),
            },
            lzma::lzma_filter {
                id: lzma::LZMA_VLI_UNKNOWN,
                options: std::ptr::null_mut(),
            },
        ];
        // SAFETY: `strm` is either zeroed or was set up by an earlier call;
        // the filter chain is terminated and its options outlive the call
        // (the encoder copies them).
        let ret = unsafe {
            lzma::lzma_stream_encoder(&mut self.strm, filters.as_ptr(), lzma::LZMA_CHECK_CRC32)
        };
        if ret != lzma::LZMA_OK {
            return Err(io_err(format!(
                "xz encoder setup failed (liblzma code {ret})"
            )));
        }
        // SAFETY: a pure function of its argument.
        let bound = unsafe { lzma::lzma_stream_buffer_bound(bytes.len()) };
        out.clear();
        out.reserve(bound);
        self.strm.next_in = bytes.as_ptr();
        self.strm.avail_in = bytes.len();
        self.strm.next_out = out.as_mut_ptr();
        self.strm.avail_out = out.capacity();
        // SAFETY: `next_in`/`avail_in` describe `bytes` and `next_out`/
        // `avail_out` the spare capacity of `out`, both alive for the call.
        let ret = unsafe { lzma::lzma_code(&mut self.strm, lzma::LZMA_FINISH) };
        let written = out.capacity() - self.strm.avail_out;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        // The buffer holds the worst case, so one call finishes the stream.
        if ret != lzma::LZMA_STREAM_END {
            return Err(io_err(format!(
                "xz compression failed (liblzma code {ret})"
            )));
        }
        // SAFETY: liblzma initialised the first `written` bytes.
        unsafe { out.set_len(written) };
        Ok(())
    }
}

impl Drop for XzEncoder {
    fn drop(&mut self) {
        // SAFETY: `strm` was zeroed or set up by liblzma; `lzma_end` accepts both.
        unsafe { lzma::lzma_end(&mut self.strm) };
    }
}
