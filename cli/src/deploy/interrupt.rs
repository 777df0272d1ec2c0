//! Ctrl-C and SIGTERM during a deploy. The first asks every host to stop at
//! the next safe point: before an upload, or during one (its partial file is
//! removed); a host already activating finishes that step, its checks, and
//! confirms or rolls back as it would have. The second gives up at once, and
//! the hosts left armed are reverted by their own timer: [`Interrupt`]
//! remembers when.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// The signals received so far, and each host's pending automatic rollback.
#[derive(Clone)]
pub struct Interrupt {
    signals: watch::Receiver<u32>,
    armed: Arc<Mutex<BTreeMap<String, SystemTime>>>,
}

impl Interrupt {
    /// Starts counting SIGINT and SIGTERM, which then no longer end the
    /// process by themselves. Needs a running tokio runtime.
    pub fn listen() -> std::io::Result<Interrupt> {
        use tokio::signal::unix::{signal, SignalKind};
        let (tx, rx) = watch::channel(0);
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = int.recv() => {}
                    Some(()) = term.recv() => {}
                    else => break,
                }
                tx.send_modify(|n| *n += 1);
            }
        });
        Ok(Interrupt {
            signals: rx,
            armed: Arc::default(),
        })
    }

    /// Never fires: for runs without signal handling (tests).
    #[cfg(test)]
    pub fn never() -> Interrupt {
        let (tx, rx) = watch::channel(0);
        std::mem::forget(tx);
        Interrupt {
            signals: rx,
            armed: Arc::default(),
        }
    }

    /// A stop was asked for.
    pub fn asked(&self) -> bool {
        *self.signals.borrow() > 0
    }

    /// Resolves once `n` signals have come.
    pub async fn after(&self, n: u32) {
        let mut rx = self.signals.clone();
        // The sender lives as long as the runtime: an error means the run
        // is ending anyway.
        let _ = rx.wait_for(|&got| got >= n).await;
    }

    /// `host`'s automatic rollback fires `after` from now.
    pub(crate) fn armed(&self, host: &str, after: Duration) {
        if let Ok(mut m) = self.armed.lock() {
            m.insert(host.to_owned(), SystemTime::now() + after);
        }
    }

    /// `host` no longer depends on its automatic rollback.
    pub(crate) fn disarmed(&self, host: &str) {
        if let Ok(mut m) = self.armed.lock() {
            m.remove(host);
        }
    }

    /// Hosts left with a pending automatic rollback, and when it fires.
    pub fn pending_reverts(&self) -> Vec<(String, SystemTime)> {
        self.armed
            .lock()
            .map(|m| m.iter().map(|(h, t)| (h.clone(), *t)).collect())
            .unwrap_or_default()
    }
}

/// `HH:MM:SS UTC`, and how far from now: for a user who must know when a
/// host will act on its own.
pub fn clock(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let day = secs % 86_400;
    let left = t
        .duration_since(SystemTime::now())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02} UTC (in {left} s)",
        day / 3600,
        day % 3600 / 60,
        day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_reads_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 3 + 3600 * 17 + 62);
        assert!(
            clock(t).starts_with("17:01:02 UTC (in 0 s)"),
            "{}",
            clock(t)
        );
    }

    #[test]
    fn armed_hosts_are_remembered_until_disarmed() {
        let i = Interrupt::never();
        assert!(!i.asked());
        i.armed("h1", Duration::from_secs(300));
        i.armed("h2", Duration::from_secs(300));
        i.disarmed("h1");
        let p = i.pending_reverts();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "h2");
    }
}
