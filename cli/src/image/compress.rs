//! Compressor choice, and the compression hook handed to backhand.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use backhand::compression::{
    CompressionAction, CompressionOptions, Compressor, DefaultCompressor, Gzip, Xz, Zstd,
};
use backhand::{BackhandError, CompressionExtra, ExtraXz, FilesystemCompressor, SuperBlock};

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

/// Backhand's compressor description for `compression` at `level` (checked).
pub(crate) fn fs_compressor(
    compression: Compression,
    level: Option<u32>,
    block_size: u32,
) -> Result<FilesystemCompressor, ImageError> {
    let level = level.unwrap_or(compression.default_level());
    if !compression.levels().contains(&level) {
        let r = compression.levels();
        return Err(ImageError::BadOptions(format!(
            "{compression} level {level} is out of range; use {}..={}",
            r.start(),
            r.end()
        )));
    }
    let invalid = |e: BackhandError| ImageError::BadOptions(e.to_string());
    let fc = match compression {
        Compression::Zstd => FilesystemCompressor::new(
            Compressor::Zstd,
            Some(CompressionOptions::Zstd(Zstd {
                compression_level: level,
            })),
        )
        .map_err(invalid)?,
        Compression::Gzip => FilesystemCompressor::new(
            Compressor::Gzip,
            Some(CompressionOptions::Gzip(Gzip {
                compression_level: level,
                window_size: 15,
                strategies: 0,
            })),
        )
        .map_err(invalid)?,
        Compression::Xz => {
            let mut fc = FilesystemCompressor::new(
                Compressor::Xz,
                Some(CompressionOptions::Xz(Xz {
                    dictionary_size: block_size,
                    filters: backhand::v4::compressor::XzFilter::new(0),
                    bit_opts: None,
                    fb: None,
                })),
            )
            .map_err(invalid)?;
            let mut extra = ExtraXz::default();
            extra.level(level).map_err(invalid)?;
            fc.extra(CompressionExtra::Xz(extra)).map_err(invalid)?;
            fc
        }
    };
    Ok(fc)
}

/// The compression hook given to backhand (it needs a `'static` one). Blocks
/// that the pipeline of [`super::parallel`] compressed ahead come from there;
/// anything else is compressed here, on the writer's thread.
pub(crate) struct PackCompressor;

pub(crate) static PACK_COMPRESSOR: PackCompressor = PackCompressor;

thread_local! {
    static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static ZLIB: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
}

fn io_err(e: impl fmt::Display) -> BackhandError {
    BackhandError::StdIo(std::io::Error::other(e.to_string()))
}

/// What to compress blocks with (backhand's `FilesystemCompressor` keeps
/// its fields private, so the hook gets this through [`with_codec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Codec {
    pub(crate) compression: Compression,
    pub(crate) level: u32,
    pub(crate) block_size: u32,
}

thread_local! {
    static CODEC: RefCell<Option<Codec>> = const { RefCell::new(None) };
}

/// Runs `body` with `codec` as the compressor of [`PACK_COMPRESSOR`] on this thread.
pub(crate) fn with_codec<R>(codec: Codec, body: impl FnOnce() -> R) -> R {
    struct Reset(Option<Codec>);
    impl Drop for Reset {
        fn drop(&mut self) {
            CODEC.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let _reset = Reset(CODEC.with(|c| c.borrow_mut().replace(codec)));
    body()
}

/// Compresses one block. A pure function of its arguments: the pipeline and
/// the writer's thread give the same bytes. Compression contexts are reused
/// per thread (backhand's default builds a new one, and for xz two threads,
/// per block).
pub(crate) fn compress_block(bytes: &[u8], codec: &Codec) -> Result<Vec<u8>, BackhandError> {
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

impl CompressionAction for PackCompressor {
    type Error = BackhandError;
    type Compressor = Compressor;
    type FilesystemCompressor = FilesystemCompressor;
    type SuperBlock = SuperBlock;

    fn decompress(
        &self,
        bytes: &[u8],
        out: &mut Vec<u8>,
        compressor: Self::Compressor,
    ) -> Result<(), Self::Error> {
        DefaultCompressor.decompress(bytes, out, compressor)
    }

    fn compress(
        &self,
        bytes: &[u8],
        fc: Self::FilesystemCompressor,
        block_size: u32,
    ) -> Result<Vec<u8>, Self::Error> {
        if let Some(result) = super::parallel::take_ahead(bytes) {
            return result;
        }
        match CODEC.with(|c| *c.borrow()) {
            Some(codec) => compress_block(bytes, &codec),
            None => DefaultCompressor.compress(bytes, fc, block_size),
        }
    }

    fn compression_options(
        &self,
        superblock: &mut Self::SuperBlock,
        kind: &backhand::kind::Kind,
        fs_compressor: Self::FilesystemCompressor,
    ) -> Result<Option<Vec<u8>>, Self::Error> {
        DefaultCompressor.compression_options(superblock, kind, fs_compressor)
    }
}
