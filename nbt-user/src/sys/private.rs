//! nbt's private files: its state directory and run records, the node key, the agent's token, the
//! receipt store. Directories nbt makes are 0700 and files 0600. A private file is opened without
//! following a symbolic link (`O_NOFOLLOW`) and checked before it is believed: a regular file,
//! owned by the user nbt runs as (its effective uid, root), closed to group and others.
//! Rewritten files go to a fresh name of their own (`O_CREAT|O_EXCL`, 0600) and are renamed into
//! place, so a reader sees the old file or the new one and two writers never share a half-written
//! temporary file.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The mode of every directory nbt makes for itself.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every private file nbt writes.
pub const FILE_MODE: u32 = 0o600;

/// What to do with a private file that nbt owns but whose mode lets group or others read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WideMode {
    /// Refuse it and tell the user to `chmod 600` (a secret: the key, the token).
    Refuse,
    /// Tighten it to 0600 and say so once (a record an older nbt wrote 0644). A file that group
    /// or others may write is refused all the same: nbt never made one.
    Tighten,
}

/// The effective uid: the owner nbt expects of its files.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Says `message` on stderr once per process for `path` (a record re-read every second by the
/// agent must not repeat it).
fn say_once(path: &Path, message: &str) {
    static SAID: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if said.insert(path.to_path_buf()) {
        eprintln!("nbt: {message}");
    }
}

fn refused(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, message)
}

/// Makes `dir` and any missing parents, each with mode 0700; a directory that exists is left as
/// it is (it may be the user's: `--receipts /srv/x/receipts.db`).
pub fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("making {}: {e}", dir.display()),
        )),
    }
}

/// Makes `dir` (0700), or checks the one there: a directory nbt owns by definition (the state
/// directory, `$NBT_HOME`). One owned by another user is refused; one that group or others may
/// enter is tightened to 0700, said once on stderr. `what` names it in messages.
pub fn private_dir(dir: &Path, what: &str) -> io::Result<()> {
    make_dir(dir)?;
    let meta = fs::metadata(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(refused(format!(
            "{what} {} is not a directory",
            dir.display()
        )));
    }
    let (uid, mode) = (meta.uid(), meta.mode() & 0o7777);
    if uid != euid() {
        return Err(refused(format!(
            "{what} {} is owned by uid {uid}, mode {mode:04o}: nbt keeps its state only in a \
             directory of its own user's; expected owner uid {}, mode 0700",
            dir.display(),
            euid()
        )));
    }
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{what} {} has mode {mode:04o}; making it 0700: {e}",
                    dir.display()
                ),
            )
        })?;
        say_once(
            dir,
            &format!(
                "{what} {} had mode {mode:04o} (an older nbt made it so): made it 0700, \
                 private to uid {uid}",
                dir.display()
            ),
        );
    }
    Ok(())
}

/// Tightens the file `path` to 0600 when it is a regular file of nbt's user that group or others
/// may read (made by an older nbt), said once; anything else is left as it is.
pub fn tighten_file(path: &Path, what: &str) -> io::Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    let mode = meta.mode() & 0o7777;
    if !meta.is_file() || meta.uid() != euid() || mode & 0o077 == 0 {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{what} {} has mode {mode:04o}; making it 0600: {e}",
                path.display()
            ),
        )
    })?;
    say_once(
        path,
        &format!(
            "{what} {} had mode {mode:04o} (an older nbt made it so): made it 0600",
            path.display()
        ),
    );
    Ok(())
}

/// Makes the empty private file `path` (0600, `O_CREAT|O_EXCL|O_NOFOLLOW`) when nothing is
/// there; `Ok(false)` when something was.
pub fn create_empty(path: &Path) -> io::Result<bool> {
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("making {}: {e}", path.display()),
        )),
    }
}

/// Opens the private file `path` read-only without following a symbolic link, and checks it: a
/// regular file owned by the effective uid whose mode is closed to group and others (`wide` says
/// what happens when it is not). `what` names it.
fn open_checked(path: &Path, what: &str, wide: WideMode) -> io::Result<fs::File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused(format!(
                "{what} {} is a symbolic link: nbt does not follow links to its private files; \
                 expected a regular file of mode 0600 owned by uid {}",
                path.display(),
                euid()
            )),
            _ => io::Error::new(e.kind(), format!("{what} {}: {e}", path.display())),
        })?;
    let meta = file.metadata()?;
    let (uid, mode) = (meta.uid(), meta.mode() & 0o7777);
    if !meta.is_file() {
        return Err(refused(format!(
            "{what} {} is not a regular file (mode {:o}); expected a regular file of mode 0600 \
             owned by uid {}",
            path.display(),
            meta.mode(),
            euid()
        )));
    }
    if uid != euid() {
        return Err(refused(format!(
            "{what} {} is owned by uid {uid} (mode {mode:04o}), not by uid {} that nbt runs as: \
             nbt believes only its own files; expected mode 0600 owned by uid {}",
            path.display(),
            euid(),
            euid()
        )));
    }
    if mode & 0o077 == 0 {
        return Ok(file);
    }
    if wide == WideMode::Tighten && mode & 0o022 == 0 {
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        say_once(
            path,
            &format!(
                "{what} {} had mode {mode:04o} (an older nbt wrote it so): made it 0600",
                path.display()
            ),
        );
        return Ok(file);
    }
    let may = if mode & 0o022 != 0 { "write" } else { "read" };
    Err(refused(format!(
        "{what} {} has mode {mode:04o} (owner uid {uid}): group or others may {may} it; \
         expected mode 0600 owned by uid {}: chmod 600 {}",
        path.display(),
        euid(),
        path.display()
    )))
}

/// Reads the private file `path` whole, checked as [`open_checked`] says. A missing file is an
/// error of kind `NotFound`; a refused one, of kind `PermissionDenied`, with a message naming
/// the file, its mode and owner, and what is expected.
pub fn read_private(path: &Path, what: &str, wide: WideMode) -> io::Result<Vec<u8>> {
    let mut file = open_checked(path, what, wide)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {what} {}: {e}", path.display())))?;
    Ok(bytes)
}

/// Opens the existing private file `path` to append to it (`O_APPEND|O_NOFOLLOW`, never
/// `O_CREAT`): a regular file owned by the effective uid. Its mode is not judged (whoever made it
/// chose it); only that it is nbt's.
pub fn open_append(path: &Path, what: &str) -> io::Result<fs::File> {
    let file = fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused(format!(
                "{what} {} is a symbolic link: nbt does not follow links to its private files",
                path.display()
            )),
            _ => io::Error::new(e.kind(), format!("{what} {}: {e}", path.display())),
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.uid() != euid() {
        return Err(refused(format!(
            "{what} {} is not a regular file owned by uid {} (mode {:o}, owner uid {})",
            path.display(),
            euid(),
            meta.mode(),
            meta.uid()
        )));
    }
    Ok(file)
}

/// A fresh file of mode 0600 beside `path` under a name of its own (`.NAME.RANDOM.tmp`), made
/// with `O_CREAT|O_EXCL|O_NOFOLLOW`: nobody else's file, and never a link.
fn staged(path: &Path) -> io::Result<(PathBuf, fs::File)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    loop {
        let mut tag = [0u8; 8];
        getrandom::fill(&mut tag)
            .map_err(|e| io::Error::other(format!("reading randomness: {e}")))?;
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let staged = path.with_file_name(format!(".{name}.{tag}.tmp"));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&staged)
        {
            Ok(file) => return Ok((staged, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("making {}: {e}", staged.display()),
                ))
            }
        }
    }
}

/// Writes `bytes` whole into a fresh 0600 file beside `path`, fsyncs it, and renames it over
/// `path` (then fsyncs the directory): a reader sees the old file or the new one, and two
/// writers at once each rename a whole file of their own.
pub fn replace_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (staged, mut file) = staged(path)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&staged, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&staged);
        return Err(io::Error::new(
            e.kind(),
            format!("writing {}: {e}", path.display()),
        ));
    }
    if let Some(dir) = path.parent() {
        if let Ok(dir) = fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Makes the private file `path` with `bytes` if no file is there: written whole under a name of
/// its own, then linked into place, so that of several processes making it at once one wins and
/// none reads another's half-written file. `Ok(false)` when a file was already there.
pub fn create_private(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let (staged, mut file) = staged(path)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::hard_link(&staged, path));
    let _ = fs::remove_file(&staged);
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("making {}: {e}", path.display()),
        )),
    }
}

/// Opens (making it, 0600, when absent) the lock file `path` without following a link and takes
/// an exclusive `flock` on it: held until the returned file closes.
pub fn lock(path: &Path) -> io::Result<fs::File> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening the lock {}: {e}", path.display()),
            )
        })?;
    // A lock an older nbt made 0644 holds nothing to read: made 0600 without a word.
    if let Ok(meta) = file.metadata() {
        if meta.uid() == euid() && meta.mode() & 0o077 != 0 {
            let _ = file.set_permissions(fs::Permissions::from_mode(FILE_MODE));
        }
    }
    loop {
        // SAFETY: flock on a descriptor we own; released when the file closes.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::new(
                e.kind(),
                format!("locking {}: {e}", path.display()),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn dirs_are_made_0700_and_wider_ones_of_ours_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        private_dir(&dir, "the test directory").unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir, "the test directory").unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn files_are_replaced_whole_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        replace_private(&path, b"one").unwrap();
        replace_private(&path, b"two").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            read_private(&path, "the record", WideMode::Refuse).unwrap(),
            b"two"
        );
        // Nothing staged is left beside it.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(!create_private(&path, b"three").unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"two");
    }

    #[test]
    fn links_wide_modes_and_others_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        assert!(create_private(&path, b"x").unwrap());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = read_private(&link, "the secret", WideMode::Tighten).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private(&path, "the secret", WideMode::Refuse).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("mode 0644") && text.contains("chmod 600") && text.contains("uid"),
            "{text}"
        );
        read_private(&path, "the record", WideMode::Tighten).unwrap();
        assert_eq!(mode(&path), 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        let err = read_private(&path, "the record", WideMode::Tighten).unwrap_err();
        assert!(err.to_string().contains("may write"), "{err}");

        if euid() != 0 {
            return;
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = read_private(&path, "the secret", WideMode::Refuse).unwrap_err();
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    }
}
