//! A static-file HTTP/1.1 server on this machine's loopback, for guests to
//! fetch from: each host's `http://10.0.2.100/` leads to its own loopback
//! port ([`Host::http_port`]), and a [`Server`] listens there.
//!
//! One connection per request (`Connection: close`): QEMU starts a `socat`
//! per guest connection, so the server can stop and start again while the
//! guest runs, and a stopped server looks to the guest like an origin that
//! is down (the connection closes without a reply).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Context, Error, Host, Result};

/// The URL a lab guest fetches from: [`Host::http_port`] on this machine.
pub const FETCH_URL: &str = "http://10.0.2.100";

/// What one path was served: requests of any kind (404s included) and the
/// body bytes sent. Counted before they are written, so that a client that
/// has its whole answer finds it counted (a transfer the client cut may
/// count up to one 64 KiB chunk it did not take).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub requests: u64,
    pub not_found: u64,
    pub bytes: u64,
}

/// Requests and bytes per request path (`/SHA256SUMS`), since the server
/// was made or [`Server::reset_stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub paths: BTreeMap<String, Served>,
}

impl Stats {
    /// What `path` (`/demo_1.0.raw`) was served; zero if never asked for.
    pub fn get(&self, path: &str) -> Served {
        self.paths.get(path).copied().unwrap_or_default()
    }

    /// The sum over all paths.
    pub fn total(&self) -> Served {
        self.paths.values().fold(Served::default(), |a, s| Served {
            requests: a.requests + s.requests,
            not_found: a.not_found + s.not_found,
            bytes: a.bytes + s.bytes,
        })
    }
}

struct Shared {
    dir: PathBuf,
    /// Fault: close each 200 response after this many body bytes.
    cut_after: Mutex<Option<u64>>,
    stats: Mutex<Stats>,
    /// Open connections by number, shut down when the server stops.
    conns: Mutex<(u64, BTreeMap<u64, TcpStream>)>,
}

struct Listening {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Serves the files of one directory (GET and HEAD; no listings) on
/// 127.0.0.1 ports; stops when dropped. Files are read at each request, so
/// a test changes what is served by changing the directory.
pub struct Server {
    ports: Vec<u16>,
    shared: Arc<Shared>,
    running: Vec<Listening>,
}

impl Host {
    /// Serves `dir` to this host: its `http://10.0.2.100/PATH` is `dir/PATH`.
    pub fn serve(&self, dir: impl Into<PathBuf>) -> Result<Server> {
        Server::start(dir, &[self.http_port()])
    }
}

impl Server {
    /// Serves `dir` on 127.0.0.1 at each of `ports` (one stats for all).
    pub fn start(dir: impl Into<PathBuf>, ports: &[u16]) -> Result<Server> {
        let mut server = Server {
            ports: ports.to_vec(),
            shared: Arc::new(Shared {
                dir: dir.into(),
                cut_after: Mutex::default(),
                stats: Mutex::default(),
                conns: Mutex::default(),
            }),
            running: Vec::new(),
        };
        server.resume()?;
        Ok(server)
    }

    /// Serves `dir` to several hosts at once.
    pub fn for_hosts(dir: impl Into<PathBuf>, hosts: &[&Host]) -> Result<Server> {
        let ports: Vec<u16> = hosts.iter().map(|h| h.http_port()).collect();
        Server::start(dir, &ports)
    }

    /// The directory served.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The loopback ports listened on.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Whether it listens (not [`Server::stop`]ped).
    pub fn is_running(&self) -> bool {
        !self.running.is_empty()
    }

    /// A copy of the counts so far.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    pub fn reset_stats(&self) {
        *lock(&self.shared.stats) = Stats::default();
    }

    /// Fault: from now on, every file's response announces its full length
    /// but closes the connection after `bytes` of its body (an interrupted
    /// download); `None` serves whole files again.
    pub fn cut_after(&self, bytes: Option<u64>) {
        *lock(&self.shared.cut_after) = bytes;
    }

    /// Stops listening and cuts open connections: to a guest, the origin
    /// is down. [`Server::resume`] starts it again on the same ports.
    pub fn stop(&mut self) {
        for l in &self.running {
            l.stop.store(true, Ordering::SeqCst);
            // Wakes the blocking accept; it sees the flag and returns.
            let _ = TcpStream::connect(("127.0.0.1", l.port));
        }
        for l in self.running.drain(..) {
            let _ = l.thread.join();
        }
        for (_, c) in std::mem::take(&mut lock(&self.shared.conns).1) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Listens again (after [`Server::stop`]); a no-op while running.
    pub fn resume(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        for &port in &self.ports {
            // std sets SO_REUSEADDR: the port is free again at once after a stop.
            let listener = TcpListener::bind(("127.0.0.1", port)).context(|| {
                format!("lab server: listening on 127.0.0.1:{port} (is something else using it?)")
            });
            let listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    self.stop();
                    return Err(e);
                }
            };
            let stop = Arc::new(AtomicBool::new(false));
            let shared = self.shared.clone();
            let flag = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("lab-http-{port}"))
                .spawn(move || accept_loop(&listener, &flag, &shared))
                .map_err(Error::from)?;
            self.running.push(Listening { port, stop, thread });
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let id = {
            let mut conns = lock(&shared.conns);
            conns.0 += 1;
            let id = conns.0;
            if let Ok(clone) = conn.try_clone() {
                conns.1.insert(id, clone);
            }
            id
        };
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("lab-http-conn".into())
            .spawn(move || {
                let _ = handle(&conn, &shared);
                // The clone kept for `stop` holds the socket open: close it
                // for the client, then forget it.
                let _ = conn.shutdown(Shutdown::Both);
                lock(&shared.conns).1.remove(&id);
            });
    }
}

/// The request line and headers, up to the blank line.
fn read_head(mut conn: &TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(io::Error::other("request head too long"));
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn handle(mut conn: &TcpStream, shared: &Shared) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.set_write_timeout(Some(Duration::from_secs(60)))?;
    let head = read_head(conn)?;
    let mut words = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split(['?', '#']).next().unwrap_or("").to_string();

    let count = |not_found: bool, bytes: u64| {
        let mut stats = lock(&shared.stats);
        let s = stats.paths.entry(path.clone()).or_default();
        s.requests += 1;
        s.not_found += u64::from(not_found);
        s.bytes += bytes;
    };
    if method != "GET" && method != "HEAD" {
        count(false, 0);
        return respond(
            conn,
            "405 Method Not Allowed",
            b"method not allowed\n",
            true,
        );
    }
    let file = local_path(&shared.dir, &path).and_then(|p| {
        let f = fs::File::open(p).ok()?;
        f.metadata().ok()?.is_file().then_some(f)
    });
    let Some(mut file) = file else {
        let body: &[u8] = b"not found\n";
        // A 404's body is what a downloader may save: it counts.
        count(
            true,
            if method == "GET" {
                body.len() as u64
            } else {
                0
            },
        );
        return respond(conn, "404 Not Found", body, method == "GET");
    };
    let len = file.metadata()?.len();
    count(false, 0);
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\n\
         Connection: close\r\n\r\n"
    )?;
    if method == "HEAD" {
        return Ok(());
    }
    let mut left = lock(&shared.cut_after).unwrap_or(u64::MAX);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            return Ok(());
        }
        left -= n as u64;
        // Before the write: the client may be done as soon as it has them.
        lock(&shared.stats)
            .paths
            .entry(path.clone())
            .or_default()
            .bytes += n as u64;
        conn.write_all(&buf[..n])?;
    }
}

fn respond(mut conn: &TcpStream, status: &str, body: &[u8], with_body: bool) -> io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    if with_body {
        conn.write_all(body)?;
    }
    Ok(())
}

/// `dir` joined with a request path (`/a/b.raw`, percent-escapes decoded),
/// or `None` for one that would leave `dir`.
fn local_path(dir: &Path, path: &str) -> Option<PathBuf> {
    let rel = percent_decode(path.strip_prefix('/')?)?;
    let rel = Path::new(&rel);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(dir.join(rel))
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(port: u16, request: &str) -> io::Result<String> {
        let mut c = TcpStream::connect(("127.0.0.1", port))?;
        c.write_all(request.as_bytes())?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn fetch_url_is_the_guestfwd_address() {
        assert_eq!(FETCH_URL, format!("http://{}", crate::vm::FETCH_ADDR));
    }

    #[test]
    fn serves_counts_stops_and_resumes() {
        let dir = std::env::temp_dir().join(format!("lab-server-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("SHA256SUMS"), "abc  x.raw\n").unwrap();
        fs::write(dir.join("sub/a b"), "spaced").unwrap();
        let port = free_port();
        let mut server = Server::start(&dir, &[port]).unwrap();

        let r = get(port, "GET /SHA256SUMS HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Length: 11\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nabc  x.raw\n"), "{r}");
        let r = get(port, "HEAD /SHA256SUMS HTTP/1.1\r\n\r\n").unwrap();
        assert!(
            r.contains("Content-Length: 11\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        let r = get(port, "GET /sub/a%20b?x=1 HTTP/1.1\r\n\r\n").unwrap();
        assert!(r.ends_with("spaced"), "{r}");
        for missing in ["/nope", "/sub", "/../etc/passwd", "/sub/%2e%2e/SHA256SUMS"] {
            let r = get(port, &format!("GET {missing} HTTP/1.1\r\n\r\n")).unwrap();
            assert!(r.starts_with("HTTP/1.1 404 "), "{missing}: {r}");
        }
        let r = get(port, "POST /SHA256SUMS HTTP/1.1\r\n\r\n").unwrap();
        assert!(r.starts_with("HTTP/1.1 405 "), "{r}");

        let stats = server.stats();
        assert_eq!(
            stats.get("/SHA256SUMS"), // GET, HEAD and POST
            Served {
                requests: 3,
                not_found: 0,
                bytes: 11
            }
        );
        assert_eq!(stats.get("/sub/a%20b").bytes, 6);
        assert_eq!(stats.get("/nope").not_found, 1);
        assert_eq!(stats.get("/nope").bytes, 10);
        assert_eq!(stats.total().requests, 8, "{stats:#?}");

        server.cut_after(Some(4));
        let r = get(port, "GET /SHA256SUMS HTTP/1.1\r\n\r\n").unwrap();
        assert!(
            r.contains("Content-Length: 11\r\n") && r.ends_with("\r\n\r\nabc "),
            "{r}"
        );
        assert_eq!(server.stats().get("/SHA256SUMS").bytes, 15);
        server.cut_after(None);

        server.stop();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        server.resume().unwrap();
        server.reset_stats();
        assert!(get(port, "GET /SHA256SUMS HTTP/1.1\r\n\r\n")
            .unwrap()
            .ends_with("x.raw\n"));
        assert_eq!(server.stats().total().requests, 1);
        drop(server);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
