//! The host's side of a delta upgrade (see [`crate::delta`]): reading the
//! signatures attache left next to the images, storing a new one, and
//! rebuilding an image from a basis and the uploaded pieces with `dd`.
//!
//! Host-side state: `/var/lib/attache/signatures/FILE.raw.sig`, the
//! signature of `/var/lib/portables/FILE.raw` as attache uploaded it (its
//! sha256 inside), written before the image is placed and pruned with it.
//! A signature whose sha256 is not the image's is never used.

use super::{quote, Script};
use crate::delta::Op;
use crate::names::{basename, PORTABLES};

pub const SIGNATURES: &str = "/var/lib/attache/signatures";

pub fn signature_path(image: &str) -> String {
    format!("{SIGNATURES}/{}.sig", basename(image))
}

/// Where the delta (apply script, then pieces) is uploaded: a partial
/// upload's name, so an interrupted one is cleared like any other.
pub fn delta_path(target: &str) -> String {
    format!("{PORTABLES}/.{}.delta.attache-partial", basename(target))
}

/// Free space, and the signatures a basis can come from: only `prefer`'s
/// (the image the service has attached) when the image's sha256 is the
/// one it records; else every other image's, unchecked (the one chosen is
/// hashed before anything is sent). Fields are read with builtins, as
/// each process costs 30-150 ms on a slow host.
pub fn signatures(prefer: Option<&str>) -> Script {
    Script::new(
        "reading the images' signatures",
        format!(
            r#"set -u
s={SIGNATURES}; p={p}
d={PORTABLES}; [ -d $d ] || d=/var/lib
v=$(df -Pk $d); v=${{v#*"
"}}
# The header goes first: its words depend on the locale.
set -f
# shellcheck disable=SC2086 # split on purpose: the 4th word is Available
set -- $v
set +f; printf 'free_kb\t%s\n' "${{4:-}}"
if [ -n "$p" ] && [ -f "$p" ] && [ -f "$s/${{p##*/}}.sig" ]; then
  want=; read -r _ _ _ _ want _ <"$s/${{p##*/}}.sig"
  got=$(sha256sum "$p"); got=${{got%% *}}
  if [ "$want" = "$got" ]; then printf '@sig\t%s\ttrusted\n' "$p"; cat "$s/${{p##*/}}.sig"; printf '@end\n'; exit 0; fi
  printf 'mismatch\t%s\n' "$p"
fi
for f in "$s"/*.raw.sig; do
  [ -f "$f" ] || continue
  n=${{f##*/}}; img={PORTABLES}/${{n%.sig}}
  [ -f "$img" ] && [ "$img" != "$p" ] || continue
  printf '@sig\t%s\tunchecked\n' "$img"; cat "$f"; printf '@end\n'
done
true"#,
            p = quote(prefer.unwrap_or("")),
        ),
    )
}

/// What [`signatures`] printed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Signatures {
    pub free_kb: Option<u64>,
    /// The preferred image's signature did not match the image.
    pub mismatch: Option<String>,
    /// image path, checked against the image's sha256, signature text.
    pub found: Vec<(String, bool, String)>,
}

pub fn parse_signatures(out: &str) -> Signatures {
    let mut r = Signatures::default();
    let mut cur: Option<(String, bool, String)> = None;
    for line in out.lines() {
        if let Some((_, _, text)) = cur.as_mut() {
            if line == "@end" {
                r.found.extend(cur.take());
            } else {
                text.push_str(line);
                text.push('\n');
            }
            continue;
        }
        let mut parts = line.split('\t');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("free_kb"), Some(v), _) => r.free_kb = v.trim().parse().ok(),
            (Some("mismatch"), Some(p), _) => r.mismatch = Some(p.to_owned()),
            (Some("@sig"), Some(p), Some(t)) => {
                cur = Some((p.to_owned(), t == "trusted", String::new()));
            }
            _ => {}
        }
    }
    // A signature cut short (no @end) is left out.
    r
}

/// The script at the head of the delta file: `dd`s that copy ranges of
/// `basis` and read the pieces from its own file after `header` bytes, in
/// order, into `out`. Padded to exactly the length it says the pieces
/// start at; nothing after its `exit` is read by sh.
pub fn apply_script(delta: &str, basis: &str, out: &str, ops: &[Op]) -> String {
    let mut header = 4096u64;
    loop {
        let s = render(delta, basis, out, ops, header);
        if (s.len() as u64) < header {
            let mut s = s;
            s.push('#');
            while (s.len() as u64) < header - 1 {
                s.push(' ');
            }
            s.push('\n');
            return s;
        }
        header = (s.len() as u64 + 4096).next_multiple_of(4096);
    }
}

fn render(delta: &str, basis: &str, out: &str, ops: &[Op], header: u64) -> String {
    let mut s = format!(
        "set -eu\nb={b}\nd={d}\no={o}\n",
        b = quote(basis),
        d = quote(delta),
        o = quote(out)
    );
    s += "umask 077\nexec 4>\"$o\"\n";
    let mut piece = header;
    for op in ops {
        let (src, skip, len) = match *op {
            Op::Copy { offset, len } => ("\"$b\"", offset, len),
            Op::Literal { len, .. } => {
                piece += len;
                ("\"$d\"", piece - len, len)
            }
        };
        s += &format!(
            "dd if={src} bs=1M iflag=skip_bytes,count_bytes skip={skip} count={len} status=none >&4\n"
        );
    }
    s += "exec 4>&-\nexit 0\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_script_is_exactly_its_header() {
        let ops = [
            Op::Copy {
                offset: 0,
                len: 8192,
            },
            Op::Literal {
                from: 8192,
                len: 10,
            },
        ];
        let s = apply_script("/d", "/b", "/o", &ops);
        assert_eq!(s.len(), 4096);
        assert!(s.contains("skip=4096 count=10"), "{s}");
        // Many ops: the header grows, and the pieces' offsets with it.
        let many: Vec<Op> = (0..200)
            .flat_map(|i| {
                [
                    Op::Copy {
                        offset: i * 8192,
                        len: 8192,
                    },
                    Op::Literal { from: 0, len: 1 },
                ]
            })
            .collect();
        let s = apply_script("/d", "/b", "/o", &many);
        assert_eq!(s.len() % 4096, 0);
        let first = format!("skip={} count=1 ", s.len());
        assert!(s.contains(&first), "{first}");
    }

    /// The script as the host runs it: `sh` and coreutils' `dd`, on files.
    #[test]
    fn the_host_rebuilds_the_image_with_dd() {
        use crate::delta::{diff, Signature};
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
        let basis: Vec<u8> = (0..300_000u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
            .collect();
        let mut new = b"a new store path".to_vec();
        new.extend_from_slice(&basis[..100_000]);
        new.extend_from_slice(b"changed");
        new.extend_from_slice(&basis[150_000..]);
        std::fs::write(p("basis"), &basis).unwrap();
        let d = diff(&Signature::of(&basis, 4096), &new);
        assert!(d.copied_bytes() > 200_000);
        let mut file = apply_script(&p("delta"), &p("basis"), &p("out"), &d.ops).into_bytes();
        file.extend(d.pieces(&new).flatten());
        std::fs::write(p("delta"), &file).unwrap();
        let out = std::process::Command::new("sh")
            .arg(p("delta"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(
            std::fs::read(p("out")).unwrap() == new,
            "rebuilt image differs"
        );
    }

    #[test]
    fn signatures_parse() {
        let out = "free_kb\t1234\nmismatch\t/var/lib/portables/a_1.raw\n@sig\t/var/lib/portables/b_1.raw\tunchecked\nattache-signature 1 4096 0 x\n@end\n@sig\t/var/lib/portables/c.raw\tunchecked\ncut";
        let s = parse_signatures(out);
        assert_eq!(s.free_kb, Some(1234));
        assert_eq!(s.mismatch.as_deref(), Some("/var/lib/portables/a_1.raw"));
        assert_eq!(
            s.found,
            [(
                "/var/lib/portables/b_1.raw".to_owned(),
                false,
                "attache-signature 1 4096 0 x\n".to_owned()
            )]
        );
    }
}
