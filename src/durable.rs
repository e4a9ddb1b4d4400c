//! Making names durable, not just bytes: a file's `fsync` keeps its data,
//! but the directory entry that names it (and the entries naming every new
//! directory on its path) survive a power cut only once the directory that
//! holds them is fsynced too. The power-loss tests (`tests/powerloss/`) hold
//! the server to that, POSIX's minimum.

use std::fs::File;
use std::io;
use std::path::Path;

/// fsyncs a directory, so the names in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Whether `e` says the disk (or the user's quota on it) is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// The bytes free to this process on the filesystem that holds `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer statvfs fills on success.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: filled, the call succeeded.
    let st = unsafe { st.assume_init() };
    // (Their types are u64 here, narrower on some targets.)
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Writes `bytes` to `path` whole or not at all, durably: into a
/// temporary file beside it (`path` with the extension `tmp`), fsynced,
/// renamed over `path`, and the folder fsynced so the new name holds.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir),
        None => sync_dir(Path::new(".")),
    }
}

/// `create_dir_all`, and each directory it created is named durably (its
/// parent fsynced once it holds it).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    sync_dir(parent)
}

/// fsyncs every regular file directly in `dir` and in its subdirectories,
/// then the directories: for a store (sled) whose own flush does not reach
/// the disk's cache or the filesystem's metadata.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let t = entry.file_type()?;
        if t.is_file() {
            File::open(entry.path())?.sync_all()?;
        } else if t.is_dir() {
            sync_tree(&entry.path())?;
        }
    }
    sync_dir(dir)
}
