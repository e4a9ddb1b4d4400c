//! Opening files inside a blog's folder, and never outside it.
//!
//! Blog folders are synced from users' Dropbox and Git, so a file may be a
//! symbolic link to anywhere, and may be swapped between a check and a use.
//! The check here is made on the file actually opened: after `open`, the
//! kernel's own name for the descriptor (`/proc/self/fd/N`) must lie inside
//! the blog's folder, and the descriptor must be a regular file. Links that
//! stay inside the folder are followed.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::domain::{BlogId, BlogPath};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no such file")]
    NotFound,
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// What any change to a file moves: its size and both its times. Equal
/// stamps before and after reading an opened file mean nobody wrote, cut or
/// replaced it meanwhile (the change time moves even when a sync tool puts
/// the old modification time back, and when the file is unlinked).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FileStamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub fn of(m: &Metadata) -> FileStamp {
        FileStamp { len: m.len(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()) }
    }
}

/// A file changed this recently may be in the middle of a write: `write(2)`
/// moves the times before it copies the bytes, so a write already running
/// when the file was opened changes bytes without moving its stamp again.
/// Longer than the coarse clock's tick, which timestamps may follow.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

/// When the file last changed: its change time (which every write, rename
/// and link moves, and nothing sets back).
pub fn changed_at(meta: &Metadata) -> std::time::SystemTime {
    std::time::UNIX_EPOCH
        + std::time::Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec().clamp(0, 999_999_999) as u32)
}

/// How long ago the file last changed (its change time); zero for a change
/// time ahead of our clock.
pub fn changed_ago(meta: &Metadata) -> std::time::Duration {
    std::time::SystemTime::now().duration_since(changed_at(meta)).unwrap_or_default()
}

/// Waits (blocking, at most three times [`SETTLE`]) until the opened file's
/// last change is `SETTLE` old, and returns its metadata then, settled or
/// not (a file that keeps changing, or a filesystem whose change times are
/// always now, is then recent: the origin serves it short-lived and never
/// keeps it, see `recent_change_ms`). With
/// [`FileStamp`] compared after the read, a read of a file that settled is of
/// one version, unless one write takes longer than `SETTLE`.
pub fn settled(f: &File, mut meta: Metadata) -> io::Result<Metadata> {
    for _ in 0..3 {
        if is_settled(&meta) {
            break;
        }
        std::thread::sleep(SETTLE.saturating_sub(changed_ago(&meta)));
        meta = f.metadata()?;
    }
    Ok(meta)
}

/// Whether the file's last change is `SETTLE` old. A change time ahead of
/// our clock (it was stepped back) reads as settled: no telling how old the
/// change is.
pub fn is_settled(meta: &Metadata) -> bool {
    let ago = changed_ago(meta);
    ago >= SETTLE || ago.is_zero()
}

/// A read lease (`F_SETLEASE`, `F_RDLCK`) on a blog file, held while it is
/// read. The kernel grants one only while no process holds the file open for
/// writing or mapped shared and writable (a writer whose bytes may land
/// without moving any timestamp), and breaks it when a process opens the file
/// for writing or truncates it. Unbroken from before a read to after it, it
/// proves the read saw one version of the file, whatever its times say. Let
/// go when dropped; a writer that broke it waits until then (its `open`
/// blocks), so it is held for a read only, never across a client's pace. The
/// break's signal is SIGWINCH, which is ignored unless handled (SIGIO, the
/// default, would end the process).
pub enum Lease<'a> {
    /// Held on this descriptor.
    Held(&'a File),
    /// Refused: another process holds the file open for writing, maps it
    /// writable, or holds a write lease on it (Samba's oplocks).
    Writer,
    /// No answer: the file is another user's and the process lacks
    /// CAP_LEASE, leases are turned off, or the filesystem is not a local one
    /// (NFS and SMB refuse a lease with EAGAIN whenever the server gave no
    /// delegation or oplock, which would read as "being written" every time).
    /// Only the file's times can be checked then (said once in the log).
    Unknown,
}

impl<'a> Lease<'a> {
    /// `file` must be open read-only. Three syscalls.
    pub fn take(file: &'a File) -> Lease<'a> {
        // <fcntl.h>'s F_SETSIG (Linux), which the libc crate does not export.
        const F_SETSIG: libc::c_int = 10;
        // statfs(2)'s magic numbers of local filesystems whose leases answer
        // for the inode: ext2/3/4, XFS, Btrfs, tmpfs, F2FS, bcachefs.
        const LOCAL: [i64; 6] = [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994, 0xF2F5_2010, 0xCA45_1A4E];
        let fd = file.as_raw_fd();
        // SAFETY: fstatfs fills the struct; fcntl on a descriptor `file`
        // owns, with integer arguments.
        let taken = unsafe {
            let mut fs: libc::statfs = std::mem::zeroed();
            if libc::fstatfs(fd, &mut fs) != 0 {
                return Lease::unknown(format_args!("fstatfs failed: {}", io::Error::last_os_error()));
            }
            if !LOCAL.contains(&(fs.f_type as i64)) {
                // Overlayfs among them: a mapping is of the file beneath, so
                // its lease would not see one.
                return Lease::unknown(format_args!(
                    "the filesystem (type {:#x}) is not one whose leases the server trusts: ext4, XFS, Btrfs, \
                     tmpfs, F2FS, bcachefs",
                    fs.f_type
                ));
            }
            if libc::fcntl(fd, F_SETSIG, libc::SIGWINCH) != 0 {
                return Lease::unknown(format_args!("F_SETSIG failed: {}", io::Error::last_os_error()));
            }
            libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) == 0
        };
        if taken {
            return Lease::Held(file);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => Lease::Writer,
            Some(libc::EACCES) => Lease::unknown(format_args!(
                "the file is another user's and the server lacks CAP_LEASE ({e}): run it as the user that owns the \
                 blog folders, or give it CAP_LEASE"
            )),
            _ => Lease::unknown(format_args!("F_SETLEASE failed ({e}; /proc/sys/fs/leases-enable 0?)")),
        }
    }

    fn unknown(why: std::fmt::Arguments) -> Lease<'a> {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                why = %why,
                "cannot ask whether a blog file is being written (no read lease): only its times are checked, and a \
                 file imported or kept is read twice and must read the same, which a program writing through a \
                 shared mapping can still get past (said once)"
            );
        }
        Lease::Unknown
    }

    /// Another process held the file open for writing when it was asked.
    pub fn writer(&self) -> bool {
        matches!(self, Lease::Writer)
    }

    /// A process opened the file for writing (or truncated it) since the
    /// lease was taken: what was read meanwhile may be torn. One syscall.
    pub fn broken(&self) -> bool {
        match self {
            // SAFETY: fcntl on a descriptor the lease borrows.
            // A break under way reads as the type it goes to (none).
            Lease::Held(f) => (unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLEASE) }) != libc::F_RDLCK,
            Lease::Writer | Lease::Unknown => false,
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Lease::Held(f) = self {
            // SAFETY: as above.
            if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) } != 0 {
                // Held on: writers would wait for it (up to the kernel's
                // lease-break time) until the descriptor closes.
                tracing::warn!(error = %io::Error::last_os_error(), "a read lease could not be let go");
            }
        }
    }
}

/// `file` read under a [`Lease`]: each read first checks that no writer
/// came (else [`WrittenMeanwhile`]), and the lease is let go at the end of
/// the file, so a writer waits for one read at most and what the reader
/// does with it before the next (an import writes its 1 MiB to the
/// blob's temporary file), never for the reader's end (an fsync). Without a lease (`Lease::Unknown`)
/// it reads plainly.
pub struct LeasedRead<'a> {
    file: &'a File,
    lease: Option<Lease<'a>>,
}

impl<'a> LeasedRead<'a> {
    pub fn new(file: &'a File, lease: Lease<'a>) -> Self {
        LeasedRead { file, lease: Some(lease) }
    }
}

impl io::Read for LeasedRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.lease.as_ref().is_some_and(|l| l.broken() || l.writer()) {
            return Err(io::Error::other(WrittenMeanwhile));
        }
        let n = (&mut &*self.file).read(buf)?;
        if n == 0 {
            // Every byte before the end was read while it was held.
            self.lease = None;
        }
        Ok(n)
    }
}

/// A process opened the file for writing (or cut it) while it was read.
#[derive(Debug, thiserror::Error)]
#[error("the file was opened for writing while it was read")]
pub struct WrittenMeanwhile;

impl WrittenMeanwhile {
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|e| e.is::<WrittenMeanwhile>())
    }
}

/// Whether another process holds `file` open for writing, or mapped shared
/// and writable (see [`Lease`]), asked of the kernel and let go at once; a
/// writer opening the file in between waits those microseconds. Where it
/// gives no answer, no. Four syscalls.
pub fn writer_holds(file: &File) -> bool {
    Lease::take(file).writer()
}

/// The blogs directory, canonicalised once at start.
#[derive(Debug, Clone)]
pub struct BlogsDir {
    root: PathBuf,
    /// Folders (canonical) that a blog folder which is a symbolic link may
    /// neither lead into nor hold: this root (another blog's folder, or
    /// all of them) and whatever [`BlogsDir::keep_out_of`] adds.
    keep_out: Vec<PathBuf>,
}

impl BlogsDir {
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let root = dir.canonicalize()?;
        Ok(BlogsDir { keep_out: vec![root.clone()], root })
    }

    /// Adds the server's own folders (the data dir with its database and
    /// CAS, the other root of blog files) to those a linked blog folder may
    /// not lead into or hold. Folders that do not exist are skipped.
    pub fn keep_out_of<'a>(mut self, dirs: impl IntoIterator<Item = &'a Path>) -> Self {
        for d in dirs {
            if let Ok(d) = d.canonicalize() {
                if !self.keep_out.contains(&d) {
                    self.keep_out.push(d);
                }
            }
        }
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blog_dir(&self, blog: &str) -> PathBuf {
        self.root.join(blog)
    }

    /// The on-disk name of a blog path (not checked; see [`BlogsDir::open`]).
    pub fn file_path(&self, blog: &str, path: &BlogPath) -> PathBuf {
        let mut p = self.blog_dir(blog);
        for seg in path.segments() {
            p.push(seg);
        }
        p
    }

    /// Opens a blog's file for reading if, once open, it is a regular file
    /// inside the blog's folder. Hidden paths are refused.
    pub fn open(&self, blog: &BlogId, path: &BlogPath) -> Result<(File, Metadata), OpenError> {
        let blog = blog.as_str();
        if path.is_hidden() {
            return Err(OpenError::Refused("hidden file"));
        }
        let full = self.file_path(blog, path);
        let file = match std::fs::OpenOptions::new()
            .read(true)
            // A FIFO would block the read forever; refuse to wait on one.
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(&full)
        {
            Ok(f) => f,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
                return Err(OpenError::NotFound)
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(OpenError::Refused("symbolic link loop")),
            // Another program holds a write lease on it (Samba's oplocks
            // do): a passing state, like a file being written. Said only of
            // a file the checks below let through, looked at without
            // opening it for reading (`O_PATH` breaks no lease): a link out
            // of the blog must not tell whether a file elsewhere is leased.
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                let at = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
                    .open(&full)
                    .map_err(|_| OpenError::NotFound)?;
                self.check(blog, &at)?;
                return Err(OpenError::Io(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "another program holds a lease on the file",
                )));
            }
            // Whatever a sync tool can put in a folder is the reader's 404,
            // not the server's 500: no permission, a socket (ENXIO), a device
            // without a driver (ENODEV), a name too long for the filesystem.
            Err(e)
                if e.kind() == io::ErrorKind::PermissionDenied
                    || matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV | libc::ENAMETOOLONG)) =>
            {
                return Err(OpenError::NotFound)
            }
            Err(e) => return Err(e.into()),
        };
        let meta = self.check(blog, &file)?;
        Ok((file, meta))
    }

    /// The opened file's metadata if it may be served: a regular file, of
    /// one name, inside the blog's folder.
    fn check(&self, blog: &str, file: &File) -> Result<Metadata, OpenError> {
        let meta = file.metadata()?;
        if !meta.is_file() {
            // Directories are never listed; devices and FIFOs never read.
            return Err(OpenError::NotFound);
        }
        // A hard link is a second name for an inode that may live anywhere on
        // the same filesystem, outside the blog included; the name the kernel
        // reports for the descriptor cannot tell which name is the real one.
        // Nothing of the service links into blog folders, so refuse them all.
        if std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
            return Err(OpenError::Refused("a hard link (more than one name for the file)"));
        }
        self.placed(blog, file)?.map_err(OpenError::Refused)?;
        Ok(meta)
    }

    /// `Ok(())` if the opened file lies inside the blog's folder; else why not.
    fn placed(&self, blog: &str, file: &File) -> io::Result<Result<(), &'static str>> {
        let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        let dir = self.blog_dir(blog);
        if real.starts_with(&dir) && real != dir {
            return Ok(Ok(()));
        }
        let outside = Err("resolves outside the blog's folder");
        // The blog's folder may itself be a link (to another disk, say): compare
        // against where it really is. Rare, so paid only here.
        let Ok(real_dir) = dir.canonicalize() else {
            return Ok(outside);
        };
        if !real.starts_with(&real_dir) || real == real_dir {
            return Ok(outside);
        }
        // Never into the server's own folders (the database, the write-ahead
        // log, the CAS), another blog's folder, or a folder holding any of
        // them (`/`, say): such a link would serve them all as this blog's.
        if self.keep_out.iter().any(|k| real_dir.starts_with(k) || k.starts_with(&real_dir)) {
            return Ok(Err("the blog's folder is a link into the server's own folders or another blog's"));
        }
        Ok(Ok(()))
    }
}

/// A file being written under a folder (a blog's static folder), not there
/// yet: a temporary file in `{root}/.tmp/` (a name no URL reaches: not a
/// blog id), then, once whole and fsynced, a link under its real name that
/// fails if a file appeared there meanwhile (that one wins, nothing is
/// overwritten). Dropped unfinished, the temporary file is removed; one a
/// crash left behind is removed by [`NewFile::sweep`].
///
/// Every step goes through a directory descriptor opened with `O_NOFOLLOW`,
/// the blog's own folder included: a symbolic link anywhere on the way (even
/// one swapped in mid-way) stops the write instead of leading it outside.
/// Folders it creates are made durable in their parents.
pub struct NewFile {
    dir: File,
    tmp_dir: File,
    tmp: std::ffi::CString,
    name: std::ffi::CString,
    file: File,
    /// Folders created on the way, each with the descriptor of its parent.
    created: Vec<File>,
}

/// The extended attribute that keeps, on a file of the static folder, the
/// `Content-Type` the legacy bucket gave it where its name says another
/// (an extensionless `_image_cache/9f1c2d7e` that is a PNG).
const TYPE_XATTR: &std::ffi::CStr = c"user.blotcdn.content-type";

/// A kept `Content-Type` is at most this long.
pub const MAX_KEPT_TYPE: usize = 200;

/// The `Content-Type` kept with `file` (see [`NewFile::keep_type`]), if any:
/// one system call. By hand rather than with the `xattr` crate, whose
/// `get_xattr` first asks the length and then allocates: this runs on the
/// origin's answers from the static folder, and the stack buffer is all
/// a kept type needs.
pub fn kept_type(file: &File) -> Option<String> {
    let mut buf = [0u8; MAX_KEPT_TYPE];
    // SAFETY: a NUL-terminated name, and a buffer of the length given.
    let n = unsafe { libc::fgetxattr(file.as_raw_fd(), TYPE_XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let n = usize::try_from(n).ok().filter(|n| *n > 0)?;
    String::from_utf8(buf[..n].to_vec()).ok()
}

/// Where files being written wait, under the root: not a blog id, so no URL
/// reaches it.
const TMP_DIR: &str = ".tmp";

/// Eight hex digits, new each run (the clock and an address, hashed).
fn run_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        let seed = format!("{:?} {:p} {}", std::time::SystemTime::now(), &TOKEN, std::process::id());
        blake3::hash(seed.as_bytes()).to_hex()[..8].to_owned()
    })
}

/// A temporary file not written for this long was left by a crash.
const STALE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

fn cstr(b: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(b).map_err(|_| io::Error::other("NUL in a path"))
}

/// Opens `name` under `dir` as a directory, never through a link; creates
/// it first when missing (then returns true).
fn open_dir_at(dir: &File, name: &std::ffi::CStr) -> io::Result<(File, bool)> {
    use std::os::unix::io::FromRawFd;
    // SAFETY: `dir` is an open directory and `name` a NUL-terminated name.
    let created = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) } == 0;
    if !created {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: as above; the new descriptor is owned by the File below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::other(format!(
            "write refused: {name:?} is not a plain folder ({})",
            io::Error::last_os_error()
        )));
    }
    Ok((unsafe { File::from_raw_fd(fd) }, created))
}

impl NewFile {
    /// Starts `rel` (a relative file path of plain segments) under
    /// `root/blog`, creating folders as needed.
    pub fn start(root: &Path, blog: &str, rel: &Path) -> io::Result<NewFile> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::io::FromRawFd;
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);

        std::fs::create_dir_all(root)?;
        let mut dir =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(root)?;
        let (tmp_dir, _) = open_dir_at(&dir, &cstr(TMP_DIR.as_bytes())?)?;
        let mut created = Vec::new();
        let name = rel.file_name().ok_or_else(|| io::Error::other("no file name"))?;
        let parents = rel.parent().into_iter().flat_map(|p| p.components()).map(|c| c.as_os_str().as_bytes());
        for comp in std::iter::once(blog.as_bytes()).chain(parents) {
            let (next, new) = open_dir_at(&dir, &cstr(comp)?)?;
            if new {
                created.push(dir);
            }
            dir = next;
        }
        // The process id and a token of this run: two processes in two
        // containers may both be process 1 on one volume.
        let tmp =
            cstr(format!("{}-{}-{}", std::process::id(), run_token(), SEQ.fetch_add(1, Ordering::Relaxed)).as_bytes())?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `tmp_dir` is open; the descriptor is owned by the File below.
        let fd = unsafe { libc::openat(tmp_dir.as_raw_fd(), tmp.as_ptr(), flags, 0o644 as libc::c_uint) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(NewFile { dir, tmp_dir, tmp, name: cstr(name.as_bytes())?, file, created })
    }

    /// Removes temporary files a crash left in `{root}/.tmp`: those not
    /// written for [`STALE`]. Names cannot tell more: in containers every run
    /// may be process 1, and another container's processes are not visible
    /// from here.
    pub fn sweep(root: &Path) -> io::Result<usize> {
        let dir = root.join(TMP_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for e in entries {
            let e = e?;
            // Gone meanwhile (named, or swept by another process): nothing to do.
            let Ok(modified) = e.metadata().and_then(|m| m.modified()) else { continue };
            let idle = modified.elapsed().unwrap_or_default();
            if idle > STALE && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        self.file.write_all(data)
    }

    /// Keeps `content_type` with the file (see [`kept_type`]): fails where
    /// the filesystem keeps no extended attributes, and for a type longer
    /// than [`MAX_KEPT_TYPE`], which [`kept_type`] would not read back.
    pub fn keep_type(&self, content_type: &str) -> io::Result<()> {
        if content_type.len() > MAX_KEPT_TYPE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("longer than the {MAX_KEPT_TYPE} bytes a kept type may be ({} bytes)", content_type.len()),
            ));
        }
        // SAFETY: a NUL-terminated name, and a buffer of the length given.
        let r = unsafe {
            libc::fsetxattr(
                self.file.as_raw_fd(),
                TYPE_XATTR.as_ptr(),
                content_type.as_ptr().cast(),
                content_type.len(),
                0,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The whole content is written: make it durable and give it its name.
    /// `Ok(false)` when a file of that name appeared meanwhile (kept).
    pub fn finish(self) -> io::Result<bool> {
        self.file.sync_all()?;
        let (from, to) = (self.tmp_dir.as_raw_fd(), self.dir.as_raw_fd());
        // One step, never over an existing name, and never a moment with two
        // links (which readers refuse). SAFETY: each name is relative to its
        // open directory (one filesystem).
        let r = unsafe { libc::renameat2(from, self.tmp.as_ptr(), to, self.name.as_ptr(), libc::RENAME_NOREPLACE) };
        let r = match r {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            // A filesystem without RENAME_NOREPLACE: a link (which also never
            // replaces a name), then the temporary name goes.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                // SAFETY: as above.
                if unsafe { libc::linkat(from, self.tmp.as_ptr(), to, self.name.as_ptr(), 0) } != 0 {
                    return match io::Error::last_os_error() {
                        e if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                        e => Err(e),
                    };
                }
                // SAFETY: the temporary name, relative to its open directory.
                unsafe { libc::unlinkat(from, self.tmp.as_ptr(), 0) };
            }
            Err(e) => return Err(e),
        }
        self.dir.sync_all()?;
        for parent in &self.created {
            parent.sync_all()?;
        }
        Ok(true)
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        // SAFETY: a name relative to its open directory; after `finish` it
        // is gone already, and this does nothing.
        unsafe { libc::unlinkat(self.tmp_dir.as_raw_fd(), self.tmp.as_ptr(), 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A writer that opens the file while it is read under a lease: the
    /// next read says so, the writer's `open` waits until the lease is let
    /// go, and then goes on. Read to its end with no writer, a file is read
    /// whole and the lease is let go at the end.
    #[test]
    fn a_writer_that_comes_during_a_leased_read_is_told_of_and_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, vec![b'A'; 64 << 10]).unwrap();
        let file = File::open(&path).unwrap();
        let lease = Lease::take(&file);
        if matches!(lease, Lease::Unknown) {
            eprintln!("skipped: no read lease here (the temporary folder's filesystem, or leases off)");
            return;
        }
        let mut read = LeasedRead::new(&file, lease);
        let mut buf = [0u8; 4096];
        assert_eq!(read.read(&mut buf).unwrap(), 4096);
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (path, opened) = (path.clone(), opened.clone());
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                opened.store(true, std::sync::atomic::Ordering::SeqCst);
                drop(f);
            })
        };
        // The writer's open breaks the lease (it then waits for it).
        let broken = || read.lease.as_ref().is_some_and(|l| l.broken());
        for _ in 0..2000 {
            if broken() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(broken(), "the writer's open did not break the lease in 10 s");
        let e = read.read(&mut buf).expect_err("read on after a writer came");
        assert!(WrittenMeanwhile::is(&e), "{e}");
        assert!(!opened.load(std::sync::atomic::Ordering::SeqCst), "the writer's open did not wait for the lease");
        drop(read);
        writer.join().unwrap();
        assert!(opened.load(std::sync::atomic::Ordering::SeqCst));
        // No writer: read whole, the lease let go at the end (a writer's
        // open goes through at once while the descriptor stays open).
        let file = File::open(&path).unwrap();
        let mut read = LeasedRead::new(&file, Lease::take(&file));
        assert!(matches!(read.lease, Some(Lease::Held(_))), "no lease on a file nobody writes");
        let mut all = Vec::new();
        read.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 64 << 10);
        assert!(read.lease.is_none(), "the lease was held past the end");
        drop(std::fs::OpenOptions::new().write(true).open(&path).unwrap());
    }
}
