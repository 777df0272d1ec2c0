//! attache: Nix -> systemd portable services.
//!
//! The pipeline, one module a stage: `nix` (evaluate and build with the
//! user's nix) -> `spec` (what goes into the image, checked against
//! portabled's rules) -> `image` (squashfs, reproducible) -> `remote` (one
//! SSH connection per host) -> `deploy` (push, attach, health, rollback);
//! `inventory` says which hosts; `diff` compares two images' manifests;
//! `publish` writes a directory pull hosts fetch from. `cli` parses,
//! `commands` (one file per command) calls the stages, `ui` owns the
//! terminal, `error` maps failures to exit codes. This file only parses and
//! dispatches.

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
#[cfg(test)]
mod shellcheck;
mod spec;
mod ui;

use clap::Parser;

use cli::Cli;
use error::ExitCode;
use ui::Ui;

fn main() -> std::process::ExitCode {
    // clap's own exit code for a mistyped flag is 2, which here means "the
    // environment failed": a usage error is bad input (1). Help and
    // --version still exit 0.
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() {
            ExitCode::BadInput as i32
        } else {
            0
        })
    });
    let ui = Ui::terminal(commands::ui_settings(&cli.global));
    match commands::run(cli.command, &ui) {
        Ok(()) => std::process::ExitCode::from(ExitCode::Ok as u8),
        Err(e) => {
            ui.error(&e);
            std::process::ExitCode::from(e.exit_code() as u8)
        }
    }
}
