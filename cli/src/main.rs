//! attache: Nix -> systemd portable services.
//!
//! The pipeline, one module a stage: `nix` (evaluate and build with the
//! user's nix) -> `spec` (what goes into the image, checked against
//! portabled's rules) -> `image` (squashfs, reproducible) -> `remote` (one
//! SSH connection per host) -> `deploy` (push, attach, health, rollback);
//! `inventory` says which hosts, `fleet` runs many. `ui` owns the terminal;
//! `error` maps failures to exit codes.

mod build;
mod cli;
mod deploy;
mod error;
mod fleet;
mod image;
mod inspect;
mod inventory;
mod names;
mod nix;
mod remote;
mod spec;
mod ui;

use clap::{CommandFactory, Parser};

use cli::{Cli, Command};
use error::{Error, ExitCode};
use ui::Ui;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let ui = Ui::new(&cli.global);
    match run(cli.command, &ui) {
        Ok(()) => std::process::ExitCode::from(ExitCode::Ok as u8),
        Err(e) => {
            ui.error(&e);
            std::process::ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(command: Command, ui: &Ui) -> Result<(), Error> {
    match command {
        Command::Build(args) => {
            let built = build::run(&args, ui)?;
            let json = serde_json::to_value(&built).unwrap_or_default();
            let human = if args.dry_run {
                String::new()
            } else {
                format!("{}\nsha256 {}", built.path.display(), built.sha256)
            };
            ui.result(&json, &human);
        }
        Command::Deploy(args) => fleet::deploy(&args, ui)?,
        Command::Status(args) => fleet::status(&args, ui)?,
        Command::Rollback(args) => fleet::rollback(&args, ui)?,
        Command::Detach(args) => fleet::detach(&args, ui)?,
        Command::Inspect(args) => inspect::run(&args, ui)?,
        Command::Completions(args) => {
            let mut buf = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "attache", &mut buf);
            ui.raw(&buf);
        }
        Command::Man(_) => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut buf)
                .map_err(|e| Error::io("rendering the man page", e))?;
            ui.raw(&buf);
        }
    }
    Ok(())
}
