//! End-to-end suite: real nix, real images, real systemd hosts.

mod build;
mod deploy;
mod lab_smoke;
mod support;
