//! One SSH connection per host, and the small vocabulary of things attache
//! does there.
//!
//! Sessions are made only here: the user's `ssh` (their config, agent, keys,
//! ProxyJump) runs one ControlMaster per host through the `openssh` crate,
//! with strict host keys unless the user opts in. Every remote step is a
//! shell script whose arguments are quoted here, run as root directly or
//! through `sudo -n`.
//!
//! The same vocabulary runs on this machine too ([`Remote::local`]): a pull
//! host's agent switches its own services through the very transaction a
//! push deploy runs over SSH.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where to connect, as the user wrote it (a name from `~/.ssh/config`, or
/// `user@host`), with optional overrides from the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub host: String,
    pub user: Option<String>,
    pub port: Option<u16>,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl Destination {
    /// Parses `host`, `user@host`, `user@host:port`.
    pub fn parse(s: &str) -> Result<Self, RemoteError> {
        let (user, rest) = match s.rsplit_once('@') {
            Some((u, r)) => (Some(u.to_owned()), r),
            None => (None, s),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (
                h.to_owned(),
                Some(p.parse().map_err(|_| RemoteError::BadDestination {
                    destination: s.to_owned(),
                })?),
            ),
            _ => (rest.to_owned(), None),
        };
        if host.is_empty() || user.as_deref() == Some("") {
            return Err(RemoteError::BadDestination {
                destination: s.to_owned(),
            });
        }
        Ok(Destination { host, user, port })
    }
}

/// How to reach hosts: shared by every connection of one run.
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    /// `ssh -F FILE` instead of `~/.ssh/config`.
    pub config_file: Option<PathBuf>,
    /// Accept unknown host keys (never changed ones).
    pub accept_new_host_keys: bool,
}

/// Who runs commands on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elevation {
    /// The login user is root.
    None,
    /// `sudo -n`: fails at once, with a clear error, if sudo wants a password.
    Sudo,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "'{destination}' is not a valid SSH destination: use HOST, USER@HOST or USER@HOST:PORT"
    )]
    BadDestination { destination: String },
    #[error("the host key has changed (the host now offers {fingerprint}). If the host was reinstalled, remove the old key with `ssh-keygen -R {host}`; otherwise someone may be intercepting the connection")]
    HostKeyChanged { host: String, fingerprint: String },
    #[error("the host key is unknown: the host offers {fingerprint}. Compare it with what `ssh-keygen -lf` prints for that type's /etc/ssh/ssh_host_*_key.pub on the host itself, then trust it with `ssh {host} true` or rerun with --accept-new-host-keys")]
    HostKeyUnknown { host: String, fingerprint: String },
    #[error("cannot connect over SSH: {reason}. Check that the host is up and that `ssh {host} true` works")]
    Unreachable { host: String, reason: String },
    #[error("logged in as '{user}', who is not root, and sudo is off for this host: set sudo = true in the inventory for {host}, or pass --sudo")]
    NotRoot { host: String, user: String },
    #[error("sudo needs a password for user {user}; attache runs sudo non-interactively. Allow passwordless sudo for that user (NOPASSWD), or deploy as root")]
    SudoPassword { host: String, user: String },
    #[error("user {user} may not run commands as root with sudo ({says}); deploy as root, or give {user} passwordless sudo")]
    NoSudo {
        host: String,
        user: String,
        says: String,
    },
    #[error("the SSH connection was lost while {doing}: {reason}. The host keeps its previous state; run the command again")]
    Lost {
        host: String,
        doing: String,
        reason: String,
    },
    /// A command on the host failed with the connection still up.
    #[error("{doing} failed on the host: {says}")]
    HostRefused {
        host: String,
        doing: String,
        says: String,
    },
    #[error("could not read {path}: {source}")]
    LocalIo {
        host: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The result of a remote script.
#[derive(Debug, Clone)]
pub struct RemoteOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl RemoteOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The last lines of stderr (or stdout when stderr is empty), for an
    /// error message.
    pub fn tail(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

/// A live connection to one host.
pub struct Remote {
    pub name: String,
    transport: Transport,
    elevation: Elevation,
    login_user: String,
    /// Commands run on the host so far: each is one round-trip over the
    /// multiplexed connection, what a deploy's speed mostly is.
    trips: Arc<std::sync::atomic::AtomicU32>,
}

/// How scripts reach the host.
enum Transport {
    Ssh {
        session: Arc<Session>,
        _control_dir: tempfile::TempDir,
    },
    /// This machine, as root already: `attache agent` on a pull host.
    Local,
}

/// A script started on the host and still running: over SSH, or here.
pub enum Child {
    Ssh(openssh::Child<Arc<Session>>),
    Local(tokio::process::Child),
}

impl Child {
    /// Its stdin, taken: dropping it closes the script's stdin.
    pub fn take_stdin(&mut self) -> Option<Pin<Box<dyn AsyncWrite + Send>>> {
        match self {
            Child::Ssh(c) => c
                .stdin()
                .take()
                .map(|w| Box::pin(w) as Pin<Box<dyn AsyncWrite + Send>>),
            Child::Local(c) => c
                .stdin
                .take()
                .map(|w| Box::pin(w) as Pin<Box<dyn AsyncWrite + Send>>),
        }
    }

    pub fn stdout(&mut self) -> Option<&mut (dyn AsyncRead + Send + Unpin)> {
        match self {
            Child::Ssh(c) => c
                .stdout()
                .as_mut()
                .map(|r| r as &mut (dyn AsyncRead + Send + Unpin)),
            Child::Local(c) => c
                .stdout
                .as_mut()
                .map(|r| r as &mut (dyn AsyncRead + Send + Unpin)),
        }
    }

    pub fn take_stdout(&mut self) -> Option<Pin<Box<dyn AsyncRead + Send>>> {
        match self {
            Child::Ssh(c) => c.stdout().take().map(|r| Box::pin(r) as _),
            Child::Local(c) => c.stdout.take().map(|r| Box::pin(r) as _),
        }
    }

    pub fn take_stderr(&mut self) -> Option<Pin<Box<dyn AsyncRead + Send>>> {
        match self {
            Child::Ssh(c) => c.stderr().take().map(|r| Box::pin(r) as _),
            Child::Local(c) => c.stderr.take().map(|r| Box::pin(r) as _),
        }
    }

    pub async fn wait(self) -> Result<std::process::ExitStatus, String> {
        match self {
            Child::Ssh(c) => c.wait().await.map_err(|e| e.to_string()),
            Child::Local(mut c) => c.wait().await.map_err(|e| e.to_string()),
        }
    }

    pub async fn wait_with_output(self) -> Result<std::process::Output, String> {
        match self {
            Child::Ssh(c) => c.wait_with_output().await.map_err(|e| e.to_string()),
            Child::Local(c) => c.wait_with_output().await.map_err(|e| e.to_string()),
        }
    }
}

impl Remote {
    pub async fn connect(
        name: &str,
        dest: &Destination,
        opts: &SshOptions,
        elevation: Elevation,
    ) -> Result<Remote, RemoteError> {
        // A short private directory: ControlMaster sockets have a path limit.
        let control_dir = tempfile::Builder::new()
            .prefix("attache-ssh-")
            .tempdir_in("/tmp")
            .map_err(|e| RemoteError::LocalIo {
                host: name.to_owned(),
                path: "/tmp".into(),
                source: e,
            })?;
        let mut b = SessionBuilder::default();
        b.control_directory(control_dir.path())
            // The master must not outlive us if we are killed.
            .control_persist(ControlPersist::IdleFor(
                std::num::NonZeroUsize::new(60).unwrap_or(std::num::NonZeroUsize::MIN),
            ))
            .known_hosts_check(if opts.accept_new_host_keys {
                KnownHosts::Add
            } else {
                KnownHosts::Strict
            })
            .connect_timeout(Duration::from_secs(15))
            .server_alive_interval(Duration::from_secs(10));
        if let Some(f) = &opts.config_file {
            b.config_file(f);
        }
        if let Some(u) = &dest.user {
            b.user(u.clone());
        }
        if let Some(p) = dest.port {
            b.port(p);
        }
        let session = match b.connect_mux(&dest.host).await {
            Ok(s) => s,
            Err(e) => {
                let mut err = connect_error(name, &e);
                if let RemoteError::HostKeyUnknown { fingerprint, .. } = &mut err {
                    if let Some(fp) = offered_host_key(dest, opts).await {
                        *fingerprint = fp;
                    }
                }
                return Err(err);
            }
        };
        let mut remote = Remote {
            name: name.to_owned(),
            transport: Transport::Ssh {
                session: Arc::new(session),
                _control_dir: control_dir,
            },
            elevation: Elevation::None,
            login_user: String::new(),
            trips: Arc::default(),
        };
        // Ask the host who we are instead of guessing from the user name,
        // with builtins only: sshd sets LOGNAME, the kernel knows the uid,
        // and on a slow host each process costs more than the round-trip.
        let who = remote.run_plain(WHO_AM_I, "connecting").await?;
        let mut lines = who.stdout.lines();
        remote.login_user = lines.next().unwrap_or_default().trim().to_owned();
        let uid = lines.next().unwrap_or_default().trim().to_owned();
        remote.elevation = if uid == "0" {
            Elevation::None
        } else {
            elevation
        };
        if uid != "0" && elevation == Elevation::None {
            return Err(RemoteError::NotRoot {
                host: name.to_owned(),
                user: remote.login_user.clone(),
            });
        }
        if remote.elevation == Elevation::Sudo {
            let probe = remote.run_plain("sudo -n true", "checking sudo").await?;
            if !probe.success() {
                let user = remote.login_user.clone();
                let host = name.to_owned();
                return Err(if probe.stderr.contains("password is required") {
                    RemoteError::SudoPassword { host, user }
                } else {
                    RemoteError::NoSudo {
                        host,
                        user,
                        says: probe.tail(),
                    }
                });
            }
        }
        Ok(remote)
    }

    /// This machine as the host, for a process that runs as root: the agent
    /// of a pull host. No connection, no sudo; the same scripts.
    pub fn local(name: &str) -> Remote {
        Remote {
            name: name.to_owned(),
            transport: Transport::Local,
            elevation: Elevation::None,
            login_user: "root".into(),
            trips: Arc::default(),
        }
    }

    /// Runs `script` with `sh -c` as the login user.
    async fn run_plain(&self, script: &str, doing: &str) -> Result<RemoteOutput, RemoteError> {
        self.count();
        let out = match &self.transport {
            Transport::Ssh { session, .. } => session
                .command("sh")
                .arg("-c")
                .arg(script)
                .stdin(Stdio::null())
                .output()
                .await
                .map_err(|e| self.lost(doing, &e))?,
            Transport::Local => tokio::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .map_err(|e| self.lost(doing, &e))?,
        };
        Ok(RemoteOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `script` as it must run to run as root.
    fn as_root(&self, script: &str) -> String {
        match self.elevation {
            Elevation::None => script.to_owned(),
            Elevation::Sudo => format!("sudo -n sh -c {}", q(script)),
        }
    }

    /// Runs `script` as root (through `sudo -n` when needed). The script's
    /// own arguments must already be quoted with [`q`].
    pub async fn run(&self, script: &str, doing: &str) -> Result<RemoteOutput, RemoteError> {
        self.run_plain(&self.as_root(script), doing).await
    }

    /// Starts `script` as root and keeps it running while the returned
    /// child lives: used for the per-host lock, which must end with us.
    pub async fn spawn_held(&self, script: &str) -> Result<Child, RemoteError> {
        self.spawn(script, true, "taking the deploy lock").await
    }

    /// Starts `script` as root with a pipe to its stdin and its stderr read
    /// back (and its stdout when `stdout`): one round-trip.
    async fn spawn(&self, script: &str, stdout: bool, doing: &str) -> Result<Child, RemoteError> {
        self.count();
        let script = self.as_root(script);
        match &self.transport {
            Transport::Ssh { session, .. } => session
                .clone()
                .arc_command("sh")
                .arg("-c")
                .arg(script)
                .stdin(Stdio::piped())
                .stdout(if stdout {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stderr(Stdio::piped())
                .spawn()
                .await
                .map(Child::Ssh)
                .map_err(|e| self.lost(doing, &e)),
            Transport::Local => {
                let piped = std::process::Stdio::piped;
                tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(script)
                    .stdin(piped())
                    .stdout(if stdout {
                        piped()
                    } else {
                        std::process::Stdio::null()
                    })
                    .stderr(piped())
                    .kill_on_drop(false)
                    .spawn()
                    .map(Child::Local)
                    .map_err(|e| self.lost(doing, &e))
            }
        }
    }

    /// Streams `local` into the stdin of `script` (run as root), calling
    /// `progress` with the bytes sent so far. Returns the bytes sent.
    pub async fn upload(
        &self,
        local: &Path,
        script: &str,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64, RemoteError> {
        self.upload_then(local, &[], script, progress).await
    }

    /// [`Self::upload`], then `then` on the same stdin: a file and what
    /// goes with it in one command.
    pub async fn upload_then(
        &self,
        local: &Path,
        then: &[u8],
        script: &str,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64, RemoteError> {
        let mut child = self.spawn(script, false, "uploading").await?;
        let local_io = |source| RemoteError::LocalIo {
            host: self.name.clone(),
            path: local.display().to_string(),
            source,
        };
        let mut file = tokio::fs::File::open(local).await.map_err(local_io)?;
        let mut stdin = child
            .take_stdin()
            .ok_or_else(|| self.lost("uploading", "no stdin"))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        // A write that fails may be the host's receiver having stopped (a
        // full disk): its own words, read below, say why better than ours.
        let mut broken = None;
        loop {
            let n = file.read(&mut buf).await.map_err(local_io)?;
            if n == 0 {
                break;
            }
            if let Err(e) = stdin.write_all(&buf[..n]).await {
                broken = Some(e);
                break;
            }
            sent += n as u64;
            progress(sent);
        }
        if broken.is_none() && !then.is_empty() {
            match stdin.write_all(then).await {
                Ok(()) => {
                    sent += then.len() as u64;
                    progress(sent);
                }
                Err(e) => broken = Some(e),
            }
        }
        if broken.is_none() {
            broken = stdin.shutdown().await.err();
        }
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| self.lost("uploading", &e))?;
        let says = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        match (out.status.code(), broken) {
            (Some(0), None) => Ok(sent),
            // The receiver ended with an error of its own, the connection
            // still up (ssh reports a lost connection as 255).
            (Some(code), _) if code != 255 && !says.is_empty() => Err(RemoteError::HostRefused {
                host: self.name.clone(),
                doing: "receiving the upload".into(),
                says,
            }),
            (_, Some(e)) if says.is_empty() => Err(self.lost("uploading", e)),
            _ => Err(self.lost("uploading", says)),
        }
    }

    /// Runs `script` as root with `input` on its stdin: how a secret
    /// reaches a host (never as an argument, never as a file on the way).
    pub async fn run_with_input(
        &self,
        script: &str,
        doing: &str,
        input: &[u8],
    ) -> Result<RemoteOutput, RemoteError> {
        let mut child = self.spawn(script, true, doing).await?;
        let mut stdin = child
            .take_stdin()
            .ok_or_else(|| self.lost(doing, "no stdin"))?;
        let io_lost = |e: std::io::Error| self.lost(doing, e);
        stdin.write_all(input).await.map_err(io_lost)?;
        stdin.shutdown().await.map_err(io_lost)?;
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| self.lost(doing, &e))?;
        Ok(RemoteOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn count(&self) {
        self.trips
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The count of commands run on the host so far, live.
    pub fn trips(&self) -> Arc<std::sync::atomic::AtomicU32> {
        self.trips.clone()
    }

    fn lost(&self, doing: &str, e: impl std::fmt::Display) -> RemoteError {
        RemoteError::Lost {
            host: self.name.clone(),
            doing: doing.to_owned(),
            reason: e.to_string(),
        }
    }

    pub async fn close(self) {
        if let Transport::Ssh { session, .. } = self.transport {
            if let Ok(s) = Arc::try_unwrap(session) {
                let _ = s.close().await;
            }
        }
    }
}

/// Prints the login user's name, then its uid.
const WHO_AM_I: &str = "echo \"${LOGNAME:-${USER:-}}\"; \
    while read -r k v _; do case $k in Uid:) echo \"$v\"; break ;; esac; done </proc/self/status";

/// Turns ssh's own words into one of our sentences.
fn connect_error(host: &str, e: &openssh::Error) -> RemoteError {
    let mut text = e.to_string();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        text.push('\n');
        text.push_str(&s.to_string());
        src = s.source();
    }
    let fingerprint = text
        .split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .map(|w| w.trim_end_matches('.').to_owned())
        .unwrap_or_else(|| "a key ssh did not show".into());
    if text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
        return RemoteError::HostKeyChanged {
            host: host.to_owned(),
            fingerprint,
        };
    }
    if text.contains("Host key verification failed")
        || text.contains("No ED25519 host key is known")
        || text.contains("host key is known")
    {
        return RemoteError::HostKeyUnknown {
            host: host.to_owned(),
            fingerprint,
        };
    }
    let reason = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("the master connection failed"))
        .unwrap_or("no answer")
        .to_owned();
    RemoteError::Unreachable {
        host: host.to_owned(),
        reason,
    }
}

/// The key an unknown host offers, as `ED25519 key SHA256:…`. ssh refuses
/// an unknown key under strict checking without printing it; its debug log
/// names it, and the connection stops at the same point (nothing is
/// authenticated, nothing is run, nothing is written to known_hosts).
async fn offered_host_key(dest: &Destination, opts: &SshOptions) -> Option<String> {
    let mut c = tokio::process::Command::new("ssh");
    if let Some(f) = &opts.config_file {
        c.arg("-F").arg(f);
    }
    if let Some(u) = &dest.user {
        c.arg("-l").arg(u);
    }
    if let Some(p) = dest.port {
        c.arg("-p").arg(p.to_string());
    }
    c.args([
        "-v",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "ControlPath=none",
        "-o",
        "ConnectTimeout=15",
        "--",
        &dest.host,
        "true",
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .ok()?
        .ok()?;
    server_host_key(&String::from_utf8_lossy(&out.stderr))
}

/// From ssh's debug log: `debug1: Server host key: ssh-ed25519 SHA256:…`.
/// The last one is the host's own (a ProxyJump's comes first).
fn server_host_key(log: &str) -> Option<String> {
    let line = log.lines().rfind(|l| l.contains("Server host key: "))?;
    let rest = &line[line.find("Server host key: ")? + "Server host key: ".len()..];
    let mut words = rest.split_whitespace();
    let kind = words.next()?;
    let fp = words.next().filter(|w| w.contains(':'))?;
    let kind = kind
        .strip_prefix("ssh-")
        .or_else(|| kind.strip_prefix("ecdsa-sha2-").map(|_| "ecdsa"))
        .unwrap_or(kind)
        .to_uppercase();
    Some(format!("{kind} key {fp}"))
}

/// Quotes one word for the remote POSIX shell.
pub fn q(s: &str) -> String {
    shell_escape::unix::escape(s.into()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_am_i_with_builtins() {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(WHO_AM_I)
            .env("LOGNAME", "deploy")
            .output()
            .unwrap();
        let uid = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| {
                Some(
                    l.strip_prefix("Uid:")?
                        .split_whitespace()
                        .next()?
                        .to_owned(),
                )
            })
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("deploy\n{uid}\n")
        );
    }

    #[test]
    fn the_offered_host_key_from_ssh_debug_output() {
        let log = "OpenSSH_9.2p1 Debian-2+deb12u6, OpenSSL 3.0.19 27 Jan 2026
debug1: Connecting to 127.0.0.1 [127.0.0.1] port 2222.
debug1: Server host key: ssh-ed25519 SHA256:n4rC6ozm3ZTZiBZGNFoUbMVbM1ZvfWE4g5sGxyh2qq0
No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.
Host key verification failed.
";
        assert_eq!(
            server_host_key(log).as_deref(),
            Some("ED25519 key SHA256:n4rC6ozm3ZTZiBZGNFoUbMVbM1ZvfWE4g5sGxyh2qq0")
        );
        assert_eq!(
            server_host_key("debug1: Server host key: ecdsa-sha2-nistp256 SHA256:abc").as_deref(),
            Some("ECDSA key SHA256:abc")
        );
        assert_eq!(server_host_key("Host key verification failed."), None);
    }

    #[test]
    fn destinations() {
        let d = Destination::parse("deploy@10.0.0.5:2222").unwrap();
        assert_eq!(d.user.as_deref(), Some("deploy"));
        assert_eq!(d.host, "10.0.0.5");
        assert_eq!(d.port, Some(2222));
        assert_eq!(d.to_string(), "deploy@10.0.0.5:2222");
        let d = Destination::parse("h1").unwrap();
        assert_eq!((d.user, d.port), (None, None));
        assert!(Destination::parse("root@").is_err());
        assert!(Destination::parse("h:notaport").is_err());
        assert!(Destination::parse("@h").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(q("plain"), "plain");
        assert_eq!(q("a b"), "'a b'");
        assert_eq!(q("it's"), "'it'\\''s'");
        assert_eq!(q("$(rm -rf /)"), "'$(rm -rf /)'");
    }
}
