//! Files too large to keep in memory, sent as reads of the file in chunks.
//!
//! Read, not sent from the kernel's pages with `sendfile`: a socket keeps
//! references to the pages it was given until the client has acknowledged
//! them, and a file cut short or rewritten in place meanwhile changes what
//! those pages hold, so bytes already counted as sent would turn into zeros
//! or into the new file (a slow client makes that window long). A chunk we
//! read is our copy, which nothing changes.
//!
//! The file must stay as it was when it was opened: after each read its size
//! and times are compared with those at the open, and any change (a cut, a
//! rewrite, even in place with the old modification time restored, whose
//! change time still moves) fails the answer before that chunk goes out. The
//! client then sees fewer bytes than `Content-Length` promised, and no cache
//! keeps the answer. A rename over the file or its removal changes its
//! change time as well: the answer fails, and the next request gets the new
//! file.
//!
//! A chunk the page cache holds is read on the connection's thread
//! (`preadv2` with `RWF_NOWAIT` reads only what needs no disk); the rest is
//! read on the blocking pool.

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use super::Body;
use crate::blogfs::FileStamp;

/// At most this much is read (and held per connection) at a time.
pub const CHUNK: usize = 128 * 1024;

fn changed() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the file changed while it was sent")
}

/// `len` bytes of `file` from `start`, in chunks, each sent only if the file
/// is still as `opened` (its metadata when it was opened) says.
pub fn body(file: File, opened: &Metadata, start: u64, len: u64) -> Body {
    let (file, stamp, end) = (Arc::new(file), FileStamp::of(opened), start.saturating_add(len));
    let chunks = futures_util::stream::try_unfold(start, move |at| {
        let file = file.clone();
        async move {
            if at >= end {
                return Ok(None);
            }
            let want = (end - at).min(CHUNK as u64) as usize;
            // The chunk, and the file's metadata just after it was read.
            let (chunk, now) = match read_cached(&file, at, want) {
                Some(r) => (r?, file.metadata()?),
                None => {
                    let f = file.clone();
                    tokio::task::spawn_blocking(move || Ok::<_, io::Error>((read(&f, at, want)?, f.metadata()?)))
                        .await
                        .map_err(io::Error::other)??
                }
            };
            // A read that meets the end early: the file was cut.
            if chunk.is_empty() || FileStamp::of(&now) != stamp {
                return Err(changed());
            }
            let next = at + chunk.len() as u64;
            Ok(Some((Frame::data(chunk), next)))
        }
    });
    StreamBody::new(chunks).boxed_unsync()
}

/// Up to `want` bytes at `at`, from the disk if need be.
fn read(file: &File, at: u64, want: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(want);
    let n = loop {
        match file.read_at(&mut buf, at) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    buf.truncate(n);
    Ok(buf.freeze())
}

/// Up to `want` bytes at `at` if the page cache holds any of them (without
/// waiting for the disk); `None` when it holds none, or the kernel cannot
/// tell without waiting.
fn read_cached(file: &File, at: u64, want: usize) -> Option<io::Result<Bytes>> {
    let off = libc::off_t::try_from(at).ok()?;
    // Not zeroed first: the kernel writes what it reads, and a read the
    // page cache cannot serve (EAGAIN) writes nothing, so zeroing a chunk
    // was a wasted pass over it either way.
    let mut buf = BytesMut::with_capacity(want);
    let iov = libc::iovec { iov_base: buf.spare_capacity_mut().as_mut_ptr().cast(), iov_len: want };
    // SAFETY: one iovec over `buf`'s spare capacity (at least `want` bytes),
    // which outlives the call; the kernel only writes into it.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // EAGAIN: not cached. EOPNOTSUPP (and EINVAL on old kernels): the
        // file system or kernel cannot say; the blocking read does.
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::EINTR | libc::ENOSYS) => None,
            _ => Some(Err(e)),
        };
    }
    // SAFETY: the kernel wrote the first `n` bytes (`n` ≤ `want` ≤ capacity).
    unsafe { buf.set_len(n as usize) };
    Some(Ok(buf.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8 + 1).collect()
    }

    /// Every frame left in `b`, appended to `got`; the error that ended it.
    async fn drain(mut b: std::pin::Pin<&mut Body>, got: &mut Vec<u8>) -> Option<io::Error> {
        while let Some(frame) = b.frame().await {
            match frame {
                Ok(f) => got.extend_from_slice(f.data_ref().expect("data")),
                Err(e) => return Some(e),
            }
        }
        None
    }

    fn file_of(n: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = pattern(n);
        std::fs::write(&path, &data).unwrap();
        (dir, path, data)
    }

    #[tokio::test]
    async fn any_part_of_an_unchanged_file_comes_out_whole() {
        let (_dir, path, data) = file_of(3 * CHUNK + 777);
        for (start, len) in [(0, data.len()), (1, CHUNK), (CHUNK - 3, 2 * CHUNK + 10), (data.len() - 5, 5)] {
            let f = File::open(&path).unwrap();
            let m = f.metadata().unwrap();
            let mut got = Vec::new();
            let err = drain(std::pin::pin!(body(f, &m, start as u64, len as u64)), &mut got).await;
            assert!(err.is_none(), "{err:?}");
            assert!(got == data[start..start + len], "bytes {start}+{len} differ");
        }
    }

    /// Cut short, rewritten in place (times put back as they were), or
    /// replaced by a rename, after the first chunk went: the answer fails at
    /// the next chunk, and what went out is the file as it was opened.
    #[tokio::test]
    async fn a_file_that_changes_fails_the_answer_with_only_its_old_bytes_sent() {
        type Change = fn(&std::path::Path);
        let changes: [(&str, Change); 3] = [
            ("cut", |p| std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(CHUNK as u64 + 10).unwrap()),
            ("rewritten in place, mtime restored", |p| {
                let before = std::fs::metadata(p).unwrap().modified().unwrap();
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.write_all_at(&vec![0u8; 4 * CHUNK], 0).unwrap();
                f.set_modified(before).unwrap();
            }),
            ("replaced by a rename", |p| {
                let new = p.with_extension("new");
                std::fs::write(&new, b"other").unwrap();
                std::fs::rename(&new, p).unwrap();
            }),
        ];
        for (what, change) in changes {
            let (_dir, path, data) = file_of(4 * CHUNK);
            let f = File::open(&path).unwrap();
            let m = f.metadata().unwrap();
            let mut b = std::pin::pin!(body(f, &m, 0, data.len() as u64));
            let mut got = b.frame().await.unwrap().unwrap().into_data().unwrap().to_vec();
            assert_eq!(got.len(), CHUNK);
            change(&path);
            let err = drain(b.as_mut(), &mut got).await.unwrap_or_else(|| panic!("{what}: the answer went on"));
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{what}: {err}");
            assert!(got == data[..CHUNK], "{what}: other bytes than the file's as opened went out");
        }
    }
}
