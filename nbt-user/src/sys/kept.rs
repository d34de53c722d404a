//! Files read again and again (a run's cgroup files, sampled every second): each is opened once
//! and read from its start each time (`pread` at offset 0, which makes the kernel generate a
//! cgroup or proc file afresh), so a read costs one system call instead of open, stat, read,
//! read and close. A file that could not be opened is remembered as absent.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
pub struct KeptFiles {
    files: RefCell<HashMap<PathBuf, Option<File>>>,
}

impl KeptFiles {
    /// The file's whole text now; `None` when it does not exist or cannot be read.
    pub fn read(&self, path: &Path) -> Option<String> {
        let mut files = self.files.borrow_mut();
        let file = files
            .entry(path.to_path_buf())
            .or_insert_with(|| File::open(path).ok())
            .as_ref()?;
        let mut text = Vec::with_capacity(512);
        let mut buffer = [0u8; 4096];
        loop {
            match file.read_at(&mut buffer, text.len() as u64) {
                Ok(n) => {
                    text.extend_from_slice(&buffer[..n]);
                    // The kernel fills a read of a cgroup or proc file as far as it can: a
                    // short read is the end (and saves the read that would return 0).
                    if n < buffer.len() {
                        break;
                    }
                }
                Err(_) => return None,
            }
        }
        String::from_utf8(text).ok()
    }

    /// Whether the file exists (as far as opening it goes), remembered like a read.
    pub fn exists(&self, path: &Path) -> bool {
        let mut files = self.files.borrow_mut();
        files
            .entry(path.to_path_buf())
            .or_insert_with(|| File::open(path).ok())
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_file_reads_its_current_text_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "12345\n").unwrap();
        let kept = KeptFiles::default();
        assert_eq!(kept.read(&path).as_deref(), Some("12345\n"));
        // Rewritten in place (as the kernel regenerates a cgroup file): the new text, shorter.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"7\n"))
            .unwrap();
        assert_eq!(kept.read(&path).as_deref(), Some("7\n"));
        assert!(kept.read(&dir.path().join("absent")).is_none());
        assert!(!kept.exists(&dir.path().join("absent")));
        assert!(kept.exists(&path));
        // Longer than one read.
        std::fs::write(&path, "x".repeat(10_000)).unwrap();
        assert_eq!(kept.read(&path).map(|t| t.len()), Some(10_000));
    }
}
