//! A connection to one host, and the host's lock as a guard: every command
//! that changes a host holds it, and it is released when the guard drops
//! (or when the connection ends, whatever ends our process).

use super::error::{Cause, HostError};
use super::ops::{self, Script};
use super::report::Stage;
use crate::remote::{Child, Destination, Elevation, Remote, RemoteOutput, SshOptions};

pub struct HostSession {
    // Dropped before the connection it runs on (fields drop in order), so
    // that a session dropped without `close` (a second Ctrl-C) still ends
    // the lock and then the connection and its control socket.
    lock: Option<HostLock>,
    pub remote: Remote,
}

/// Held while the remote `cat` keeps reading our stdin; dropping it closes
/// that stdin, which ends the lock.
struct HostLock {
    child: Option<Child>,
}

impl HostLock {
    async fn release(mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.take_stdin());
            let _ = child.wait().await;
        }
    }
}

impl Drop for HostLock {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            drop(child.take_stdin());
        }
    }
}

impl HostSession {
    pub async fn connect(
        name: &str,
        dest: &Destination,
        ssh: &SshOptions,
        elevation: Elevation,
    ) -> Result<Self, HostError> {
        let remote = Remote::connect(name, dest, ssh, elevation)
            .await
            .map_err(|e| Cause::from(e).at(name, Stage::Connect))?;
        Ok(HostSession { lock: None, remote })
    }

    /// This machine as the host: a pull host's agent, root already.
    pub fn local(name: &str) -> Self {
        HostSession {
            lock: None,
            remote: Remote::local(name),
        }
    }

    pub fn host(&self) -> &str {
        &self.remote.name
    }

    /// Takes the host's lock, or says who holds it.
    pub async fn lock(&mut self) -> Result<(), HostError> {
        self.lock_then(None).await.map(drop)
    }

    /// Takes the host's lock and, in the same round-trip, clears the
    /// partial uploads an interrupted deploy left and reads the host. A
    /// revert an unconfirmed deploy left pending is only reported
    /// (`revert_pending`): nothing else changes before the images are built.
    pub async fn lock_and_read(&mut self) -> Result<ops::HostFacts, HostError> {
        let first = ops::clear_then(&ops::facts(&[], false));
        let (code, out) = self.lock_then(Some(&first)).await?.unwrap_or_default();
        if code != 0 {
            return Err(Cause::Step {
                doing: first.doing.to_owned(),
                output: super::health::tail(&out),
            }
            .at(&self.remote.name, Stage::Preflight));
        }
        Ok(ops::parse_facts(&out))
    }

    /// Takes the lock, then runs `then` while holding it: its exit code
    /// and output.
    async fn lock_then(
        &mut self,
        then: Option<&Script>,
    ) -> Result<Option<(i32, String)>, HostError> {
        let holder = format!(
            "{}@{} pid {}",
            std::env::var("USER").unwrap_or_else(|_| "?".into()),
            hostname(),
            std::process::id(),
        );
        let at = |c: Cause| c.at(&self.remote.name, Stage::Lock);
        let mut child = self
            .remote
            .spawn_held(&ops::lock_then(&holder, then).text)
            .await
            .map_err(|e| at(e.into()))?;
        let first = read_first_line(&mut child).await;
        match first.trim() {
            "LOCKED" => {
                let read = match then {
                    Some(_) => Some(read_to_end_mark(&mut child).await),
                    None => None,
                };
                self.lock = Some(HostLock { child: Some(child) });
                match read {
                    // The connection ended before the script did.
                    Some(None) => Err(at(Cause::Remote(crate::remote::RemoteError::Lost {
                        host: self.remote.name.clone(),
                        doing: "reading the host's state".into(),
                        reason: "the connection ended".into(),
                    }))),
                    Some(Some(r)) => Ok(Some(r)),
                    None => Ok(None),
                }
            }
            "NOFLOCK" => Err(at(Cause::NoFlock)),
            _ => {
                let rest = child
                    .wait_with_output()
                    .await
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                Err(at(Cause::Locked {
                    holder: Box::new(ops::parse_lock_holder(&rest)),
                    host: self.remote.name.clone(),
                }))
            }
        }
    }

    /// Who holds the host's lock now (no pid: nobody).
    pub async fn lock_holder(&self) -> Result<ops::LockHolder, HostError> {
        let out = self.step(&ops::lock_holder(), Stage::Lock).await?;
        Ok(ops::parse_lock_holder(&out.stdout))
    }

    /// Ends the host-side process `pid` if it still holds the lock, which
    /// frees it; false when it no longer held it.
    pub async fn end_lock_holder(&self, pid: u32) -> Result<bool, HostError> {
        let out = self.step(&ops::unlock(pid), Stage::Lock).await?;
        Ok(out.stdout.trim() == "UNLOCKED")
    }

    /// Runs a script; its exit code is the caller's to read.
    pub async fn run(&self, s: &Script, stage: Stage) -> Result<RemoteOutput, HostError> {
        self.remote
            .run(&s.text, s.doing)
            .await
            .map_err(|e| Cause::from(e).at(&self.remote.name, stage))
    }

    /// Runs a script that must succeed.
    pub async fn step(&self, s: &Script, stage: Stage) -> Result<RemoteOutput, HostError> {
        let out = self.run(s, stage).await?;
        if !out.success() {
            return Err(Cause::Step {
                doing: s.doing.to_owned(),
                output: out.tail(),
            }
            .at(&self.remote.name, stage));
        }
        Ok(out)
    }

    /// Runs `parts` in one round-trip; how each ended is the caller's to
    /// read (see [`Self::part_ok`]).
    pub async fn batch(
        &self,
        parts: &[ops::Part],
        stage: Stage,
    ) -> Result<Vec<ops::PartOutput>, HostError> {
        let out = self.run(&ops::batch(parts), stage).await?;
        Ok(ops::parse_batch(&out.stdout, parts.len()))
    }

    /// A part of a batch that must have succeeded, as [`Self::step`] says it.
    pub fn part_ok<'o>(
        &self,
        part: &ops::Part,
        out: &'o ops::PartOutput,
        stage: Stage,
    ) -> Result<&'o str, HostError> {
        if out.success() {
            return Ok(&out.output);
        }
        Err(Cause::Step {
            doing: part.script.doing.to_owned(),
            output: {
                let lines: Vec<&str> = out
                    .output
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .collect();
                lines[lines.len().saturating_sub(8)..].join("\n")
            },
        }
        .at(&self.remote.name, stage))
    }

    /// Reads the host's state, hashing `hash` (and every attached image
    /// when `hash_attached`). With `finish_pending`, a revert an earlier,
    /// never-confirmed deploy left armed (or running) is run and waited for
    /// first, so that what follows starts from the host's last good state
    /// and no timer undoes it later; partial uploads go too. Returns
    /// whether a revert ran.
    pub async fn facts(
        &self,
        hash: &[String],
        hash_attached: bool,
        stage: Stage,
        finish_pending: bool,
    ) -> Result<(ops::HostFacts, bool), HostError> {
        let read = ops::facts(hash, hash_attached);
        // The caller holds the lock and will change the host: the partial
        // uploads an interrupted deploy left go in the same round-trip.
        let first = if finish_pending {
            ops::clear_then(&read)
        } else {
            read.clone()
        };
        let facts = ops::parse_facts(&self.step(&first, stage).await?.stdout);
        if !(finish_pending && facts.revert_pending) {
            return Ok((facts, false));
        }
        self.step(&ops::run_pending_revert(), stage).await?;
        let again = ops::parse_facts(&self.step(&read, stage).await?.stdout);
        Ok((again, true))
    }

    /// Releases the lock and closes the connection.
    pub async fn close(mut self) {
        if let Some(lock) = self.lock.take() {
            lock.release().await;
        }
        self.remote.close().await;
    }
}

async fn read_first_line(child: &mut Child) -> String {
    use tokio::io::AsyncReadExt;
    let Some(out) = child.stdout() else {
        return String::new();
    };
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        match out.read(&mut byte).await {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// The output of the script a lock ran once taken, up to its end mark,
/// with its exit code; `None` when the output ended before the mark.
async fn read_to_end_mark(child: &mut Child) -> Option<(i32, String)> {
    use tokio::io::AsyncBufReadExt;
    let out = child.stdout()?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let mut text = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(code) = line.strip_prefix(ops::READ_END) {
            return Some((code.trim().parse().unwrap_or(1), text));
        }
        text.push_str(&line);
        text.push('\n');
    }
    None
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}
