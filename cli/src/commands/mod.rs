//! One file per command. A command turns validated arguments into calls of
//! the stages (`build`, `image`, `deploy`, …) and hands their results to the
//! UI; it parses nothing and owns no stage logic. The clap types of `cli`
//! stop here: nothing below a command takes them.

mod agent;
mod build;
mod deploy;
mod deploy_pull;
mod detach;
mod diff;
mod hosts;
mod inspect;
mod logs;
mod pack_spec;
mod publish;
mod rollback;
mod status;
mod unlock;

use clap::CommandFactory;

use crate::cli::{Cli, ColorChoice, Command, Global};
use crate::error::Error;
use crate::ui::{self, Ui, Verbosity};

/// The output flags, as the UI takes them.
pub fn ui_settings(g: &Global) -> ui::Settings {
    ui::Settings {
        json: g.json,
        verbosity: if g.quiet {
            Verbosity::Quiet
        } else if g.verbose > 0 {
            Verbosity::Verbose
        } else {
            Verbosity::Normal
        },
        color: match g.color {
            ColorChoice::Auto => ui::Color::Auto,
            ColorChoice::Always => ui::Color::Always,
            ColorChoice::Never => ui::Color::Never,
        },
    }
}

pub fn run(command: Command, ui: &Ui) -> Result<(), Error> {
    match command {
        Command::Build(args) => build::run(&args, ui),
        Command::Deploy(args) => deploy::run(&args, ui),
        Command::Publish(args) => publish::run(&args, ui),
        Command::Status(args) => status::run(&args, ui),
        Command::Rollback(args) => rollback::run(&args, ui),
        Command::Detach(args) => detach::run(&args, ui),
        Command::Unlock(args) => unlock::run(&args, ui),
        Command::Inspect(args) => inspect::run(&args, ui),
        Command::Diff(args) => diff::run(&args, ui),
        Command::Logs(args) => logs::run(&args, ui),
        Command::PackSpec(args) => pack_spec::run(&args, ui),
        Command::Agent(args) => agent::run(&args, ui),
        Command::Completions(args) => {
            let mut buf = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "attache", &mut buf);
            ui.raw(&buf);
            Ok(())
        }
        Command::Man(_) => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut buf)
                .map_err(|e| Error::io("rendering the man page", e))?;
            ui.raw(&buf);
            Ok(())
        }
    }
}
