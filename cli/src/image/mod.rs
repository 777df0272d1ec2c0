//! Packing an [`ImageSpec`](crate::spec::ImageSpec) into a squashfs portable
//! image, and reading one back (`attache inspect`).
//!
//! # API
//!
//! - [`pack`]`(spec, &`[`PackOptions`]`, out_dir, &mut on_event) -> Result<`[`Image`]`, `[`ImageError`]`>`
//!   writes `out_dir/NAME_VERSION.raw` (a temporary file in `out_dir`,
//!   renamed when complete; removed on any error) and returns its path,
//!   sha256 and size. `on_event` receives [`PackEvent`]s for a progress bar.
//! - `check_layout(spec)` (tests only) does all the checks of `pack` without writing:
//!   symlink targets of 256 bytes or more, sockets/FIFOs/devices in the store,
//!   unreadable files, colliding paths, bad image symlinks, bad unit names,
//!   os-release values that cannot be written.
//! - [`inspect`]`(path) -> Result<Inspection, `[`ImageError`]`>` reads an
//!   image: os-release, units with their `ExecStart=`, store paths, size,
//!   compression, sha256 and the `problems` portabled would refuse.
//! - [`read_manifest`]`(path) -> Result<Option<`[`Manifest`]`>, `[`ImageError`]`>`
//!   reads the manifest every image carries at [`MANIFEST_PATH`] (`None`
//!   for images packed before manifests).
//!   `bounds` first checks that what backhand would load from the image
//!   fits the file and fixed limits, so a crafted image costs little memory.
//! - [`Compression`] parses and prints `zstd`, `xz`, `gzip`.
//!
//! # Layout
//!
//! Root `0755`; dirs `proc sys dev run tmp var var/{tmp,lib,cache,log} etc
//! etc/systemd/system usr/lib nix/store` (`tmp`, `var/tmp` mode `1777`); empty
//! `etc/resolv.conf`, `etc/machine-id`; identical `etc/os-release` and
//! `usr/lib/os-release`; the manifest in `usr/lib/attache/manifest.json`; units as regular files in `etc/systemd/system`;
//! store paths under `nix/store` (files `0444`/`0555`, dirs `0555`, symlinks
//! verbatim); the spec's extra symlinks. Everything is owned by root, has
//! mtime 0, and entries are sorted, so the same spec gives the same bytes on
//! any machine and day.
//!
//! # Writing
//!
//! attache writes the squashfs itself ([`writer`], format in [`sqfs`]);
//! backhand is used only to read images back. Each file is read once;
//! duplicates (hard links, or same size and BLAKE3, small files included)
//! are found before compressing and share the first copy's data; a store
//! path's small files fill fragment blocks of their own, so an upgrade that
//! changes one store path leaves the others' bytes as they were (what a
//! delta upgrade relies on); blocks are
//! compressed on all cores and written in a fixed order, so the image is the
//! same byte for byte whatever the number of threads. Memory stays at a few
//! blocks per thread plus the metadata tables. Measured against mksquashfs in
//! `cli/benches/RESULTS.md`.

mod bounds;
mod compress;
mod error;
mod inspect;
mod layout;
mod manifest;
mod pack;
mod sqfs;
mod writer;

#[cfg(test)]
mod tests;

pub use compress::Compression;
pub use error::ImageError;
#[cfg(test)]
pub use inspect::UnitInfo;
pub use inspect::{inspect, Inspection};
#[cfg(test)]
pub use layout::check_layout;
#[cfg(test)]
pub use manifest::ManifestUnit;
pub use manifest::{read as read_manifest, Manifest, StorePath, MANIFEST_PATH};
// For benches/packbench.rs, which includes this module.
pub(crate) use pack::hash_file;
#[allow(unused_imports)]
pub(crate) use pack::pack_with_stats;
pub use pack::{pack, Image, PackEvent, PackOptions};
