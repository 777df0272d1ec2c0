//! `attache agent` (hidden): one pull on a pull host, run by
//! attache-pull.service. Its outcome is the state file; the unit fails only
//! when the agent could not read its config or write its state.

use crate::cli::AgentArgs;
use crate::error::Error;
use crate::pull::agent;
use crate::ui::Ui;

pub fn run(args: &AgentArgs, ui: &Ui) -> Result<(), Error> {
    let last = agent::run(&args.config)?;
    ui.status(last.outcome.as_str(), &last.why);
    Ok(())
}
