//! Talking to the user's own `nix`: evaluate an installable, build it, and
//! read its runtime closure.
//!
//! Everything here must work from Nix 2.8 to today, so it only uses
//! interfaces that are stable across that range: `nix eval --json --apply`,
//! `nix build --json --out-link`, and `nix-store -qR`. Human-readable output is
//! never parsed; Nix's stderr is only shown to the user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde::Deserialize;

/// What the user asked to build, in one of the three forms `nix build` knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installable {
    /// A flake output reference, passed to Nix untouched (`.#demo`, `github:o/r#x`).
    Flake(String),
    /// `-f FILE ATTR`: a Nix file and an attribute path inside it (may be empty).
    File { file: PathBuf, attr: String },
    /// `--expr EXPR`: an expression (Nix wants `--impure` for it).
    Expr(String),
}

impl Installable {
    /// The arguments that name this installable on a `nix` command line.
    fn args(&self) -> Vec<String> {
        match self {
            Installable::Flake(r) => vec![r.clone()],
            Installable::File { file, attr } => {
                let mut v = vec!["--file".to_owned(), file.display().to_string()];
                if !attr.is_empty() {
                    v.push(attr.clone());
                }
                v
            }
            Installable::Expr(e) => vec!["--expr".to_owned(), e.clone()],
        }
    }
}

impl std::fmt::Display for Installable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Installable::Flake(r) => f.write_str(r),
            Installable::File { file, attr } if attr.is_empty() => {
                write!(f, "-f {}", file.display())
            }
            Installable::File { file, attr } => write!(f, "-f {} {attr}", file.display()),
            Installable::Expr(_) => f.write_str("--expr …"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("`{bin}` could not be run ({source}): is Nix installed? Install it, or point at it with --nix PATH")]
    NotInstalled {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{installable} does not provide that attribute:\n{nix_says}")]
    MissingAttribute {
        installable: String,
        nix_says: String,
    },
    #[error("{installable} is a {kind}, not a derivation: point attache at a package or at the result of portableService")]
    NotADerivation { installable: String, kind: String },
    #[error("Nix could not evaluate {installable}:\n{nix_says}")]
    Eval {
        installable: String,
        nix_says: String,
    },
    #[error("Nix could not build {installable}:\n{nix_says}")]
    Build {
        installable: String,
        nix_says: String,
    },
    #[error("Nix printed output attache does not understand ({what}): {detail}")]
    Unexpected { what: &'static str, detail: String },
    #[error("could not read the Nix closure of {path}: {nix_says}")]
    Closure { path: String, nix_says: String },
}

impl NixError {
    /// True when the user can fix it by changing their input (exit code 1);
    /// false when the environment is at fault (exit code 2).
    pub fn is_user_error(&self) -> bool {
        !matches!(
            self,
            NixError::NotInstalled { .. } | NixError::Unexpected { .. } | NixError::Closure { .. }
        )
    }
}

/// Facts about an installable read by evaluation, before anything is built.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Described {
    pub derivation: bool,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub pname: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub attache_spec: bool,
    /// The spec file derivation of a portableService whose own output is
    /// the image (`nix build` packs it): attache builds only this.
    #[serde(default)]
    pub spec: Option<SpecDrv>,
    /// The version of the attache package that packs the image under
    /// `nix build`, when the library was given one.
    #[serde(default)]
    pub packer: Option<String>,
}

/// A derivation known by evaluation, built with `nix-store --realise`.
/// (Not `drvPath`/`outPath`: `builtins.toJSON` turns a set with an
/// `outPath` into that string.)
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SpecDrv {
    pub drv: PathBuf,
    pub out: PathBuf,
}

/// Applied by `nix eval` so one call tells what the installable is without
/// building it. Non-string `pname`/`version` are dropped rather than failing.
const DESCRIBE: &str = r#"d:
  let str = v: if builtins.isString v then v else null; in
  if builtins.isAttrs d && (d.type or null) == "derivation" then {
    derivation = true;
    pname = str (d.pname or null);
    version = str (d.version or null);
    name = str (d.name or null);
    attacheSpec = (d.attacheSpec or false) == true;
    spec = if (d.attacheSpec or false) == true && builtins.isAttrs (d.spec or null)
      && (d.spec.type or null) == "derivation"
      then { drv = d.spec.drvPath; out = d.spec.outPath; } else null;
    packer = if (d.attacheSpec or false) == true && builtins.isAttrs (d.packer or null)
      then str (d.packer.version or null) else null;
  } else { derivation = false; type = builtins.typeOf d; }"#;

/// The user's `nix`, with the arguments they want on every call.
#[derive(Debug, Clone)]
pub struct Nix {
    pub bin: PathBuf,
    pub extra_args: Vec<String>,
}

impl Nix {
    pub fn new(bin: PathBuf, extra_args: Vec<String>) -> Self {
        Nix { bin, extra_args }
    }

    fn command(&self, sub: &str) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg(sub)
            .args(["--extra-experimental-features", "nix-command flakes"])
            .stdin(Stdio::null());
        c
    }

    fn run(&self, mut cmd: Command) -> Result<Output, NixError> {
        cmd.output().map_err(|source| NixError::NotInstalled {
            bin: self.bin.display().to_string(),
            source,
        })
    }

    /// `nix --version`, to fail early and clearly when Nix is missing.
    pub fn version(&self) -> Result<String, NixError> {
        let mut c = Command::new(&self.bin);
        c.arg("--version").stdin(Stdio::null());
        let out = self.run(c)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Evaluates the installable just enough to know what it is.
    pub fn describe(&self, inst: &Installable) -> Result<Described, NixError> {
        let d: Described =
            serde_json::from_value(self.eval_json(inst, DESCRIBE)?).map_err(|e| {
                NixError::Unexpected {
                    what: "nix eval --json",
                    detail: e.to_string(),
                }
            })?;
        if !d.derivation {
            return Err(NixError::NotADerivation {
                installable: inst.to_string(),
                kind: d.kind.unwrap_or_else(|| "value".into()),
            });
        }
        Ok(d)
    }

    /// `nix eval --json INSTALLABLE --apply F`, parsed.
    pub fn eval_json(
        &self,
        inst: &Installable,
        apply: &str,
    ) -> Result<serde_json::Value, NixError> {
        let mut c = self.command("eval");
        c.arg("--json")
            .args(inst.args())
            .args(["--apply", apply])
            .args(&self.extra_args);
        let out = self.run(c)?;
        if !out.status.success() {
            return Err(eval_error(inst, &out.stderr));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| NixError::Unexpected {
            what: "nix eval --json",
            detail: e.to_string(),
        })
    }

    /// Builds the installable and returns its `out` path, kept alive by the
    /// GC root `out_link` for as long as the caller needs it.
    pub fn build(&self, inst: &Installable, out_link: &Path) -> Result<PathBuf, NixError> {
        let mut c = self.command("build");
        c.arg("--json")
            .arg("--out-link")
            .arg(out_link)
            .args(inst.args())
            .args(&self.extra_args);
        let out = self.run(c)?;
        if !out.status.success() {
            let e = eval_error(inst, &out.stderr);
            return Err(match e {
                NixError::Eval {
                    installable,
                    nix_says,
                } => NixError::Build {
                    installable,
                    nix_says,
                },
                other => other,
            });
        }
        parse_build_json(&out.stdout)
    }

    /// Builds a derivation evaluation has written, keeps its output alive
    /// with the GC root `out_link`, and returns the output's runtime
    /// closure, sorted: one `nix-store --query --requisites --use-output
    /// --force-realise --add-root` (unchanged since before 2.8, unlike what
    /// `nix build` makes of a `.drv` path), where a realise and a query
    /// were two processes.
    pub fn realise(
        &self,
        drv: &SpecDrv,
        what: &str,
        out_link: &Path,
    ) -> Result<Vec<PathBuf>, NixError> {
        let mut c = Command::new(self.nix_store_bin());
        c.args(["--query", "--requisites", "--use-output", "--force-realise"])
            .arg("--add-root")
            .arg(out_link)
            .arg(&drv.drv)
            .stdin(Stdio::null());
        let out = c.output().map_err(|source| NixError::NotInstalled {
            bin: self.nix_store_bin().display().to_string(),
            source,
        })?;
        if !out.status.success() {
            return Err(NixError::Build {
                installable: what.to_owned(),
                nix_says: nix_message(&out.stderr),
            });
        }
        Ok(store_paths(&out.stdout))
    }

    /// The runtime closure of `path`, sorted. `nix-store -qR` prints one path
    /// a line and has done so unchanged for a decade, unlike
    /// `nix path-info --json`, whose shape changed three times.
    pub fn closure(&self, path: &Path) -> Result<Vec<PathBuf>, NixError> {
        let mut c = Command::new(self.nix_store_bin());
        c.arg("-qR").arg(path).stdin(Stdio::null());
        let out = c.output().map_err(|source| NixError::NotInstalled {
            bin: self.nix_store_bin().display().to_string(),
            source,
        })?;
        if !out.status.success() {
            return Err(NixError::Closure {
                path: path.display().to_string(),
                nix_says: nix_message(&out.stderr),
            });
        }
        Ok(store_paths(&out.stdout))
    }

    /// `nix-store` beside the chosen `nix`, so `--nix /opt/nix/bin/nix` uses
    /// the matching store tool.
    fn nix_store_bin(&self) -> PathBuf {
        if let Some(dir) = self.bin.parent().filter(|d| !d.as_os_str().is_empty()) {
            let candidate = dir.join("nix-store");
            if candidate.exists() {
                return candidate;
            }
        }
        PathBuf::from("nix-store")
    }
}

/// `nix-store`'s one path a line, sorted and deduplicated.
fn store_paths(stdout: &[u8]) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = String::from_utf8_lossy(stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Maps a failed evaluation to the most specific error we can tell apart.
fn eval_error(inst: &Installable, stderr: &[u8]) -> NixError {
    let nix_says = nix_message(stderr);
    if names_missing_installable(&nix_says) {
        NixError::MissingAttribute {
            installable: inst.to_string(),
            nix_says,
        }
    } else {
        NixError::Eval {
            installable: inst.to_string(),
            nix_says,
        }
    }
}

/// Whether Nix says the installable's own attribute is missing. Only the
/// lookup of the installable says so in these words (`flake '…' does not
/// provide attribute …`, or `attribute 'x' in selection path 'a.x' not
/// found` for `-f`); an `attribute 'x' missing` is an evaluation that
/// failed somewhere inside, e.g. an overlay using what the package set
/// lacks, and its location is what the user needs.
fn names_missing_installable(nix_says: &str) -> bool {
    let Some(first) = nix_says.lines().find(|l| l.starts_with("error:")) else {
        return false;
    };
    first.contains("does not provide attribute")
        || first.contains("in selection path") && first.ends_with("not found")
}

/// Nix's stderr without progress noise, trimmed to what a user needs.
pub fn nix_message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.starts_with("warning: Git tree") && !l.contains("SQLite database"))
        .collect();
    // Keep the tail: Nix puts the actual error last, after any trace.
    let keep = 30;
    let start = lines.len().saturating_sub(keep);
    let msg = lines[start..].join("\n");
    if msg.is_empty() {
        "(Nix printed no message)".into()
    } else {
        msg
    }
}

/// The store paths of a closure as Nix writes it for `exportReferencesGraph`
/// (per path: the path, its deriver or an empty line, the number of
/// references, the references), sorted like [`Nix::closure`] returns them.
pub fn parse_references_graph(text: &str) -> Result<Vec<PathBuf>, NixError> {
    let unexpected = |detail: String| NixError::Unexpected {
        what: "exportReferencesGraph",
        detail,
    };
    let mut lines = text.lines();
    let mut paths = Vec::new();
    while let Some(path) = lines.next() {
        if path.is_empty() {
            continue;
        }
        let _deriver = lines.next();
        let count: usize = lines
            .next()
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| unexpected(format!("no reference count after {path}")))?;
        for _ in 0..count {
            lines
                .next()
                .ok_or_else(|| unexpected(format!("references of {path} cut short")))?;
        }
        paths.push(PathBuf::from(path));
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// Reads `nix build --json`: `[{"drvPath":…,"outputs":{"out":…}}]` on every
/// version since 2.4; newer versions may add fields, and a path-only
/// installable may come without `drvPath`.
pub fn parse_build_json(stdout: &[u8]) -> Result<PathBuf, NixError> {
    #[derive(Deserialize)]
    struct Built {
        #[serde(default)]
        outputs: std::collections::BTreeMap<String, serde_json::Value>,
        #[serde(default)]
        path: Option<String>,
    }
    let unexpected = |detail: String| NixError::Unexpected {
        what: "nix build --json",
        detail,
    };
    let built: Vec<Built> =
        serde_json::from_slice(stdout).map_err(|e| unexpected(e.to_string()))?;
    let first = built
        .into_iter()
        .next()
        .ok_or_else(|| unexpected("no build result".into()))?;
    let out = first
        .outputs
        .get("out")
        .or_else(|| first.outputs.values().next())
        .and_then(|v| v.as_str().map(str::to_owned))
        .or(first.path)
        .ok_or_else(|| unexpected("no output path in the build result".into()))?;
    Ok(PathBuf::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_json_2_8() {
        let j =
            br#"[{"drvPath":"/nix/store/aaa-demo.drv","outputs":{"out":"/nix/store/bbb-demo"}}]"#;
        assert_eq!(
            parse_build_json(j).unwrap(),
            PathBuf::from("/nix/store/bbb-demo")
        );
    }

    #[test]
    fn build_json_multi_output_prefers_out() {
        let j = br#"[{"drvPath":"/nix/store/a.drv","outputs":{"dev":"/nix/store/d","out":"/nix/store/o"},"startTime":1,"stopTime":2}]"#;
        assert_eq!(parse_build_json(j).unwrap(), PathBuf::from("/nix/store/o"));
    }

    #[test]
    fn build_json_without_out_takes_first_output() {
        let j = br#"[{"drvPath":"/nix/store/a.drv","outputs":{"bin":"/nix/store/b"}}]"#;
        assert_eq!(parse_build_json(j).unwrap(), PathBuf::from("/nix/store/b"));
    }

    #[test]
    fn build_json_path_installable() {
        let j = br#"[{"path":"/nix/store/src"}]"#;
        assert_eq!(
            parse_build_json(j).unwrap(),
            PathBuf::from("/nix/store/src")
        );
    }

    #[test]
    fn build_json_garbage_is_an_error_not_a_panic() {
        assert!(parse_build_json(b"").is_err());
        assert!(parse_build_json(b"[]").is_err());
        assert!(parse_build_json(b"{\"x\":1}").is_err());
        assert!(parse_build_json(br#"[{"outputs":{"out":null}}]"#).is_err());
    }

    #[test]
    fn references_graph() {
        let g = "/nix/store/b-spec.json\n\n2\n/nix/store/a-unit\n/nix/store/b-spec.json\n\
                 /nix/store/a-unit\n/nix/store/x-unit.drv\n0\n";
        assert_eq!(
            parse_references_graph(g).unwrap(),
            [
                PathBuf::from("/nix/store/a-unit"),
                PathBuf::from("/nix/store/b-spec.json")
            ]
        );
        assert!(parse_references_graph("/nix/store/a\n\n2\n/nix/store/b\n").is_err());
        assert!(parse_references_graph("/nix/store/a\n\nmany\n").is_err());
    }

    #[test]
    fn describe_json_shapes() {
        let d: Described = serde_json::from_str(
            r#"{"attacheSpec":true,"derivation":true,"name":"x.json","pname":"demo","version":"1.0"}"#,
        )
        .unwrap();
        assert!(d.attache_spec && d.derivation);
        assert_eq!(d.pname.as_deref(), Some("demo"));
        assert_eq!((d.spec, d.packer), (None, None));
        let d: Described = serde_json::from_str(
            r#"{"attacheSpec":true,"derivation":true,"packer":"0.1.0","spec":{"drv":"/nix/store/a-s.json.drv","out":"/nix/store/b-s.json"}}"#,
        )
        .unwrap();
        assert_eq!(d.spec.unwrap().out, PathBuf::from("/nix/store/b-s.json"));
        assert_eq!(d.packer.as_deref(), Some("0.1.0"));
        let d: Described = serde_json::from_str(r#"{"derivation":false,"type":"string"}"#).unwrap();
        assert_eq!(d.kind.as_deref(), Some("string"));
    }

    #[test]
    fn installable_args() {
        assert_eq!(Installable::Flake(".#demo".into()).args(), vec![".#demo"]);
        assert_eq!(
            Installable::File {
                file: "default.nix".into(),
                attr: "demo".into()
            }
            .args(),
            vec!["--file", "default.nix", "demo"]
        );
        assert_eq!(Installable::Expr("1".into()).args(), vec!["--expr", "1"]);
    }

    /// Real messages of Nix 2.8 (`nix eval`/`nix build` on a flake whose
    /// overlay uses `prev.rustPlatform`, which the package set lacks, and
    /// on attributes that do not exist).
    const OVERLAY_LACKS_ATTRIBUTE: &str = "error: attribute 'rustPlatform' missing

       at /nix/store/d90frc8zb69swfbbws94fgm5vgh7w7qh-source/flake.nix:5:17:

            4|       overlay = final: prev: {
            5|         myapp = prev.rustPlatform.buildRustPackage { pname = \"myapp\"; version = \"1\"; };
             |                 ^
            6|       };
(use '--show-trace' to show detailed location information)
";
    const FILE_OVERLAY_LACKS_ATTRIBUTE: &str = "error: attribute 'rustPlatform' missing

       at /tmp/edges-nix/ov/default.nix:1:53:

            1| { demo = (import ./pkgs.nix (final: prev: { myapp = prev.rustPlatform.x; })).myapp; }
             |                                                     ^
(use '--show-trace' to show detailed location information)
";
    const FLAKE_LACKS_OUTPUT: &str = "error: flake 'path:/tmp/edges-nix/ov' does not provide attribute 'packages.x86_64-linux.nope', 'legacyPackages.x86_64-linux.nope' or 'nope'\n";
    const FILE_LACKS_ATTRIBUTE: &str =
        "error: attribute 'nope' in selection path 'nope' not found\n";

    #[test]
    fn a_missing_attribute_inside_a_library_is_an_evaluation_error() {
        let inst = Installable::Flake("path:/tmp/edges-nix/ov#myapp".into());
        let e = eval_error(&inst, OVERLAY_LACKS_ATTRIBUTE.as_bytes());
        assert!(matches!(e, NixError::Eval { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("Nix could not evaluate path:/tmp/edges-nix/ov#myapp:\nerror: attribute 'rustPlatform' missing"),
            "{msg}"
        );
        // Nix's location stays in the message.
        assert!(msg.contains("flake.nix:5:17:"), "{msg}");
        assert!(msg.contains("prev.rustPlatform.buildRustPackage"), "{msg}");

        let inst = Installable::File {
            file: "default.nix".into(),
            attr: "demo".into(),
        };
        let e = eval_error(&inst, FILE_OVERLAY_LACKS_ATTRIBUTE.as_bytes());
        assert!(matches!(e, NixError::Eval { .. }), "{e:?}");
        assert!(e.to_string().contains("default.nix:1:53:"), "{e}");
    }

    #[test]
    fn the_installables_own_attribute_missing() {
        let inst = Installable::Flake("path:/tmp/edges-nix/ov#nope".into());
        let e = eval_error(&inst, FLAKE_LACKS_OUTPUT.as_bytes());
        assert!(matches!(e, NixError::MissingAttribute { .. }), "{e:?}");
        assert!(e.to_string().starts_with(
            "path:/tmp/edges-nix/ov#nope does not provide that attribute:\nerror: flake"
        ));
        let inst = Installable::File {
            file: "default.nix".into(),
            attr: "nope".into(),
        };
        let e = eval_error(&inst, FILE_LACKS_ATTRIBUTE.as_bytes());
        assert!(matches!(e, NixError::MissingAttribute { .. }), "{e:?}");
    }

    #[test]
    fn nix_message_keeps_the_error() {
        let m = nix_message(b"warning: SQLite database '/nix/var' is busy\n\nerror: flake 'x' does not provide attribute 'y'\n");
        assert_eq!(m, "error: flake 'x' does not provide attribute 'y'");
    }
}
