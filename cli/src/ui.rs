//! The one owner of stdout and stderr.
//!
//! Results go to stdout (JSON with `--json`, a short human line otherwise);
//! everything else (stage lines, warnings, errors, progress) goes to stderr.
//! Progress bars are drawn only on a terminal; elsewhere each stage change is
//! one plain line, so CI logs stay readable.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{ColorChoice, Global};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

#[derive(Debug, Clone)]
pub struct Ui {
    pub json: bool,
    pub verbosity: Verbosity,
    color: bool,
    stderr_tty: bool,
}

impl Ui {
    pub fn new(g: &Global) -> Self {
        let stderr_tty = std::io::stderr().is_terminal();
        let color = match g.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => stderr_tty && std::env::var_os("NO_COLOR").is_none(),
        };
        let verbosity = if g.quiet {
            Verbosity::Quiet
        } else if g.verbose > 0 {
            Verbosity::Verbose
        } else {
            Verbosity::Normal
        };
        Ui {
            json: g.json,
            verbosity,
            color,
            stderr_tty,
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    /// A cargo-style stage line: `   Building .#demo`.
    pub fn status(&self, verb: &str, msg: impl std::fmt::Display) {
        if self.verbosity >= Verbosity::Normal {
            eprintln!("{} {msg}", self.paint("1;32", &format!("{verb:>12}")));
        }
    }

    pub fn verbose(&self, msg: impl std::fmt::Display) {
        if self.verbosity >= Verbosity::Verbose {
            eprintln!("{} {msg}", self.paint("2", &format!("{:>12}", "debug")));
        }
    }

    pub fn warn(&self, msg: impl std::fmt::Display) {
        if self.verbosity >= Verbosity::Normal {
            eprintln!("{} {msg}", self.paint("1;33", "warning:"));
        }
    }

    /// The one sentence a failed command ends with.
    pub fn error(&self, msg: impl std::fmt::Display) {
        eprintln!("{} {msg}", self.paint("1;31", "error:"));
    }

    /// The command's result: JSON on stdout with `--json`, else the human
    /// lines. A closed pipe is not an error worth reporting.
    pub fn result(&self, json: &serde_json::Value, human: &str) {
        let mut out = std::io::stdout().lock();
        let text = if self.json {
            serde_json::to_string_pretty(json).unwrap_or_default()
        } else {
            human.trim_end().to_owned()
        };
        if !text.is_empty() {
            let _ = writeln!(out, "{text}");
        }
    }

    /// Raw bytes to stdout (completions, man page).
    pub fn raw(&self, bytes: &[u8]) {
        let _ = std::io::stdout().lock().write_all(bytes);
    }

    pub fn progress_enabled(&self) -> bool {
        self.stderr_tty && self.verbosity == Verbosity::Normal && std::env::var_os("CI").is_none()
    }

    /// A byte progress bar on a terminal, or nothing (the caller prints
    /// stage lines instead).
    pub fn bytes_bar(&self, total: u64, prefix: &str) -> Option<ProgressBar> {
        if !self.progress_enabled() {
            return None;
        }
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{prefix:>12.cyan.bold} [{bar:30}] {bytes}/{total_bytes} {msg} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(prefix.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(bar)
    }
}

/// Per-host progress of a deploy: one bar per host on a terminal, one plain
/// line per stage change elsewhere. Cheap to clone; safe to use from tasks.
#[derive(Clone)]
pub struct DeployView {
    inner: std::sync::Arc<ViewInner>,
}

struct ViewInner {
    ui: Ui,
    multi: Option<indicatif::MultiProgress>,
    bars: std::sync::Mutex<std::collections::BTreeMap<String, ProgressBar>>,
    /// A spinner and the stage; with bytes and rate while uploading.
    stage_style: ProgressStyle,
    push_style: ProgressStyle,
}

impl DeployView {
    pub fn new(ui: &Ui, hosts: &[String]) -> Self {
        let multi = ui.progress_enabled().then(indicatif::MultiProgress::new);
        let width = hosts.iter().map(String::len).max().unwrap_or(4);
        let style = |t: &str| {
            ProgressStyle::with_template(&format!("{{prefix:>{width}.bold}} {{spinner}} {t}"))
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ")
        };
        let stage_style = style("{msg}");
        let push_style = style("{msg} [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec}");
        let mut bars = std::collections::BTreeMap::new();
        if let Some(m) = &multi {
            for h in hosts {
                let bar = m.add(ProgressBar::new(0));
                bar.set_style(stage_style.clone());
                bar.set_prefix(h.clone());
                bar.set_message("waiting");
                bar.enable_steady_tick(Duration::from_millis(200));
                bars.insert(h.clone(), bar);
            }
        }
        DeployView {
            inner: std::sync::Arc::new(ViewInner {
                ui: ui.clone(),
                multi,
                bars: std::sync::Mutex::new(bars),
                stage_style,
                push_style,
            }),
        }
    }

    fn with_bar(&self, host: &str, f: impl FnOnce(&ProgressBar)) -> bool {
        if self.inner.multi.is_none() {
            return false;
        }
        if let Ok(bars) = self.inner.bars.lock() {
            if let Some(b) = bars.get(host) {
                f(b);
            }
        }
        true
    }

    pub fn stage(&self, host: &str, stage: impl std::fmt::Display) {
        let msg = stage.to_string();
        let style = self.inner.stage_style.clone();
        if !self.with_bar(host, |b| {
            b.set_style(style);
            b.set_message(msg.clone());
        }) {
            self.inner.ui.status(host, &msg);
        }
    }

    pub fn note(&self, host: &str, msg: &str) {
        if let Some(m) = &self.inner.multi {
            let _ = m.println(format!("{host}: {msg}"));
        } else {
            self.inner.ui.warn(format!("{host}: {msg}"));
        }
    }

    pub fn push_started(&self, host: &str, bytes: u64) {
        let style = self.inner.push_style.clone();
        if !self.with_bar(host, |b| {
            b.set_style(style);
            b.set_length(bytes);
            b.set_position(0);
        }) {
            self.inner
                .ui
                .status(host, format!("uploading {bytes} bytes"));
        }
    }

    pub fn push_progress(&self, host: &str, sent: u64) {
        self.with_bar(host, |b| b.set_position(sent));
    }

    pub fn done(&self, host: &str, outcome: impl std::fmt::Display, error: Option<&str>) {
        let msg = outcome.to_string();
        let style = self.inner.stage_style.clone();
        if !self.with_bar(host, |b| {
            b.set_style(style);
            b.finish_with_message(msg.clone());
        }) {
            self.inner.ui.status(host, &msg);
        }
        if let Some(e) = error {
            self.inner.ui.verbose(format!("{host}: {e}"));
        }
    }

    pub fn clear(&self) {
        if let Some(m) = &self.inner.multi {
            let _ = m.clear();
        }
    }
}

impl crate::deploy::Events for DeployView {
    fn emit(&self, host: &str, event: crate::deploy::Event<'_>) {
        use crate::deploy::Event;
        match event {
            Event::Stage(s) => self.stage(host, s),
            Event::Note(n) => self.note(host, n),
            Event::PushStarted { bytes } => self.push_started(host, bytes),
            Event::PushProgress { sent } => self.push_progress(host, sent),
            Event::Done { outcome, error } => self.done(host, outcome, error),
        }
    }
}
