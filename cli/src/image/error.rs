//! Errors of the image packer and reader: one user sentence each, with a hint.

use std::path::PathBuf;

/// Why packing or inspecting an image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "cannot read {path}: {source} (check that the path exists and is readable by this user)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "cannot write {path}: {source} (check free space and permissions of the output directory)"
    )]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{path} changed while it was being packed (expected {expected} bytes, read {actual}); \
         store paths must not change during a build, run the command again"
    )]
    Changed {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error(
        "{path} changed while it was being packed; store paths must not change during a build, \
         run the command again"
    )]
    Unstable { path: PathBuf },

    #[error(
        "the symlink {path} has a target of {len} bytes; squashfs images written by attache \
         support targets of at most 255 bytes (shorten the link target)"
    )]
    SymlinkTooLong { path: String, len: usize },

    #[error(
        "{path} is a {kind}; a portable image can only contain files, directories and symlinks \
         (remove it from the store path or from the closure)"
    )]
    SpecialFile { path: PathBuf, kind: &'static str },

    #[error("invalid image symlink {path:?}: {reason}")]
    BadSymlink { path: String, reason: String },

    #[error("{path} is defined twice in the image ({what}); remove one of them")]
    Collision { path: String, what: String },

    #[error("invalid unit {name:?}: {reason}")]
    BadUnit { name: String, reason: String },

    #[error("invalid store path {path}: {reason}")]
    BadStorePath { path: PathBuf, reason: String },

    #[error("invalid os-release entry {key:?}: {reason}")]
    BadOsRelease { key: String, reason: String },

    #[error("invalid image name {name:?}: {reason}")]
    BadName { name: String, reason: String },

    #[error("invalid pack options: {0}")]
    BadOptions(String),

    #[error("unknown compression {0:?}; use one of zstd, xz, gzip")]
    UnknownCompression(String),

    #[error("{path} is not a squashfs image (no squashfs magic at its start); give the path of a .raw image built by attache or mksquashfs")]
    NotSquashfs { path: PathBuf },

    #[error("{path} is a damaged or unsupported squashfs image: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error("the squashfs writer failed: {0} (this is a bug in attache, please report it)")]
    Writer(String),
}
