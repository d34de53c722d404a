//! Pinned links: a run's BPF programs stay attached when nbt dies.
//!
//! A BPF link lives while something holds it: nbt's file descriptor, or a file on a BPF
//! filesystem. Each link a run attaches is pinned under `/sys/fs/bpf/nbt/RUN/`, so that a nbt
//! killed with SIGKILL leaves its workload shaped, metered and gated exactly as it was (a spent
//! balance stays spent) until `nbt cleanup` kills the workload and removes the pins. A run that
//! ends normally unpins them first thing in its take-down; [`Pins`] also unpins on drop, so an
//! error during setup leaves nothing behind.
//!
//! Why pins rather than killing the workload from something that outlives nbt: nothing in user
//! space has to survive for the limits to hold, and a training job is not killed because its
//! supervisor was.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use aya::programs::links::{FdLink, LinkError, PinnedLink};

/// Where the BPF filesystem is mounted by convention (systemd mounts it there at boot).
pub const BPF_FS: &str = "/sys/fs/bpf";

/// statfs(2)'s f_type of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The directory that holds one run's pinned links.
pub fn run_dir(run: &str) -> PathBuf {
    Path::new(BPF_FS).join("nbt").join(run)
}

/// The links a run pinned, unpinned (and so detached) on drop.
#[derive(Debug)]
pub struct Pins {
    dir: PathBuf,
    links: Vec<PinnedLink>,
}

impl Pins {
    /// Makes the run's pin directory, mounting the BPF filesystem at [`BPF_FS`] first where
    /// nothing is mounted there. Without it the run is refused: enforcement that vanished with
    /// nbt would fail open.
    pub fn create(run: &str) -> Result<Pins> {
        ensure_bpf_fs()?;
        let dir = run_dir(run);
        let parent = dir.parent().expect("run_dir has a parent");
        create_private_dir(parent)?;
        create_private_dir(&dir)?;
        Ok(Pins {
            dir,
            links: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pins `link` as `name` in the run's directory.
    pub fn add<L>(&mut self, name: &str, link: L) -> Result<()>
    where
        FdLink: TryFrom<L, Error = LinkError>,
    {
        let link = FdLink::try_from(link)
            .with_context(|| format!("{name}: the kernel gave no BPF link to pin"))?;
        let path = self.dir.join(name);
        let pinned = link
            .pin(&path)
            .with_context(|| format!("pinning BPF link {name} at {}", path.display()))?;
        self.links.push(pinned);
        Ok(())
    }

    /// Unpins every link (each detaches when its file descriptor closes) and removes the
    /// directory.
    /// Leaves the pins (and so the links) in place for a zone that outlives this process.
    pub fn keep(self) {
        // Dropping a PinnedLink closes its descriptor and leaves the pin; only Drop unpins.
        std::mem::forget(self);
    }

    pub fn remove(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        for link in self.links.drain(..) {
            if let Err(err) = link.unpin() {
                errors.push(err.to_string());
            }
        }
        if let Err(err) = remove_run_dir(&self.dir) {
            errors.push(format!("{err:#}"));
        }
        if !errors.is_empty() {
            bail!("unpinning the run's BPF links: {}", errors.join("; "));
        }
        Ok(())
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(err) = self.remove() {
            eprintln!("nbt: {err:#}");
        }
    }
}

/// Removes a run's pin directory and every pin in it (`nbt cleanup`, after the run's processes
/// are gone). Removing a pin releases the link it held.
pub fn remove_run_dir(dir: &Path) -> Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                fs::remove_file(&path)
                    .with_context(|| format!("removing pinned link {}", path.display()))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn is_bpf_fs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs(2) writes into the zeroed struct it is given; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    }
}

fn ensure_bpf_fs() -> Result<()> {
    let path = Path::new(BPF_FS);
    if is_bpf_fs(path) {
        return Ok(());
    }
    fs::create_dir_all(path).with_context(|| format!("creating {BPF_FS}"))?;
    // SAFETY: mount(2) with NUL-terminated literals.
    let mounted = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if mounted != 0 || !is_bpf_fs(path) {
        bail!(
            "mounting the BPF filesystem at {BPF_FS} failed ({}): nbt pins a run's BPF links \
             there so that its limits hold if nbt dies (`mount -t bpf bpf {BPF_FS}`)",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("creating {}", dir.display()))
        }
        _ => Ok(()),
    }
}
