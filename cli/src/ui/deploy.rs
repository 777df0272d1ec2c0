//! A deploy as the user watches it: live, one bar per host on a terminal
//! or one plain line per stage change elsewhere, fed by `deploy::Event`s;
//! and the summary table it ends with.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::Ui;
use crate::deploy::{HostReport, Outcome};
use crate::names::basename;

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

    /// Shows `msg` as the host's stage: on its bar (finished with `last`),
    /// or as a plain line.
    fn show(&self, host: &str, msg: String, last: bool) {
        let style = self.inner.stage_style.clone();
        if !self.with_bar(host, |b| {
            b.set_style(style);
            if last {
                b.finish_with_message(msg.clone());
            } else {
                b.set_message(msg.clone());
            }
        }) {
            self.inner.ui.status(host, &msg);
        }
    }

    fn stage(&self, host: &str, stage: impl std::fmt::Display) {
        self.show(host, stage.to_string(), false);
    }

    fn note(&self, host: &str, msg: &str) {
        if let Some(m) = &self.inner.multi {
            let _ = m.println(format!("{host}: {msg}"));
        } else {
            self.inner.ui.warn(format!("{host}: {msg}"));
        }
    }

    fn push_started(&self, host: &str, bytes: u64) {
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

    fn push_progress(&self, host: &str, sent: u64) {
        self.with_bar(host, |b| b.set_position(sent));
    }

    fn done(&self, host: &str, outcome: impl std::fmt::Display, error: Option<&str>) {
        self.show(host, outcome.to_string(), true);
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

/// The table a deploy ends with: host, result, bytes sent, each service's
/// image and action. It is the result (stdout); why hosts failed is a
/// diagnostic and comes from [`deploy_errors`].
pub fn deploy_summary(reports: &[HostReport], dry_run: bool) -> String {
    let mut human = String::new();
    let width = reports
        .iter()
        .map(|r| r.host.len())
        .max()
        .unwrap_or(4)
        .max(4);
    human += &format!(
        "{:width$}  {:<11}  {:>10}  services\n",
        "host", "result", "sent"
    );
    for r in reports {
        let services = r
            .services
            .iter()
            .map(|s| {
                let file = basename(&s.image);
                let mut action = s.action.to_string();
                if !s.settings.is_empty() {
                    action += &format!("; {}", s.settings.join(", "));
                }
                let upload = if s.upload { "upload" } else { "no upload" };
                if dry_run {
                    format!("{file} ({upload}, {action})")
                } else {
                    format!("{file} ({action})")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        human += &format!(
            "{:width$}  {:<11}  {:>10}  {}\n",
            r.host,
            r.outcome.to_string(),
            r.bytes_sent,
            services
        );
    }
    human
}

/// Why hosts failed, one line per error, each naming its host: what the
/// user must read even when stdout goes to a file. Skipped hosts have no
/// error of their own (the reason they were skipped is said with them).
pub fn deploy_errors(reports: &[HostReport]) -> Vec<String> {
    let mut lines = Vec::new();
    for r in reports {
        if let Some(e) = &r.error {
            if r.outcome != Outcome::Skipped {
                // Errors from the host pipeline already name the host.
                if e.strip_prefix(r.host.as_str())
                    .is_some_and(|t| t.starts_with(':'))
                {
                    lines.push(e.clone());
                } else {
                    lines.push(format!("{}: {e}", r.host));
                }
            }
        }
        if let Some(e) = &r.rollback_error {
            lines.push(format!("{}: rollback failed too: {e}", r.host));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::{Action, Event, Events, ServiceReport, Stage};
    use crate::ui::capture::{self, settings};
    use crate::ui::Verbosity;

    /// What a CI log shows of a deploy: one line per stage change, notes as
    /// warnings, the error only with `-v`.
    #[test]
    fn plain_lines_per_event() {
        let (ui, out, err) = capture::ui(settings(Verbosity::Verbose));
        let view = DeployView::new(&ui, &["web1".into(), "db".into()]);
        let events = [
            ("web1", Event::Stage(Stage::Connect)),
            ("db", Event::Stage(Stage::Connect)),
            ("web1", Event::Stage(Stage::Lock)),
            ("web1", Event::Note("demo_1.0.raw is already there")),
            ("web1", Event::PushStarted { bytes: 4096 }),
            ("web1", Event::PushProgress { sent: 2048 }),
            ("web1", Event::Stage(Stage::Health)),
            (
                "web1",
                Event::Done {
                    outcome: Outcome::Healthy,
                    error: None,
                },
            ),
            (
                "db",
                Event::Done {
                    outcome: Outcome::RolledBack,
                    error: Some("demo.service failed"),
                },
            ),
        ];
        for (host, event) in events {
            view.emit(host, event);
        }
        view.clear();
        assert_eq!(out.text(), "");
        assert_eq!(
            err.text(),
            "        web1 connecting
          db connecting
        web1 locking
warning: web1: demo_1.0.raw is already there
        web1 uploading 4096 bytes
        web1 health check
        web1 healthy
          db rolled-back
       debug db: demo.service failed
"
        );
    }

    #[test]
    fn quiet_deploys_say_nothing_live() {
        let (ui, _, err) = capture::ui(settings(Verbosity::Quiet));
        let view = DeployView::new(&ui, &["web1".into()]);
        view.emit("web1", Event::Stage(Stage::Connect));
        view.emit("web1", Event::Note("hm"));
        view.emit(
            "web1",
            Event::Done {
                outcome: Outcome::Failed,
                error: Some("x"),
            },
        );
        assert_eq!(err.text(), "");
    }

    fn service(image: &str, upload: bool, action: Action) -> ServiceReport {
        ServiceReport {
            name: "demo".into(),
            image: image.into(),
            sha256: "ab".into(),
            upload,
            action,
            previous: None,
            outcome: Outcome::Healthy,
            settings: Vec::new(),
            transfer: Default::default(),
        }
    }

    fn reports() -> Vec<HostReport> {
        let mut web = HostReport::new("web1");
        web.outcome = Outcome::Healthy;
        web.bytes_sent = 123456;
        web.services = vec![
            service("/var/lib/portables/demo_1.1.raw", true, Action::Reattach),
            service("/var/lib/portables/tick_2.raw", false, Action::Unchanged),
        ];
        let mut db = HostReport::new("db");
        db.outcome = Outcome::RolledBack;
        db.services = vec![service("demo_1.1.raw", true, Action::Attach)];
        db.error = Some("demo.service did not start".into());
        let mut cache = HostReport::new("cache-server-1");
        cache.error = Some("cache-server-1: connection refused".into());
        cache.rollback_error = Some("no connection".into());
        vec![
            web,
            db,
            cache,
            HostReport::skipped("late", "a canary failed"),
        ]
    }

    #[test]
    fn summary_table_and_errors() {
        assert_eq!(
            deploy_summary(&reports(), false),
            concat!(
                "host            result             sent  services\n",
                "web1            healthy          123456  demo_1.1.raw (reattach), tick_2.raw (unchanged)\n",
                "db              rolled-back           0  demo_1.1.raw (attach)\n",
                "cache-server-1  failed                0  \n",
                "late            skipped               0  \n",
            )
        );
        assert_eq!(
            deploy_errors(&reports()),
            [
                "db: demo.service did not start",
                "cache-server-1: connection refused",
                "cache-server-1: rollback failed too: no connection",
            ]
        );
    }

    #[test]
    fn dry_run_summary_says_what_would_be_uploaded() {
        let mut web = HostReport::new("h");
        web.outcome = Outcome::Planned;
        web.services = vec![
            service("demo_1.1.raw", true, Action::Reattach),
            service("tick_2.raw", false, Action::Unchanged),
        ];
        assert_eq!(
            deploy_summary(&[web], true),
            "host  result             sent  services
h     planned               0  demo_1.1.raw (upload, reattach), tick_2.raw (no upload, unchanged)
"
        );
    }
}
