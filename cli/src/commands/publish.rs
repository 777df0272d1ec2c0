//! `attache publish`: build what pull hosts run (or installables ad hoc),
//! and publish the images into a directory (the `publish` stage).

use serde_json::json;

use super::deploy::{build_all, inventory_error};
use super::hosts;
use crate::build::{Built, Source};
use crate::cli::PublishArgs;
use crate::deploy::Interrupt;
use crate::error::Error;
use crate::inventory::{self, Host};
use crate::publish::{self, sign, Image, Options, PublishError, Report, Signing, Trust};
use crate::ui::Ui;

pub fn run(args: &PublishArgs, ui: &Ui) -> Result<(), Error> {
    let pack = args.pack.choice();
    pack.check()?;
    let ssh = &args.fleet.ssh;
    if ssh.ssh_config.is_some() || ssh.accept_new_host_keys || ssh.sudo {
        return Err(Error::Usage(
            "publish reaches no host over SSH: drop --ssh-config, --accept-new-host-keys and --sudo"
                .into(),
        ));
    }
    check_dir(&args.to)?;
    let signing = signing(args)?;
    let rt = hosts::runtime()?;
    let stop = {
        let _in_runtime = rt.enter();
        Interrupt::listen().map_err(|e| Error::io("listening for Ctrl-C", e))?
    };
    let wanted = if ad_hoc(args) {
        sources_ad_hoc(args)?
    } else {
        sources_of_pull_hosts(args, &signing, ui)?
    };
    let built = build_all(&wanted, &pack, ui, &stop)?;
    let images: Vec<Image> = wanted
        .iter()
        .map(|w| image(&built[&w.installable.to_string()]))
        .collect();
    let opts = Options {
        keep: args.keep.max(1),
        dry_run: args.dry_run,
    };
    let asked = || stop.asked();
    let report = publish::publish(&args.to, &images, &signing, opts, &asked, ui).map_err(|e| {
        // ssh-keygen, which the terminal's Ctrl-C reaches too, fails then.
        if stop.asked() && !matches!(e, PublishError::Interrupted(_)) {
            Error::Interrupted(format!(
                "interrupted ({e}): {}/SHA256SUMS lists what it listed before",
                args.to.display()
            ))
        } else {
            error(e)
        }
    })?;
    ui.result(&json!(report), &render(&report));
    Ok(())
}

/// `--to` must name a directory, or where one will be (clap refuses an
/// empty one). Said before anything is built.
fn check_dir(to: &std::path::Path) -> Result<(), Error> {
    if to.exists() && !to.is_dir() {
        return Err(Error::Usage(format!(
            "{} is not a directory: --to names the publish directory (created if missing)",
            to.display()
        )));
    }
    Ok(())
}

/// Installables, not hosts: anything with `#`, or any argument at all
/// under -f or --expr (which name what to build).
fn ad_hoc(args: &PublishArgs) -> bool {
    args.form.file.is_some()
        || args.form.expr.is_some()
        || args.targets.iter().any(|t| t.contains('#'))
}

fn signing(args: &PublishArgs) -> Result<Signing, Error> {
    match (&args.key, args.insecure_unsigned) {
        (Some(key), _) => {
            let public = sign::public_key(key).map_err(|e| error(e.into()))?;
            Ok(Signing::Key {
                key: key.clone(),
                public,
            })
        }
        (None, true) => Ok(Signing::Unsigned),
        (None, false) => Err(Error::Usage(
            "publish signs SHA256SUMS: give --key FILE (the OpenSSH private key whose public half your pull hosts have as pull.publicKey), or --insecure-unsigned to publish for hosts that take unsigned images".into(),
        )),
    }
}

fn sources_ad_hoc(args: &PublishArgs) -> Result<Vec<Source>, Error> {
    if args.on.is_some() {
        return Err(Error::Usage(
            "--on selects inventory hosts: publish either hosts or installables".into(),
        ));
    }
    if args.form.file.is_none() {
        if let Some(host) = args.targets.iter().find(|t| !t.contains('#')) {
            return Err(Error::Usage(format!(
                "{host} is no installable (those name an output with #, like .#demo), and hosts and installables do not mix: publish one kind at a time"
            )));
        }
    }
    args.form.sources(&args.targets, &args.nix)
}

/// The pull hosts the command line selects, checked against the signing
/// key before anything is built, and what they run.
fn sources_of_pull_hosts(
    args: &PublishArgs,
    signing: &Signing,
    ui: &Ui,
) -> Result<Vec<Source>, Error> {
    let flags = args.form.installable_flags();
    if !flags.is_empty() {
        return Err(Error::Usage(format!(
            "{} only with installables (publishing ad hoc, like .#demo): the inventory says what each of its hosts runs",
            flags.join(", ")
        )));
    }
    let flake = &args.fleet.flake;
    let nix = args.nix.nix();
    nix.version()?;
    ui.status("Reading", format!("{flake}#attache.hosts"));
    let hosts = inventory::load(&nix, flake).map_err(|e| inventory_error(e, flake))?;
    let selected = inventory::select(hosts, &args.targets, args.on.as_deref()).map_err(|e| {
        let hint = if args
            .targets
            .iter()
            .any(|t| t.contains(['/', ':']) || t.starts_with('.'))
        {
            " (an installable names its output with #, like .#demo)"
        } else {
            ""
        };
        Error::Usage(format!("{e}{hint}"))
    })?;
    let (mut pull, push): (Vec<Host>, Vec<Host>) =
        selected.into_iter().partition(|h| h.pull.is_some());
    let names = |hs: &[Host]| {
        hs.iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    // With no selector, push hosts were never asked for.
    let named = !args.targets.is_empty() || args.on.is_some();
    if pull.is_empty() {
        return Err(Error::Usage(if !named {
            format!("{flake} has no pull hosts: give a host a pull section (pull = {{ url = \"http://…\"; publicKey = \"ssh-ed25519 …\"; }}), or publish installables ad hoc (attache publish .#demo --to DIR)")
        } else {
            format!(
                "no pull host is selected ({} {} pushed to by attache deploy): select hosts with a pull section",
                names(&push),
                if push.len() == 1 { "is" } else { "are" }
            )
        }));
    }
    if named && !push.is_empty() {
        ui.warn(format!(
            "skipping {}: attache deploy pushes to {}, publish is for pull hosts",
            names(&push),
            if push.len() == 1 { "it" } else { "them" }
        ));
    }
    let trust: Vec<Trust> = pull
        .iter()
        .map(|h| Trust {
            host: &h.name,
            public_key: h.pull.as_ref().and_then(|p| p.public_key.as_deref()),
        })
        .collect();
    publish::check_trust(&trust, signing).map_err(Error::Usage)?;
    let urls: Vec<(&str, &str)> = pull
        .iter()
        .filter_map(|h| Some((h.name.as_str(), h.pull.as_ref()?.url.as_str())))
        .collect();
    if let Some(w) = several_places(&urls) {
        ui.warn(w);
    }
    inventory::share_builds(&nix, flake, &mut pull);
    Ok(pull
        .iter()
        .flat_map(|h| h.services.iter())
        .map(|s| args.nix.source(s.installable.clone()))
        .collect())
}

/// The selected pull hosts fetch from more than one URL (host, url): one
/// directory may be served at each (an origin and a CDN), or they need a
/// publish each. Worth saying either way, since --to is one directory.
fn several_places(urls: &[(&str, &str)]) -> Option<String> {
    let mut by_url: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (host, url) in urls {
        by_url.entry(url).or_default().push(host);
    }
    (by_url.len() > 1).then(|| {
        let places: Vec<String> = by_url
            .iter()
            .map(|(url, hosts)| format!("{} from {url}", hosts.join(", ")))
            .collect();
        format!(
            "the selected pull hosts fetch from {} URLs ({}), and this publish writes one directory: unless it is served at each, publish each URL's hosts to its own (select them by name, @tag or --on)",
            by_url.len(),
            places.join("; ")
        )
    })
}

fn image(b: &Built) -> Image {
    Image {
        name: b.name.clone(),
        version: b.version.clone(),
        path: b.path.clone(),
        sha256: b.sha256.clone(),
        size: b.size,
        manifest: b.manifest.as_ref().map(|m| m.to_bytes()),
    }
}

/// A refusal (the directory's state, the key) is bad input; I/O and a
/// missing ssh-keygen are the environment's.
fn error(e: PublishError) -> Error {
    match e {
        PublishError::Io { what, source } => Error::Io { what, source },
        PublishError::Sign(sign::SignError::Run(io)) => Error::io(
            "running ssh-keygen (OpenSSH's client: apt install openssh-client)",
            io,
        ),
        PublishError::Sign(sign::SignError::Io(what, io)) => Error::io(what, io),
        PublishError::Interrupted(why) => Error::Interrupted(format!("interrupted {why}")),
        other => Error::Usage(other.to_string()),
    }
}

fn render(r: &Report) -> String {
    let mut out = String::new();
    for p in &r.published {
        let how = match (r.dry_run, p.copied) {
            (true, true) => "would be copied",
            (false, true) => "copied",
            (_, false) => "already there",
        };
        out += &format!(
            "{}  sha256 {}  {}  {how}\n",
            p.file,
            &p.sha256.get(..12).unwrap_or(&p.sha256),
            crate::ui::size(p.bytes)
        );
    }
    for f in &r.pruned {
        let verb = if r.dry_run { "would prune" } else { "pruned" };
        out += &format!("{f}  {verb}\n");
    }
    let index = match (r.dry_run, r.index_changed) {
        (true, true) => "would change",
        (false, true) => "written",
        (_, false) => "unchanged",
    };
    out += &format!(
        "{}/SHA256SUMS: {} image{}, {}, {index}\n",
        r.dir.display(),
        r.indexed,
        if r.indexed == 1 { "" } else { "s" },
        if r.signed { "signed" } else { "unsigned" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ui::capture::{self, settings};
    use crate::ui::Verbosity;
    use clap::Parser;

    fn args(argv: &[&str]) -> PublishArgs {
        let cli = crate::cli::Cli::try_parse_from([&["attache", "publish"], argv].concat())
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let crate::cli::Command::Publish(a) = cli.command else {
            panic!("not publish")
        };
        a
    }

    /// `#`, -f or --expr make installables; anything else names hosts.
    #[test]
    fn hosts_or_installables() {
        for hosts in [&["--to", "d"][..], &["@edge", "p1", "--to", "d"]] {
            assert!(!ad_hoc(&args(hosts)), "{hosts:?}");
        }
        for installables in [
            &[".#demo", "--to", "d"][..],
            &["-f", "default.nix", "demo", "--to", "d"],
            &["--impure", "--expr", "(import ./. {}).demo", "--to", "d"],
        ] {
            assert!(ad_hoc(&args(installables)), "{installables:?}");
        }
        let e = sources_ad_hoc(&args(&[".#demo", "h1", "--to", "d"])).unwrap_err();
        assert!(e.to_string().starts_with("h1 is no installable"), "{e}");
        let e = sources_ad_hoc(&args(&[".#demo", "--on", "p*", "--to", "d"])).unwrap_err();
        assert!(
            e.to_string().starts_with("--on selects inventory hosts"),
            "{e}"
        );
        let srcs = sources_ad_hoc(&args(&["-f", "default.nix", "demo", "--to", "d"])).unwrap();
        assert_eq!(srcs[0].installable.to_string(), "-f default.nix demo");
    }

    #[test]
    fn hosts_fetching_from_several_urls_are_pointed_out() {
        assert_eq!(
            several_places(&[("p1", "http://a/x"), ("p2", "http://a/x")]),
            None
        );
        assert_eq!(
            several_places(&[("p1", "http://a/x"), ("p2", "http://b"), ("p3", "http://a/x")]).unwrap(),
            "the selected pull hosts fetch from 2 URLs (p1, p3 from http://a/x; p2 from http://b), and this publish writes one directory: unless it is served at each, publish each URL's hosts to its own (select them by name, @tag or --on)"
        );
    }

    /// Refused before any nix runs, and nothing written.
    #[test]
    fn refusals_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("www");
        let to = to.to_str().unwrap();
        let (ui, _, _) = capture::ui(settings(Verbosity::Quiet));
        let refused = |argv: &[&str]| {
            let e = run(&args(argv), &ui).unwrap_err();
            assert_eq!(e.exit_code(), crate::error::ExitCode::BadInput, "{e}");
            e.to_string()
        };
        let e = refused(&[".#demo", "--to", to]);
        assert!(
            e.starts_with("publish signs SHA256SUMS: give --key FILE"),
            "{e}"
        );
        let e = refused(&[".#demo", "--to", to, "--key", "/nonexistent/key"]);
        assert!(
            e.starts_with("ssh-keygen cannot read the key /nonexistent/key: "),
            "{e}"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = refused(&[
            ".#demo",
            "--to",
            file.to_str().unwrap(),
            "--insecure-unsigned",
        ]);
        assert!(
            e.ends_with(
                "file is not a directory: --to names the publish directory (created if missing)"
            ),
            "{e}"
        );
        let e = refused(&[".#demo", "--to", to, "--insecure-unsigned", "--sudo"]);
        assert!(e.starts_with("publish reaches no host over SSH"), "{e}");
        let e = refused(&["p1", "--name", "x", "--to", to, "--insecure-unsigned"]);
        assert!(e.starts_with("--name only with installables"), "{e}");
        assert!(!dir.path().join("www").exists());
        assert!(crate::cli::Cli::try_parse_from([
            "attache",
            "publish",
            "--to",
            to,
            "--key",
            "k",
            "--insecure-unsigned"
        ])
        .is_err());
    }
}
