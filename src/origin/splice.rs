//! Hot files sent the way nginx sends files: from pages the kernel already
//! holds (`sendfile`), not copied from our memory into each socket.
//!
//! A hot file of at least [`SEAL_MIN`] bytes is kept in a copy of its own
//! that no other program can reach or change (here called sealed): an
//! unnamed file on the data dir's filesystem (`O_TMPFILE` with `O_EXCL`,
//! held through a read-only descriptor; see [`unnamed_copy`]), or, where
//! that filesystem has none, a sealed memory file (`memfd`: once sealed,
//! neither we nor anyone can change, grow or shrink it). It is mapped
//! read-only; its [`Bytes`] point into that mapping, so the rest of the
//! origin uses them as any other bytes (ranges are slices of them).
//! [`SpliceStream`], the origin's connection, notices a buffer hyper writes
//! that lies in such a mapping and sends it with `sendfile` from the copy
//! instead of copying it: the socket's buffers then hold references to
//! the same pages, and the reader copies from clean pages shared by all.
//!
//! Why it pays (measured on this machine, 50 KiB answers under wrk): the
//! copy into the socket was a tenth of all CPU, and the reader's copy out
//! of freshly written socket pages cost it almost twice what it pays for
//! page-cache pages.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{OnceLock, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Smaller files are copied: one `writev` costs less than a `sendmsg` and a
/// `sendfile`.
pub const SEAL_MIN: usize = 16 * 1024;

/// At most this many sealed files at once: each holds a descriptor.
const MAX_SEALED: u64 = 4096;

/// How many hot files may be sealed at once with this hot cache and
/// descriptor limit (the server keeps that many descriptors back from
/// connections); past it, hot files are kept as plain bytes.
pub fn sealed_files(hot_cache_bytes: u64, nofile: u64) -> usize {
    MAX_SEALED.min(hot_cache_bytes / SEAL_MIN as u64).min(nofile / 8) as usize
}

/// Start address of each sealed file's mapping → what it stands for.
static MAPPINGS: RwLock<BTreeMap<usize, Entry>> = RwLock::new(BTreeMap::new());

#[derive(Clone, Copy)]
struct Entry {
    len: usize,
    /// The sealed file its bytes are sent from.
    fd: RawFd,
}

/// Sealed files alive (capped by [`seal`]'s `max`).
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// Set once the kernel showed it has no sealed memory files: no more tries
/// (each costs a copy of the file).
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// A registered mapping of a sealed file, and that file, alive as long as a
/// `Bytes` points into it.
struct Mapping {
    ptr: *const u8,
    len: usize,
    _fd: OwnedFd,
    /// The count this one is part of.
    count: &'static AtomicUsize,
}

// The mapping is read-only and never written: its bytes never change.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: a live PROT_READ mapping of exactly `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        MAPPINGS.write().expect("lock").remove(&(self.ptr as usize));
        // SAFETY: our own mapping; no `Bytes` points into it any more.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Registers a new read-only mapping at `ptr` (counted in `count` already)
/// and returns its bytes, which unmap and unregister it when the last one goes.
fn register(ptr: *mut libc::c_void, e: Entry, fd: OwnedFd, count: &'static AtomicUsize) -> Bytes {
    MAPPINGS.write().expect("lock").insert(ptr as usize, e);
    Bytes::from_owner(Mapping { ptr: ptr as *const u8, len: e.len, _fd: fd, count })
}

fn os<T: PartialOrd + Default>(r: T) -> io::Result<T> {
    if r < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `data` in a sealed memory file, as bytes that [`SpliceStream`] sends with
/// `sendfile`; `None` when it is too small, `max` are sealed already, or
/// the kernel refused (the caller keeps plain bytes).
pub fn seal(data: &[u8], max: usize) -> Option<Bytes> {
    seal_counted(data, max, &COUNT)
}

/// [`seal`], counting the sealed files in `count`.
fn seal_counted(data: &[u8], max: usize, count: &'static AtomicUsize) -> Option<Bytes> {
    if data.len() < SEAL_MIN || UNAVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    if count.fetch_add(1, Ordering::Relaxed) >= max {
        count.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    match sealed(data, count) {
        Ok(b) => Some(b),
        Err(e) => {
            count.fetch_sub(1, Ordering::Relaxed);
            // The kernel lacks memfd or seals (not a passing lack of memory
            // or descriptors): stop trying.
            let unsupported =
                matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL | libc::EPERM | libc::EOPNOTSUPP));
            if unsupported && !UNAVAILABLE.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "hot files cannot be sealed here; they are copied into sockets instead");
            }
            None
        }
    }
}

/// The folder whose filesystem holds the unnamed copies (the data dir);
/// unset, or where that filesystem has no unnamed files, sealed memory
/// files are used.
static UNNAMED_IN: OnceLock<PathBuf> = OnceLock::new();
/// Set once the data dir's filesystem refused an unnamed file.
static NO_UNNAMED: AtomicBool = AtomicBool::new(false);

/// Hot copies are made as unnamed files in `dir` (see [`unnamed_copy`]).
/// Set once, at start.
pub fn copy_hot_files_in(dir: &Path) {
    let _ = UNNAMED_IN.set(dir.to_owned());
}

fn sealed(data: &[u8], count: &'static AtomicUsize) -> io::Result<Bytes> {
    let file = match UNNAMED_IN.get().filter(|_| !NO_UNNAMED.load(Ordering::Relaxed)) {
        Some(dir) => match unnamed_copy(dir, data) {
            Ok(f) => f,
            Err(e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EISDIR | libc::EINVAL | libc::ENOENT)
                ) && !NO_UNNAMED.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(error = %e, dir = %dir.display(), "no unnamed files on the data dir's filesystem; hot files go in sealed memory files");
                }
                memfd_copy(data)?
            }
        },
        None => memfd_copy(data)?,
    };
    // Private and read-only: the same pages (nothing is ever written, so
    // nothing is copied), and allowed on a write-sealed file by kernels
    // before 6.7, which refuse any shared mapping of one.
    let ptr = unsafe {
        libc::mmap(std::ptr::null_mut(), data.len(), libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0)
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let fd = OwnedFd::from(file);
    Ok(register(ptr, Entry { len: data.len(), fd: fd.as_raw_fd() }, fd, count))
}

/// `data` in a sealed memory file: nobody, this process included, can
/// change, grow or shrink it.
fn memfd_copy(data: &[u8]) -> io::Result<std::fs::File> {
    // SAFETY: plain syscalls on a descriptor we own.
    let fd = unsafe {
        OwnedFd::from_raw_fd(os(libc::memfd_create(
            c"blotcdn-hot".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        ))?)
    };
    let file = std::fs::File::from(fd);
    file.write_all_at(data, 0)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: as above.
    os(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(file)
}

/// `data` in an unnamed file (`O_TMPFILE`, with `O_EXCL`: it can never be
/// given a name) on the data dir's filesystem, mode 0400, written once and
/// reopened read-only: only this process holds it, through a descriptor
/// that cannot write. Why not a memory file: `sendfile` from shared memory
/// looks each 4 KiB page up on its own (`filemap_get_entry`, 5% of all CPU
/// under a 50 KiB load here), where a disk filesystem's page cache hands
/// over large folios in batches, as it does for nginx. The cost: the copy
/// is written back to disk once, about 30 s later, unless evicted first.
fn unnamed_copy(dir: &Path, data: &[u8]) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o400)
        .custom_flags(libc::O_TMPFILE | libc::O_EXCL)
        .open(dir)?;
    file.write_all_at(data, 0)?;
    // The writable descriptor goes; a read-only one of the same file stays
    // (without /proc, the writable one, never written again).
    Ok(std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap_or(file))
}

/// Where `buf`'s bytes are sent from, if it starts in a sealed file's
/// mapping: the file, the offset, and how many of its bytes the mapping
/// holds from there on.
fn mapping_at(buf: &[u8]) -> Option<(RawFd, libc::off_t, usize)> {
    let at = buf.as_ptr() as usize;
    let map = MAPPINGS.read().expect("lock");
    let (&start, e) = map.range(..=at).next_back()?;
    (at < start + e.len).then_some((e.fd, (at - start) as libc::off_t, start + e.len - at))
}

/// Bytes in a socket's send queue, not yet acknowledged by the client
/// (`SIOCOUTQ`); `usize::MAX` if the kernel does not say.
fn queued(sock: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int.
    match unsafe { libc::ioctl(sock, libc::TIOCOUTQ, &mut n) } {
        0 => n.max(0) as usize,
        _ => usize::MAX,
    }
}

/// The origin's connection: a TCP stream whose writes send sealed hot files
/// with `sendfile` (see the module's comment), and fail once the client has
/// taken nothing for `stall_limit`: a client that asks and never reads may
/// not hold a connection slot (and the file it asked for) forever.
pub struct SpliceStream {
    stream: TcpStream,
    stall_limit: Duration,
    /// Armed when a write must wait, until one goes through.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// While a write waits: the send queue's length when it began to wait
    /// (or when the client last took something).
    stalled: Option<usize>,
    /// Tests: `sendfile` calls made.
    #[cfg(test)]
    sendfiles: std::cell::Cell<usize>,
}

impl SpliceStream {
    pub fn new(stream: TcpStream, stall_limit: Duration) -> SpliceStream {
        SpliceStream {
            stream,
            stall_limit,
            stall: None,
            stalled: None,
            #[cfg(test)]
            sendfiles: Default::default(),
        }
    }

    /// A write that must wait starts the stall timer (if it is not running);
    /// one that goes through (or fails) stops it. When the timer fires, the
    /// client still took something if the socket's queue shrank since it was
    /// armed: the kernel calls a socket writable only once a third of its
    /// buffer (up to megabytes) has drained, which a slow reader may take
    /// longer than the limit to do. Then the timer runs again.
    fn watch_stall(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let deadline = tokio::time::Instant::now() + self.stall_limit;
        let sock = self.stream.as_raw_fd();
        let timer = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if self.stalled.is_none() {
            timer.as_mut().reset(deadline);
            self.stalled = Some(queued(sock));
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            let queued = queued(sock);
            if self.stalled.is_some_and(|before| queued < before) {
                self.stalled = Some(queued);
                timer.as_mut().reset(tokio::time::Instant::now() + self.stall_limit);
                continue;
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took nothing for {:.1} s", self.stall_limit.as_secs_f64()),
            )));
        }
    }

    /// Runs `f` once the socket is writable, until it does not block.
    fn poll_io(&self, cx: &mut Context<'_>, mut f: impl FnMut() -> io::Result<usize>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_io(Interest::WRITABLE, &mut f) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncRead for SpliceStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpliceStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.write_some(cx, bufs);
        this.watch_stall(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl SpliceStream {
    /// One write: a buffer lying in a sealed file's mapping goes with
    /// `sendfile` (after the buffers before it), the rest with `writev`.
    fn write_some(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        // Short buffers (heads, small files) are copied and not looked up.
        let found = bufs.iter().enumerate().find_map(|(i, b)| {
            let (fd, off, left) = (b.len() >= SEAL_MIN / 2).then(|| mapping_at(b)).flatten()?;
            Some((i, fd, off, left))
        });
        let Some((i, file, off, left)) = found else {
            return Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        };
        let sock = self.stream.as_raw_fd();
        let head = &bufs[..i];
        let head_len: usize = head.iter().map(|b| b.len()).sum();
        let mut sent = 0;
        if head_len > 0 {
            // The head (hyper's status line and headers) waits in the socket
            // for the body: one segment, as nginx's `tcp_nopush` gives.
            sent = ready!(self.poll_io(cx, || {
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = head.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = head.len() as _;
                // SAFETY: IoSlice is an iovec on unix; the buffers outlive the call.
                os(unsafe { libc::sendmsg(sock, &msg, libc::MSG_MORE | libc::MSG_NOSIGNAL) }).map(|n| n as usize)
            }))?;
            if sent < head_len {
                return Poll::Ready(Ok(sent));
            }
        }
        let len = bufs[i].len().min(left);
        let sendfile = || {
            let mut at = off;
            #[cfg(test)]
            self.sendfiles.set(self.sendfiles.get() + 1);
            // SAFETY: `file` is alive while `bufs[i]` (a slice of its mapping) is.
            // A sealed file never shrinks: nothing sent means nothing can be.
            match os(unsafe { libc::sendfile(sock, file, &mut at, len) })? {
                0 => Err(io::Error::new(io::ErrorKind::WriteZero, "sendfile sent nothing")),
                n => Ok(n as usize),
            }
        };
        if sent == 0 {
            return self.poll_io(cx, sendfile);
        }
        // The head went: report it now if the body must wait.
        match self.stream.try_io(Interest::WRITABLE, sendfile) {
            Ok(n) => Poll::Ready(Ok(sent + n)),
            Err(_) => Poll::Ready(Ok(sent)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn sealed_bytes_cannot_be_changed_even_through_their_file() {
        let data = pattern(40_000);
        let b = seal(&data, 10).expect("sealed");
        assert_eq!(&b[..], &data[..]);
        let (fd, off, left) = mapping_at(&b[100..200]).expect("registered");
        assert_eq!((off, left), (100, 40_000 - 100));
        // The file as another process would reach it.
        let path = format!("/proc/self/fd/{fd}");
        let f = std::fs::OpenOptions::new().write(true).open(&path);
        let refused = match f {
            Err(_) => true,
            Ok(f) => f.write_all_at(b"changed", 0).is_err() && f.set_len(10).is_err(),
        };
        assert!(refused, "a sealed file took a write");
        assert_eq!(&b[..], &data[..]);
        assert!(seal(&data[..SEAL_MIN - 1], 10).is_none(), "small files stay plain");
        let at = b.as_ptr() as usize;
        drop(b);
        // (Other tests may map something at the same place since: only a
        // sealed file of this test's size would be this one.)
        let map = MAPPINGS.read().expect("lock");
        let left = map.get(&at).filter(|e| e.len == 40_000);
        assert!(left.is_none(), "a dropped mapping is still registered");
    }

    /// An unnamed copy: the same bytes, no name and none to be given
    /// (`linkat` refused), held read-only.
    #[test]
    fn unnamed_copies_have_no_name_and_a_read_only_descriptor() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(50_000);
        let f = match unnamed_copy(dir.path(), &data) {
            Ok(f) => f,
            // A temporary folder on a filesystem without O_TMPFILE: the
            // server falls back to memory files there (the test above).
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return,
            Err(e) => panic!("an unnamed copy: {e}"),
        };
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        assert_eq!(f.metadata().unwrap().nlink(), 0, "it has a name");
        // SAFETY: F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY, "the descriptor kept can write");
        assert!(f.write_all_at(b"x", 0).is_err());
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        let to = std::ffi::CString::new(dir.path().join("named").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: two valid C strings.
        let named = unsafe {
            libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW)
        };
        assert_eq!(named, -1, "an unnamed copy was given a name");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "it shows in its folder");
    }

    #[test]
    fn the_cap_on_sealed_files_holds() {
        static MINE: AtomicUsize = AtomicUsize::new(0);
        let data = pattern(SEAL_MIN);
        let kept: Vec<Bytes> = (0..3).filter_map(|_| seal_counted(&data, 2, &MINE)).collect();
        assert_eq!(kept.len(), 2, "two sealed under a cap of 2, not three");
        drop(kept);
        assert_eq!(MINE.load(Ordering::Relaxed), 0, "dropped files give their places back");
        assert!(seal_counted(&data, 2, &MINE).is_some());
        assert_eq!(sealed_files(64 << 20, 1 << 20), 4096);
        assert_eq!(sealed_files(64 << 20, 1024), 128, "an eighth of the descriptors at most");
        assert_eq!(sealed_files(0, 1 << 20), 0, "no hot cache, nothing sealed");
    }

    /// Sends each group of buffers as hyper would (resuming after short
    /// writes) through a socket with a small send buffer to a slow reader;
    /// returns what the reader got, what was meant, the first error and the
    /// `sendfile` calls made.
    async fn send(groups: Vec<Vec<Bytes>>) -> (Vec<u8>, Vec<u8>, io::Result<()>, usize) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 7_000];
            loop {
                let n = c.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break got;
                }
                got.extend_from_slice(&buf[..n]);
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
        });
        let (s, _) = listener.accept().await.unwrap();
        small_buffer(s.as_raw_fd(), libc::SO_SNDBUF);
        let mut s = SpliceStream::new(s, Duration::from_secs(30));
        let mut want = Vec::new();
        let mut result = Ok(());
        'groups: for parts in groups {
            for p in &parts {
                want.extend_from_slice(p);
            }
            let mut bufs = parts;
            while !bufs.is_empty() {
                let slices: Vec<IoSlice> = bufs.iter().map(|b| IoSlice::new(b)).collect();
                let mut n = match s.write_vectored(&slices).await {
                    Ok(n) => n,
                    Err(e) => {
                        result = Err(e);
                        break 'groups;
                    }
                };
                assert!(n > 0);
                while n > 0 {
                    let take = n.min(bufs[0].len());
                    bytes::Buf::advance(&mut bufs[0], take);
                    n -= take;
                    if bufs[0].is_empty() {
                        bufs.remove(0);
                    }
                }
            }
        }
        let sendfiles = s.sendfiles.get();
        let _ = s.shutdown().await;
        drop(s);
        (reader.await.unwrap(), want, result, sendfiles)
    }

    /// Sets a socket's send or receive buffer to 8 KiB.
    fn small_buffer(fd: RawFd, which: libc::c_int) {
        buffer(fd, which, 8192)
    }

    /// Sets a socket's send or receive buffer (the kernel doubles it, and
    /// caps it at its `wmem_max` / `rmem_max`).
    fn buffer(fd: RawFd, which: libc::c_int, small: libc::c_int) {
        // SAFETY: setsockopt with a valid int.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                which,
                &small as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(r, 0);
    }

    /// Writes `n` bytes (a sealed file when `sealed`) through a send buffer
    /// of `sndbuf` (the kernel's own sizing without one) to a client that
    /// reads at most 4 KiB every `pause` (never, without one), its receive
    /// buffer small too if `sndbuf` is given, with a stall limit of `limit`.
    /// Returns the bytes taken and the outcome.
    async fn write_to_reader(
        n: usize,
        sndbuf: Option<libc::c_int>,
        pause: Option<Duration>,
        limit: Duration,
        sealed: bool,
    ) -> (usize, io::Result<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let c = std::net::TcpStream::connect(addr).unwrap();
        if sndbuf.is_some() {
            small_buffer(c.as_raw_fd(), libc::SO_RCVBUF);
        }
        let (done, writer_done) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut c = c;
            let (mut got, mut buf) = (0, vec![0u8; 4 << 10]);
            let Some(pause) = pause else {
                // Holds the connection, reads nothing, until the writer is done.
                let _ = writer_done.recv();
                return got;
            };
            while let Ok(n @ 1..) = c.read(&mut buf) {
                got += n;
                std::thread::sleep(pause);
            }
            got
        });
        let (s, _) = listener.accept().await.unwrap();
        if let Some(n) = sndbuf {
            buffer(s.as_raw_fd(), libc::SO_SNDBUF, n);
        }
        let mut s = SpliceStream::new(s, limit);
        let data = pattern(n);
        let body = if sealed { seal(&data, 10).expect("sealed") } else { Bytes::from(data) };
        let (mut at, mut result) = (0, Ok(()));
        while at < body.len() {
            match s.write(&body[at..]).await {
                Ok(n) => at += n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let _ = s.shutdown().await;
        drop(s);
        let _ = done.send(());
        reader.join().unwrap();
        (at, result)
    }

    /// A client that asks and never reads loses its connection once the
    /// limit has passed with nothing taken, whatever the body's kind.
    #[tokio::test]
    async fn a_client_that_takes_nothing_is_dropped_after_the_stall_limit() {
        for sealed in [false, true] {
            let started = std::time::Instant::now();
            let stalled = write_to_reader(2 << 20, Some(8192), None, Duration::from_millis(300), sealed);
            let (taken, r) =
                tokio::time::timeout(Duration::from_secs(20), stalled).await.expect("the write never gave up");
            let e = r.expect_err("the write must give up");
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
            assert!(taken < 2 << 20, "all was taken by a client that reads nothing?");
            assert!(started.elapsed() >= Duration::from_millis(300), "gave up before the limit");
            assert!(started.elapsed() < Duration::from_secs(20), "waited far past the limit");
        }
    }

    /// A slow client that keeps taking bytes is never dropped, though the
    /// whole answer takes many times the limit.
    #[tokio::test]
    async fn a_slow_but_steady_client_is_not_dropped() {
        let started = std::time::Instant::now();
        let limit = Duration::from_secs(2);
        let (taken, r) = write_to_reader(1 << 20, Some(8192), Some(Duration::from_millis(5)), limit, true).await;
        r.expect("a steady reader gets the whole answer");
        assert_eq!(taken, 1 << 20);
        assert!(started.elapsed() > limit, "the answer took longer than the limit");
    }

    /// A send buffer the kernel grew (to megabytes on loopback) turns
    /// writable again only once a third of it has drained, which a steady
    /// reader of 4 KiB a millisecond takes longer than the limit to do: it
    /// took something all along, and is not dropped.
    #[tokio::test]
    async fn a_slow_reader_behind_a_large_send_buffer_is_not_dropped() {
        let limit = Duration::from_millis(200);
        let (taken, r) = write_to_reader(8 << 20, None, Some(Duration::from_millis(1)), limit, false).await;
        r.expect("a steady reader gets the whole answer");
        assert_eq!(taken, 8 << 20);
    }

    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";
    const TAIL: &[u8] = b"-tail-";

    fn framed(body: Bytes) -> Vec<Bytes> {
        vec![Bytes::from_static(HEAD), body, Bytes::from_static(TAIL)]
    }

    /// A head, a sealed body (whole, then a slice of it) and a tail: the
    /// writes come back short and must resume where they stopped.
    #[tokio::test]
    async fn a_sealed_body_goes_out_exactly_through_short_writes() {
        let data = pattern(1 << 20);
        let body = seal(&data, 10).expect("sealed");
        let slice = body.slice(12_345..900_000);
        let (got, want, r, sendfiles) = send(vec![framed(body), framed(slice)]).await;
        r.unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the bytes differ");
        assert!(sendfiles > 2, "the body went with sendfile, in several short sends ({sendfiles})");
    }
}
