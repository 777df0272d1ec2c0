//! End-to-end suite: real nix, real images, real systemd hosts.
// Tests report measurements and notes on stderr on purpose.
#![allow(clippy::print_stderr)]

mod build;
mod busy_host;
mod delta;
mod deploy;
mod edges;
mod faults;
mod lab_smoke;
mod nix_build;
mod observe;
mod publish;
mod pull;
mod readme;
mod settings;
mod support;
