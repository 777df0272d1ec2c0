//! Packing an [`ImageSpec`](crate::spec::ImageSpec) into a squashfs portable
//! image, and reading one back (`attache inspect`).
