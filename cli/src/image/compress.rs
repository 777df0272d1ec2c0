//! Compressor choice and block compression.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use std::io;

use flate2::{Compress, FlushCompress};
use liblzma::stream::{Action, Check, Filters, LzmaOptions, Stream};

use super::error::ImageError;

/// Compressor of the squashfs image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// zstd, level 3 unless told otherwise: fast, and what attache uses by default.
    #[default]
    Zstd,
    /// xz (LZMA2) with a dictionary of one block, like `mksquashfs -comp xz
    /// -Xdict-size 100%` (nixpkgs' `portableService` default); level 6 unless told.
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

/// Compresses one block (data, fragment or metadata). A pure function of its
/// arguments, whatever thread runs it. Compression contexts are reused per
/// thread.
pub(crate) fn compress_block(bytes: &[u8], codec: &Codec) -> io::Result<Vec<u8>> {
    match codec.compression {
        Compression::Zstd => {
            let level = codec.level as i32;
            ZSTD.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                    *slot = Some((level, zstd::bulk::Compressor::new(level).map_err(io_err)?));
                }
                let (_, c) = slot.as_mut().expect("set above");
                c.compress(bytes).map_err(io_err)
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
            let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 1000 + 64);
            loop {
                let consumed = c.total_in() as usize;
                let status = c
                    .compress_vec(&bytes[consumed..], &mut out, FlushCompress::Finish)
                    .map_err(io_err)?;
                if status == flate2::Status::StreamEnd {
                    return Ok(out);
                }
                out.reserve(out.capacity().max(4096));
            }
        }),
        Compression::Xz => {
            let mut opts = LzmaOptions::new_preset(codec.level).map_err(io_err)?;
            opts.dict_size(codec.block_size);
            let mut filters = Filters::new();
            filters.lzma2(&opts);
            let mut stream = Stream::new_stream_encoder(&filters, Check::Crc32).map_err(io_err)?;
            let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 2 + 1024);
            loop {
                let consumed = stream.total_in() as usize;
                let status = stream
                    .process_vec(&bytes[consumed..], &mut out, Action::Finish)
                    .map_err(io_err)?;
                if status == liblzma::stream::Status::StreamEnd {
                    return Ok(out);
                }
                out.reserve(out.capacity().max(4096));
            }
        }
    }
}
