// Temporary while the image module lands; see /tmp/main.rs.full.
#![allow(dead_code)]
mod cli;
mod image;
mod nix;
mod spec;
mod ui;

fn main() {}
