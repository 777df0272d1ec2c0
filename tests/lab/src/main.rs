//! `attache-lab`: run lab hosts by hand.
//!
//! ```text
//! cargo run -p attache-lab -- up [--guest bookworm|trixie] NAME...   hosts until Ctrl-C
//! cargo run -p attache-lab -- build [--guest G]                      warm the cache
//! cargo run -p attache-lab -- down                                   stop leftover/kept hosts
//! ```
#![allow(clippy::print_stderr, clippy::print_stdout)]

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use attache_lab::{Guest, Lab};

const USAGE: &str = "usage: attache-lab up [--guest bookworm|trixie] NAME...
       attache-lab build [--guest bookworm|trixie]
       attache-lab down

  up     start hosts (default guest: bookworm), write an SSH config to
         $ATTACHE_LAB_DIR/ssh_config and keep them until Ctrl-C
  build  build the guest images and saved boots (default: all guests)
  down   stop hosts left by finished processes, kept ones (ATTACHE_LAB_KEEP=1) included";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attache-lab: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let Some((verb, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(());
    };
    let mut guests = Vec::new();
    let mut names = Vec::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        if a == "--guest" || a == "-g" {
            let g = it.next().ok_or("--guest needs a value")?;
            guests.push(Guest::from_name(g).ok_or_else(|| format!("unknown guest {g:?}"))?);
        } else if let Some(g) = a.strip_prefix("--guest=") {
            guests.push(Guest::from_name(g).ok_or_else(|| format!("unknown guest {g:?}"))?);
        } else if a.starts_with('-') {
            return Err(format!("unknown option {a}\n{USAGE}").into());
        } else {
            names.push(a.as_str());
        }
    }
    match verb.as_str() {
        "up" => up(guests.first().copied().unwrap_or(Guest::Bookworm), &names),
        "build" => {
            let lab = Lab::new()?;
            let guests = if guests.is_empty() {
                Guest::ALL.to_vec()
            } else {
                guests
            };
            let t = Instant::now();
            lab.prepare_all(&guests)?;
            eprintln!("ready in {:.1} s", t.elapsed().as_secs_f64());
            Ok(())
        }
        "down" => {
            Lab::new()?.stop_leftovers();
            Ok(())
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("unknown command {verb:?}\n{USAGE}").into()),
    }
}

fn up(guest: Guest, names: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let names = if names.is_empty() {
        vec!["h1"]
    } else {
        names.to_vec()
    };
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let lab = Lab::new()?;
    let hosts = lab.hosts(guest, &names)?;
    let config = lab.dir().join("ssh_config");
    lab.write_ssh_config(&config, &hosts.iter().collect::<Vec<_>>())?;
    println!("SSH config: {}", config.display());
    for h in &hosts {
        println!(
            "  ssh -F {} {}          (users: root, deploy, sudopw, nosudo: ssh -F … deploy@{})",
            config.display(),
            h.name(),
            h.name()
        );
        println!(
            "    its http://10.0.2.100/ is 127.0.0.1:{} here",
            h.http_port()
        );
    }
    println!("Ctrl-C stops the hosts.");
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("stopping");
    drop(hosts);
    if !lab.keeps_hosts() {
        let _ = std::fs::remove_file(&config);
    }
    Ok(())
}
