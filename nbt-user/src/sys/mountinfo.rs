//! `/proc/PID/mountinfo`: the mounts one mount namespace sees. The cgroup layout reads its
//! cgroup mounts from it, `nbt cleanup` the namespace files bind-mounted anywhere.

use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;

pub struct Mount {
    /// The mounted directory of the file system (field 4).
    pub root: String,
    /// Where it is mounted, as its mount namespace sees it (field 5).
    pub mount_point: PathBuf,
    pub fstype: String,
    pub super_options: Vec<String>,
}

/// Parses a mountinfo text: per line, fields separated by spaces, then ` - `, the file system
/// type, its source and its super options.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                root: String::from_utf8_lossy(&unescape(left.get(3)?)).into_owned(),
                mount_point: PathBuf::from(std::ffi::OsString::from_vec(unescape(left.get(4)?))),
                fstype: right.first()?.to_string(),
                super_options: right.get(2)?.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// Undoes the octal escapes of a field (`\040` for a space; also tab, newline, backslash).
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_with_their_octal_escapes() {
        let text =
            "36 25 0:4 net:[4026532] /run/a\\040b\\011c\\134d\\ rw shared:5 - nsfs nsfs rw\n\
                    40 1 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/run/a b\tc\\d\\"));
        assert_eq!(mounts[0].root, "net:[4026532]");
        assert_eq!(mounts[0].fstype, "nsfs");
        assert_eq!(mounts[1].super_options, ["rw", "nsdelegate"]);
    }
}
