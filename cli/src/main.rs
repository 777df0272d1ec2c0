//! attache: Nix -> systemd portable services.
//!
//! The pipeline, one module a stage: `nix` (evaluate and build with the
//! user's nix) -> `spec` (what goes into the image, checked against
//! portabled's rules) -> `image` (squashfs, reproducible) -> `remote` (one
//! SSH connection per host) -> `deploy` (push, attach, health, rollback);
//! `inventory` says which hosts; `diff` compares two images' manifests. `cli` parses, `commands` (one file per
//! command) calls the stages, `ui` owns the terminal, `error` maps failures
//! to exit codes. This file only parses and dispatches.

mod build;
mod cache;
mod cli;
mod commands;
mod delta;
mod deploy;
mod diff;
mod error;
mod image;
mod inventory;
mod names;
mod nix;
mod publish;
mod pull;
mod remote;
mod spec;
mod ui;

use clap::Parser;

use cli::Cli;
use error::ExitCode;
use ui::Ui;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let ui = Ui::terminal(commands::ui_settings(&cli.global));
    match commands::run(cli.command, &ui) {
        Ok(()) => std::process::ExitCode::from(ExitCode::Ok as u8),
        Err(e) => {
            ui.error(&e);
            std::process::ExitCode::from(e.exit_code() as u8)
        }
    }
}
