//! One process at a time on a folder: an exclusive `flock` on the folder
//! itself, held as long as the returned descriptor is open and gone with
//! the process however it ends. A lock on a folder cannot be deleted or
//! replaced by hand as a lock file could (taken for a stale pid file), and
//! every path to the folder (a symbolic link, a bind mount) meets the same
//! lock, since it is the folder's inode that is locked. `migrate` locks a
//! file the same way.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The folder's lock, or the pid of the process holding it (`None`: held,
/// holder unknown), for a message that names it.
pub fn lock(dir: &Path) -> io::Result<Result<File, Option<u32>>> {
    let f = File::open(dir)?;
    // SAFETY: flock on a descriptor `f` owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Ok(f));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(e);
    }
    Ok(Err(holder(&f.metadata()?)))
}

/// The process holding a `flock` on the file `meta` describes, from
/// `/proc/locks` ("1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF").
fn holder(meta: &std::fs::Metadata) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let at = f.iter().position(|w| *w == "FLOCK")?;
        let (pid, id) = (f.get(at + 3)?, f.get(at + 4)?);
        let mut id = id.split(':');
        let (maj, min, ino) = (id.next()?, id.next()?, id.next()?);
        let same = u32::from_str_radix(maj, 16).ok()? == major
            && u32::from_str_radix(min, 16).ok()? == minor
            && ino.parse::<u64>().ok()? == meta.ino();
        same.then(|| pid.parse().ok()).flatten()
    })
}

/// How a refusal names the holder.
pub fn holder_name(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("another process (pid {pid})"),
        None => "another process".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    /// A second lock on the folder is refused and names this process; it is
    /// free again once the first is let go, and a path through a symbolic
    /// link meets the same lock.
    #[test]
    fn a_folder_is_locked_once_through_any_path() {
        let dir = tempfile::tempdir().unwrap();
        let first = super::lock(dir.path()).unwrap().expect("free");
        assert_eq!(super::lock(dir.path()).unwrap().unwrap_err(), Some(std::process::id()));
        let link = dir.path().with_extension("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(super::lock(&link).unwrap().is_err(), "through a link");
        drop(first);
        assert!(super::lock(&link).unwrap().is_ok(), "free once let go");
        std::fs::remove_file(link).unwrap();
    }
}
