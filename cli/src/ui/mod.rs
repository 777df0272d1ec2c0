//! The one owner of stdout and stderr.
//!
//! Results go to stdout (JSON with `--json`, a short human line otherwise);
//! everything else (stage lines, warnings, errors, progress) goes to stderr.
//! Progress bars are drawn only on a terminal; elsewhere each stage change is
//! one plain line, so CI logs stay readable.
//!
//! [`Ui::terminal`] writes to the process's stdout and stderr;
//! [`Ui::with_output`] to any writers, which is how the rendering is tested.
//! `deploy` renders a deploy (live and its summary), `results` the human
//! form of the other commands' results.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

mod deploy;
mod results;

pub use deploy::{deploy_errors, deploy_summary, DeployView};
pub use results::{closure_diff, diff_heading, fleet_status, host_status, inspection, size};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// When to paint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    /// When stderr is a terminal and `NO_COLOR` is unset.
    Auto,
    Always,
    Never,
}

/// What the user asked of the output, free of how it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub json: bool,
    pub verbosity: Verbosity,
    pub color: Color,
}

/// A writer shared by every clone of a [`Ui`], so that lines from
/// concurrent hosts never interleave mid-line.
type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

#[derive(Clone)]
pub struct Ui {
    json: bool,
    verbosity: Verbosity,
    color: bool,
    /// Colour in what goes to stdout (`attache logs`): stdout is a
    /// terminal, or colour was asked for.
    stdout_color: bool,
    /// stderr is a terminal worth drawing bars on (not CI).
    bars: bool,
    stdout: Sink,
    stderr: Sink,
}

impl Ui {
    /// The process's stdout and stderr, with colour and bars decided by
    /// the terminal and the environment (`NO_COLOR`, `CI`).
    pub fn terminal(settings: Settings) -> Self {
        let stderr_tty = std::io::stderr().is_terminal();
        let color = match settings.color {
            Color::Auto => stderr_tty && std::env::var_os("NO_COLOR").is_none(),
            c => c == Color::Always,
        };
        let stdout_color = match settings.color {
            Color::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
            c => c == Color::Always,
        };
        Ui {
            bars: stderr_tty && std::env::var_os("CI").is_none(),
            color,
            stdout_color,
            ..Ui::with_output(
                settings,
                Box::new(std::io::stdout()),
                Box::new(std::io::stderr()),
            )
        }
    }

    /// Any writers, as if they were no terminal: no bars, and colour only
    /// when asked for `Always`.
    pub fn with_output(
        settings: Settings,
        stdout: Box<dyn Write + Send>,
        stderr: Box<dyn Write + Send>,
    ) -> Self {
        Ui {
            json: settings.json,
            verbosity: settings.verbosity,
            color: settings.color == Color::Always,
            stdout_color: settings.color == Color::Always,
            bars: false,
            stdout: Arc::new(Mutex::new(stdout)),
            stderr: Arc::new(Mutex::new(stderr)),
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    /// Writes and flushes; a closed pipe or a full disk is not worth
    /// failing a deploy over, so errors are dropped.
    fn write(sink: &Sink, bytes: &[u8]) {
        let mut w = sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = w.write_all(bytes);
        let _ = w.flush();
    }

    fn log(&self, line: &str) {
        Ui::write(&self.stderr, format!("{line}\n").as_bytes());
    }

    /// A cargo-style stage line: `   Building .#demo`.
    pub fn status(&self, verb: &str, msg: impl std::fmt::Display) {
        if self.verbosity >= Verbosity::Normal {
            self.log(&format!(
                "{} {msg}",
                self.paint("1;32", &format!("{verb:>12}"))
            ));
        }
    }

    pub fn verbose(&self, msg: impl std::fmt::Display) {
        if self.verbosity >= Verbosity::Verbose {
            self.log(&format!(
                "{} {msg}",
                self.paint("2", &format!("{:>12}", "debug"))
            ));
        }
    }

    pub fn warn(&self, msg: impl std::fmt::Display) {
        if self.verbosity >= Verbosity::Normal {
            self.log(&format!("{} {msg}", self.paint("1;33", "warning:")));
        }
    }

    /// The one sentence a failed command ends with.
    pub fn error(&self, msg: impl std::fmt::Display) {
        self.log(&format!("{} {msg}", self.paint("1;31", "error:")));
    }

    /// The command's result: JSON on stdout with `--json`, else the human
    /// lines.
    pub fn result(&self, json: &serde_json::Value, human: &str) {
        let text = if self.json {
            serde_json::to_string_pretty(json).unwrap_or_default()
        } else {
            human.trim_end().to_owned()
        };
        if !text.is_empty() {
            Ui::write(&self.stdout, format!("{text}\n").as_bytes());
        }
    }

    /// One record of a stream (`attache logs`) as it comes: with `--json`
    /// the record as one line, else `prefix` (coloured by `colour`, a
    /// small number per host, on a terminal) and `text`.
    pub fn stream(&self, json: &serde_json::Value, prefix: &str, colour: usize, text: &str) {
        let line = if self.json {
            serde_json::to_string(json).unwrap_or_default()
        } else {
            const COLOURS: [&str; 6] = ["36", "33", "35", "32", "34", "31"];
            let c = COLOURS[colour % COLOURS.len()];
            if self.stdout_color {
                format!("\x1b[{c}m{prefix}\x1b[0m {text}")
            } else {
                format!("{prefix} {text}")
            }
        };
        Ui::write(&self.stdout, format!("{line}\n").as_bytes());
    }

    /// Asks a yes/no question on the terminal: `None` when stdin or stderr
    /// is no terminal, so that nobody can answer.
    pub fn confirm(&self, question: &str) -> Option<bool> {
        if !(self.bars && std::io::stdin().is_terminal()) {
            return None;
        }
        Ui::write(&self.stderr, format!("{question} [y/N] ").as_bytes());
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer).ok()?;
        Some(matches!(answer.trim(), "y" | "Y" | "yes"))
    }

    /// Raw bytes to stdout (completions, man page).
    pub fn raw(&self, bytes: &[u8]) {
        Ui::write(&self.stdout, bytes);
    }

    pub fn progress_enabled(&self) -> bool {
        self.bars && self.verbosity == Verbosity::Normal
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

/// A [`Ui`] that writes into memory, for tests of what the user reads.
#[cfg(test)]
pub(crate) mod capture {
    use super::{Color, Settings, Ui, Verbosity};
    use std::sync::{Arc, Mutex};

    /// Plain text, no JSON: what a CI log gets.
    pub fn settings(verbosity: Verbosity) -> Settings {
        Settings {
            json: false,
            verbosity,
            color: Color::Auto,
        }
    }

    /// A writer whose bytes can be read back while a `Ui` still holds it.
    #[derive(Clone, Default)]
    pub struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        pub fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// A `Ui` with the given settings, and what it wrote to stdout and
    /// stderr.
    pub fn ui(settings: Settings) -> (Ui, Buffer, Buffer) {
        let (out, err) = (Buffer::default(), Buffer::default());
        let ui = Ui::with_output(settings, Box::new(out.clone()), Box::new(err.clone()));
        (ui, out, err)
    }
}

#[cfg(test)]
mod tests {
    use super::capture::{self, settings};
    use super::*;

    #[test]
    fn logs_go_to_stderr_results_to_stdout() {
        let (ui, out, err) = capture::ui(settings(Verbosity::Normal));
        ui.status("Building", ".#demo");
        ui.verbose("not shown");
        ui.warn("careful");
        ui.error("it broke");
        ui.result(&serde_json::json!({"a": 1}), "done\n\n");
        assert_eq!(
            err.text(),
            "    Building .#demo\nwarning: careful\nerror: it broke\n"
        );
        assert_eq!(out.text(), "done\n");
        assert!(!ui.progress_enabled());
    }

    #[test]
    fn quiet_keeps_errors_and_results_json_is_pretty() {
        let (ui, out, err) = capture::ui(Settings {
            json: true,
            ..settings(Verbosity::Quiet)
        });
        ui.status("Building", ".#demo");
        ui.warn("careful");
        ui.error("it broke");
        ui.result(&serde_json::json!({"a": 1}), "done");
        assert_eq!(err.text(), "error: it broke\n");
        assert_eq!(out.text(), "{\n  \"a\": 1\n}\n");
    }

    #[test]
    fn verbose_and_colour_when_asked() {
        let (ui, _, err) = capture::ui(Settings {
            color: Color::Always,
            ..settings(Verbosity::Verbose)
        });
        ui.verbose("detail");
        ui.error("x");
        assert_eq!(
            err.text(),
            "\x1b[2m       debug\x1b[0m detail\n\x1b[1;31merror:\x1b[0m x\n"
        );
    }

    /// `attache logs`: a colour per host when asked, the record as one
    /// JSON line with --json.
    #[test]
    fn streams_colour_each_host_or_print_json_lines() {
        let (ui, out, _) = capture::ui(Settings {
            color: Color::Always,
            ..settings(Verbosity::Normal)
        });
        let v = serde_json::json!({"MESSAGE": "hi", "host": "h2"});
        ui.stream(&v, "h1 |", 0, "a");
        ui.stream(&v, "h2 |", 1, "b");
        assert_eq!(out.text(), "\x1b[36mh1 |\x1b[0m a\n\x1b[33mh2 |\x1b[0m b\n");
        let (ui, out, _) = capture::ui(Settings {
            json: true,
            ..settings(Verbosity::Normal)
        });
        ui.stream(&v, "h2 |", 1, "b");
        assert_eq!(out.text(), "{\"MESSAGE\":\"hi\",\"host\":\"h2\"}\n");
    }
}
