//! Which of two versions is newer, as systemd decides it
//! (`strverscmp_improved`, used by sysupdate and `systemd-analyze
//! compare-versions`): publish keeps the newest versions of a service, and a
//! pull host takes the newest one, so both must agree with systemd.

use std::cmp::Ordering;

/// `a` against `b`: `Greater` when `a` is the newer version.
///
/// Versions are read in segments, each numeric or alphabetic, and may start
/// with `~` (a pre-release, older than anything), `-` (a release), `^` (a
/// patched release) or `.` (a point release), in that order from oldest to
/// newest; a segment with no such prefix is the newest. Numbers compare by
/// value, a number is newer than letters, and any other character only
/// separates segments. A faithful port of systemd's function.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    // Past the end reads as NUL, as in C.
    let at = |s: &[u8], i: usize| s.get(i).copied().unwrap_or(0);
    let valid = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'~' | b'-' | b'^' | b'.');
    let (mut i, mut j) = (0, 0);
    loop {
        while at(a, i) != 0 && !valid(at(a, i)) {
            i += 1;
        }
        while at(b, j) != 0 && !valid(at(b, j)) {
            j += 1;
        }
        // Each prefix in systemd's order; the side without it is newer.
        for prefix in [b'~', b'-', b'^', b'.'] {
            if at(a, i) == prefix || at(b, j) == prefix {
                let r = (at(a, i) != prefix).cmp(&(at(b, j) != prefix));
                if r != Ordering::Equal {
                    return r;
                }
                i += 1;
                j += 1;
            }
            // After '~' (only there), a string that ends is older.
            if prefix == b'~' && (at(a, i) == 0 || at(b, j) == 0) {
                return at(a, i).cmp(&at(b, j));
            }
        }
        let (ai, bj) = (i, j);
        if at(a, i).is_ascii_digit() || at(b, j).is_ascii_digit() {
            while at(a, i).is_ascii_digit() {
                i += 1;
            }
            while at(b, j).is_ascii_digit() {
                j += 1;
            }
            // A number is newer than no number.
            let r = (i != ai).cmp(&(j != bj));
            if r != Ordering::Equal {
                return r;
            }
            let (x, y) = (trim_zeros(&a[ai..i]), trim_zeros(&b[bj..j]));
            let r = x.len().cmp(&y.len()).then_with(|| x.cmp(y));
            if r != Ordering::Equal {
                return r;
            }
        } else {
            while at(a, i).is_ascii_alphabetic() {
                i += 1;
            }
            while at(b, j).is_ascii_alphabetic() {
                j += 1;
            }
            let (x, y) = (&a[ai.min(a.len())..i], &b[bj.min(b.len())..j]);
            let n = x.len().min(y.len());
            let r = x[..n].cmp(&y[..n]).then(x.len().cmp(&y.len()));
            if r != Ordering::Equal {
                return r;
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let start = digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len());
    &digits[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each one newer than the one before: systemd's own list
    /// (string-util-fundamental.c), then what attache names itself.
    #[test]
    fn systemds_order() {
        let order = [
            "122.1",
            "123~rc1-1",
            "123",
            "123-a",
            "123-a.1",
            "123-1",
            "123-1.1",
            "123^post1",
            "123.a-1",
            "123.1-1",
            "123a-1",
            "124-1",
        ];
        for w in order.windows(2) {
            assert_eq!(compare(w[0], w[1]), Ordering::Less, "{} < {}", w[0], w[1]);
            assert_eq!(
                compare(w[1], w[0]),
                Ordering::Greater,
                "{} > {}",
                w[1],
                w[0]
            );
        }
        for (i, a) in order.iter().enumerate() {
            for b in &order[i + 1..] {
                assert_eq!(compare(a, b), Ordering::Less, "{a} < {b}");
            }
        }
    }

    /// From systemd's test-string-util.c (test_strverscmp_improved and its
    /// newer/equal cases).
    #[test]
    fn systemds_tests() {
        let newer = [
            ("1.0", "1.1"),
            ("1.9", "1.10"),
            ("1.1", "1.1.1"),
            ("1", "1.0"),
            ("0.9", "1"),
            ("1~rc1", "1"),
            ("1~rc1", "1~rc2"),
            ("1~", "1~a"),
            ("123", "124"),
            ("123.a", "123.b"),
            ("123.a", "123a"),
            ("abc", "abcde"),
            ("a", "0"),
            ("", "0"),
            ("~", ""),
            ("~", "0"),
            ("122.1", "123~rc1-1"),
            ("5.2", "5.11"),
            ("10", "009999"),
        ];
        for (old, new) in newer {
            assert_eq!(compare(old, new), Ordering::Less, "{old} < {new}");
            assert_eq!(compare(new, old), Ordering::Greater, "{new} > {old}");
        }
        for (x, y) in [
            ("", ""),
            ("0", "0"),
            ("0", "00"),
            ("123_a", "123a"),
            ("1.0", "1.0"),
        ] {
            assert_eq!(compare(x, y), Ordering::Equal, "{x} = {y}");
        }
    }

    /// A rebuilt version (`1.0-0123abcd`, deploy's and publish's name for
    /// other content under a published version) is newer than the version
    /// itself and older than the next.
    #[test]
    fn content_tags_sort_after_their_version() {
        assert_eq!(compare("1.0-0123abcd", "1.0"), Ordering::Greater);
        assert_eq!(compare("1.0-0123abcd", "1.1"), Ordering::Less);
        assert_eq!(compare("2.0", "10.0"), Ordering::Less);
    }
}
