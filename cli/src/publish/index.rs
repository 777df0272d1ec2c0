//! `SHA256SUMS`, the index of a publish directory: one line per image,
//! `<sha256><two spaces><NAME_VERSION.raw>`, sorted by file name, as
//! `sha256sum` writes and `sha256sum -c` reads it. `attache publish` writes
//! it; a pull host reads it (after checking its signature) to learn what is
//! published.

use crate::names::ImageFile;

/// One image the index lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The file name in the directory (`demo_1.0.raw`).
    pub file: String,
    /// 64 lowercase hex digits.
    pub sha256: String,
    /// The service (image) name, from the file name.
    pub name: String,
    /// The version, from the file name (compare with `version::compare`).
    pub version: String,
}

impl Entry {
    /// An entry for `file`, which must be an image file name.
    pub fn new(file: &str, sha256: &str) -> Option<Entry> {
        let image = image_file(file)?;
        Some(Entry {
            file: file.to_owned(),
            sha256: sha256.to_owned(),
            name: image.name().to_owned(),
            version: image.version().to_owned(),
        })
    }
}

/// Why an index cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("it is not text (UTF-8)")]
    NotText,
    #[error("line {line} is not `<sha256>  <NAME_VERSION.raw>`: '{text}'")]
    Malformed { line: usize, text: String },
    #[error(
        "line {line} names '{file}', which is not an image file name (NAME_VERSION.raw, no path)"
    )]
    NotAnImage { line: usize, file: String },
    #[error("line {line} names {file} a second time")]
    Twice { line: usize, file: String },
}

/// A plain `NAME_VERSION.raw` in the directory itself: no path, no hidden
/// file, and read back to the same name.
fn image_file(file: &str) -> Option<ImageFile> {
    if file.contains(['/', '\\', '\n', '\r']) || file.starts_with('.') {
        return None;
    }
    ImageFile::parse(file).filter(|f| f.file_name() == file)
}

/// Reads an index. Strict, since a pull host acts on it: every line must
/// be an image with its sha256 (sha256sum's binary marker `*` is taken too),
/// no file twice. Blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Entry>, IndexError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let malformed = || IndexError::Malformed {
            line,
            text: raw.chars().take(120).collect(),
        };
        let (sha, file) = raw
            .split_at_checked(64)
            .and_then(|(sha, rest)| {
                let file = rest.strip_prefix("  ").or(rest.strip_prefix(" *"))?;
                Some((sha, file))
            })
            .ok_or_else(malformed)?;
        if !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(malformed());
        }
        let entry = Entry::new(file, sha).ok_or_else(|| IndexError::NotAnImage {
            line,
            file: file.to_owned(),
        })?;
        if entries.iter().any(|e| e.file == entry.file) {
            return Err(IndexError::Twice {
                line,
                file: entry.file,
            });
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Writes an index: sorted by file name, one line each, `sha256sum`'s text
/// format.
pub fn render(entries: &[Entry]) -> String {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.file.cmp(&b.file));
    sorted
        .iter()
        .map(|e| format!("{}  {}\n", e.sha256, e.file))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn renders_sorted_sha256sum_lines() {
        let entries = [
            Entry::new("shop_2.0.raw", A).unwrap(),
            Entry::new("demo_1.0-0123abcd.raw", B).unwrap(),
            Entry::new("demo_1.0.raw", A).unwrap(),
        ];
        let text = render(&entries);
        assert_eq!(
            text,
            format!("{A}  demo_1.0-0123abcd.raw\n{A}  demo_1.0.raw\n{A}  shop_2.0.raw\n")
                .replacen(A, B, 1)
        );
        let back = parse(&text).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(
            (back[0].name.as_str(), back[0].version.as_str()),
            ("demo", "1.0-0123abcd")
        );
        assert_eq!(back[2].file, "shop_2.0.raw");
        assert_eq!(render(&back), text);
        assert_eq!(render(&[]), "");
        assert_eq!(parse("").unwrap(), []);
    }

    #[test]
    fn reads_what_sha256sum_writes() {
        let e = parse(&format!("{A} *demo_1.0.raw\n\n{B}  shop_1.raw")).unwrap();
        assert_eq!(e[0].file, "demo_1.0.raw");
        assert_eq!((e[1].name.as_str(), e[1].version.as_str()), ("shop", "1"));
    }

    #[test]
    fn refuses_what_a_host_must_not_act_on() {
        let err = |text: &str| parse(text).unwrap_err().to_string();
        assert!(err(&format!("{A} demo_1.0.raw")).starts_with("line 1 is not"));
        assert!(err(&format!("{}  demo_1.0.raw", A.to_uppercase())).starts_with("line 1 is not"));
        assert!(err(&format!("{}  demo_1.0.raw", &A[1..])).starts_with("line 1 is not"));
        for bad in [
            "../etc_1.raw",
            "sub/demo_1.0.raw",
            ".demo_1.0.raw",
            "demo_1.0.raw.json",
            "SHA256SUMS",
            "_1.raw",
        ] {
            assert_eq!(
                err(&format!("{A}  {bad}\n")),
                format!("line 1 names '{bad}', which is not an image file name (NAME_VERSION.raw, no path)")
            );
        }
        assert_eq!(
            err(&format!("{A}  demo_1.0.raw\n{B}  demo_1.0.raw\n")),
            "line 2 names demo_1.0.raw a second time"
        );
    }
}
