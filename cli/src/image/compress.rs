//! Compressor choice, and the compression hook handed to backhand.

use std::fmt;
use std::str::FromStr;

use backhand::compression::{
    CompressionAction, CompressionOptions, Compressor, DefaultCompressor, Gzip, Xz, Zstd,
};
use backhand::{BackhandError, CompressionExtra, ExtraXz, FilesystemCompressor, SuperBlock};

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

/// The compression hook given to backhand (it needs a `'static` one).
pub(crate) struct PackCompressor;

pub(crate) static PACK_COMPRESSOR: PackCompressor = PackCompressor;

/// Compresses one block exactly as the single-threaded writer would.
pub(crate) fn compress_block(
    bytes: &[u8],
    fc: FilesystemCompressor,
    block_size: u32,
) -> Result<Vec<u8>, BackhandError> {
    DefaultCompressor.compress(bytes, fc, block_size)
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
        compress_block(bytes, fc, block_size)
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
