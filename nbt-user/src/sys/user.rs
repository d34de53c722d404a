//! Who the workload runs as: the user who invoked nbt through sudo (`SUDO_UID`, `SUDO_GID`), or
//! the one `--user USER[:GROUP]` names. Root only when asked for by name: a workload that is root
//! can leave its cgroups, detach nbt's programs and read the node's signing key.

use std::ffi::{CStr, CString};

use serde::Serialize;

/// A user to run the workload as, resolved from the password and group databases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, from the group database (initgroups(3)).
    pub groups: Vec<u32>,
    pub home: String,
}

impl Identity {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// nbt's own user (for its helpers inside a run's cgroups, such as the memory balloon).
    pub fn nbt_itself() -> Identity {
        // SAFETY: geteuid(2) and getegid(2) cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Identity {
            name: if uid == 0 {
                "root".into()
            } else {
                uid.to_string()
            },
            uid,
            gid,
            groups: vec![gid],
            home: "/".into(),
        }
    }

    /// `name (uid:gid)`, for summaries.
    pub fn describe(&self) -> String {
        format!("{} ({}:{})", self.name, self.uid, self.gid)
    }

    /// The user `--user` names (`USER`, `USER:GROUP`, numeric ids allowed), else the one who ran
    /// sudo, else the caller itself unless that is root. `Err` says what to pass instead.
    pub fn choose(user: Option<&str>) -> Result<Identity, String> {
        if let Some(spec) = user {
            return Self::parse(spec);
        }
        if let Some(uid) = env_id("SUDO_UID")? {
            let mut identity = Self::by_uid(uid).unwrap_or_else(|_| Self::numeric(uid));
            if let Some(gid) = env_id("SUDO_GID")? {
                identity.gid = gid;
            }
            return Ok(identity);
        }
        // SAFETY: getuid(2) cannot fail.
        let uid = unsafe { libc::getuid() };
        if uid != 0 {
            return Self::by_uid(uid);
        }
        Err(
            "the workload would run as root: nbt runs it as the user who invoked sudo \
             (SUDO_UID), or as --user USER[:GROUP] (or $NBT_USER); --user root runs it as root, \
             which can undo its own limits (docs/security.md)"
                .into(),
        )
    }

    /// `USER[:GROUP]`, by name or number.
    pub fn parse(spec: &str) -> Result<Identity, String> {
        let (user, group) = match spec.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (spec, None),
        };
        let mut identity = match user.parse::<u32>() {
            // A uid the database does not know is taken as it is (containers, minimal systems).
            Ok(uid) => Self::by_uid(uid).unwrap_or_else(|_| Self::numeric(uid)),
            Err(_) => Self::by_name(user)?,
        };
        if let Some(group) = group {
            identity.gid = match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_id(group)?,
            };
            identity.groups = match Self::by_name(&identity.name) {
                Ok(_) => supplementary_groups(&identity.name, identity.gid),
                Err(_) => vec![identity.gid],
            };
        }
        Ok(identity)
    }

    /// A uid with no entry in the user database: its own number as its group, no other groups.
    fn numeric(uid: u32) -> Identity {
        Identity {
            name: uid.to_string(),
            uid,
            gid: uid,
            groups: vec![uid],
            home: "/".into(),
        }
    }

    fn by_name(name: &str) -> Result<Identity, String> {
        let c_name = CString::new(name).map_err(|_| format!("--user: '{name}' has a NUL byte"))?;
        // SAFETY: getpwnam(3) with a NUL-terminated name; its result is copied out at once (nbt
        // reads the database from one thread, before any other starts).
        let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
        Self::of_entry(entry).ok_or_else(|| format!("--user: no user named '{name}'"))
    }

    fn by_uid(uid: u32) -> Result<Identity, String> {
        // SAFETY: as in by_name.
        let entry = unsafe { libc::getpwuid(uid) };
        Self::of_entry(entry).ok_or_else(|| format!("--user: no user with uid {uid}"))
    }

    fn of_entry(entry: *const libc::passwd) -> Option<Identity> {
        if entry.is_null() {
            return None;
        }
        // SAFETY: a non-null entry from getpwnam/getpwuid, whose strings are NUL-terminated.
        let (name, uid, gid, home) = unsafe {
            let entry = &*entry;
            (
                CStr::from_ptr(entry.pw_name).to_string_lossy().into_owned(),
                entry.pw_uid,
                entry.pw_gid,
                CStr::from_ptr(entry.pw_dir).to_string_lossy().into_owned(),
            )
        };
        Some(Identity {
            groups: supplementary_groups(&name, gid),
            name,
            uid,
            gid,
            home,
        })
    }
}

fn env_id(var: &str) -> Result<Option<u32>, String> {
    match std::env::var(var) {
        Ok(value) => value
            .parse()
            .map(Some)
            .map_err(|_| format!("${var} is '{value}', not a numeric id")),
        Err(_) => Ok(None),
    }
}

fn group_id(name: &str) -> Result<u32, String> {
    let c_name = CString::new(name).map_err(|_| format!("--user: '{name}' has a NUL byte"))?;
    // SAFETY: getgrnam(3) with a NUL-terminated name; the id is copied out at once.
    let entry = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if entry.is_null() {
        return Err(format!("--user: no group named '{name}'"));
    }
    // SAFETY: a non-null entry from getgrnam.
    Ok(unsafe { (*entry).gr_gid })
}

/// The groups the database gives `name`, with `gid` first.
fn supplementary_groups(name: &str, gid: u32) -> Vec<u32> {
    let Ok(c_name) = CString::new(name) else {
        return vec![gid];
    };
    let mut groups = vec![0 as libc::gid_t; 64];
    let mut count = groups.len() as libc::c_int;
    // SAFETY: getgrouplist(3) writes at most `count` ids and sets `count`; when the buffer is
    // too small it returns -1 with the count needed, and we try once more with that size.
    unsafe {
        if libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) < 0 {
            groups.resize(count.max(0) as usize, 0);
            if libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) < 0 {
                return vec![gid];
            }
        }
    }
    groups.truncate(count.max(0) as usize);
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_by_name_and_number() {
        let root = Identity::parse("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        let nobody = Identity::parse("65534").unwrap();
        assert_eq!(nobody.name, "nobody");
        let with_group = Identity::parse("nobody:0").unwrap();
        assert_eq!((with_group.uid, with_group.gid), (65534, 0));
        assert!(Identity::parse("no-such-user-here").is_err());
        let unknown = Identity::parse("4000000:4000001").unwrap();
        assert_eq!(
            (unknown.uid, unknown.gid, unknown.groups.clone()),
            (4000000, 4000001, vec![4000001])
        );
        assert!(Identity::parse("nobody:no-such-group").is_err());
    }
}
