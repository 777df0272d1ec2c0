//! `SHA256SUMS` as `attache publish` writes it, and systemd's version order.
// TODO(merge publish): use publish::index::parse and publish::version::compare.

use std::cmp::Ordering;

/// One `<sha256>  <FILE.raw>` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub sha256: String,
    pub file: String,
}

/// The index's lines, or which line is not in `sha256sum` format.
pub fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || format!("line {} of SHA256SUMS is not `SHA256  FILE.raw`", i + 1);
        let (sum, file) = line.split_once("  ").ok_or_else(bad)?;
        let file = file.strip_prefix('*').unwrap_or(file);
        if sum.len() != 64
            || !sum.bytes().all(|b| b.is_ascii_hexdigit())
            || file.contains('/')
            || !file.ends_with(".raw")
            || file.starts_with('.')
        {
            return Err(bad());
        }
        out.push(Entry {
            sha256: sum.to_ascii_lowercase(),
            file: file.to_owned(),
        });
    }
    Ok(out)
}

/// systemd's `strverscmp_improved`, as sysupdate orders versions.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.is_empty() || b.is_empty() {
        return a.cmp(b);
    }
    let valid = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'~' | b'-' | b'^' | b'.');
    let (mut i, mut j) = (0, 0);
    let at = |s: &[u8], k: usize| s.get(k).copied().unwrap_or(0);
    loop {
        while at(a, i) != 0 && !valid(at(a, i)) {
            i += 1;
        }
        while at(b, j) != 0 && !valid(at(b, j)) {
            j += 1;
        }
        for (sep, reversed) in [(b'~', false), (b'-', false), (b'^', true), (b'.', false)] {
            if sep == b'-' && (at(a, i) == 0 || at(b, j) == 0) {
                return a[i..].cmp(&b[j..]);
            }
            if at(a, i) == sep || at(b, j) == sep {
                let r = (at(a, i) != sep).cmp(&(at(b, j) != sep));
                if r != Ordering::Equal {
                    return if reversed { r.reverse() } else { r };
                }
                i += 1;
                j += 1;
            }
        }
        if at(a, i).is_ascii_digit() || at(b, j).is_ascii_digit() {
            let (mut ai, mut bj) = (i, j);
            while at(a, ai).is_ascii_digit() {
                ai += 1;
            }
            while at(b, bj).is_ascii_digit() {
                bj += 1;
            }
            let r = (ai != i).cmp(&(bj != j));
            if r != Ordering::Equal {
                return r;
            }
            while at(a, i) == b'0' && i < ai {
                i += 1;
            }
            while at(b, j) == b'0' && j < bj {
                j += 1;
            }
            let r = (ai - i)
                .cmp(&(bj - j))
                .then_with(|| a[i..ai].cmp(&b[j..bj]));
            if r != Ordering::Equal {
                return r;
            }
            (i, j) = (ai, bj);
        } else {
            let (mut ai, mut bj) = (i, j);
            while at(a, ai).is_ascii_alphabetic() {
                ai += 1;
            }
            while at(b, bj).is_ascii_alphabetic() {
                bj += 1;
            }
            let n = (ai - i).min(bj - j);
            let r = a[i..i + n]
                .cmp(&b[j..j + n])
                .then_with(|| (ai - i).cmp(&(bj - j)));
            if r != Ordering::Equal {
                return r;
            }
            if ai == i && bj == j {
                // Only separators were left at this point: both ended.
                return a[i..].cmp(&b[j..]);
            }
            (i, j) = (ai, bj);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_in_systemd_order() {
        use Ordering::*;
        for (a, b, o) in [
            ("1.0", "2.0", Less),
            ("2.0", "10.0", Less),
            ("1.0", "1.0", Equal),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0.1", Less),
            ("1.0-1", "1.0.1", Less),
            ("1.0a", "1.0b", Less),
            ("3.0", "2.0-abcd1234", Greater),
        ] {
            assert_eq!(compare(a, b), o, "{a} vs {b}");
            assert_eq!(compare(b, a), o.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn index_lines() {
        let sum = "a".repeat(64);
        let e = parse(&format!("{sum}  demo_1.0.raw\n")).unwrap();
        assert_eq!(e[0].file, "demo_1.0.raw");
        assert!(parse(&format!("{sum}  ../x.raw\n")).is_err());
        assert!(parse("nope  demo_1.0.raw\n").is_err());
    }
}
